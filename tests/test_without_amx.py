"""benchmarks/without_amx.py: the AMX permission request is refused, the script runs with its arguments."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

WRAPPER = Path(__file__).parents[1] / "benchmarks" / "without_amx.py"
PROBE = """import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
request = libc.syscall(158, 0x1023, 18)  # arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
request_errno = ctypes.get_errno()
mask = ctypes.c_uint64()
get = libc.syscall(158, 0x1022, ctypes.byref(mask))  # ARCH_GET_XCOMP_PERM: other requests still answered
print(request, request_errno, get, sys.argv[1:])
"""

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                                reason="AMX permission is a Linux x86-64 request")


def _probe(tmp_path, *wrapper):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = subprocess.run([sys.executable, *wrapper, str(script), "a", "--b"], capture_output=True, text=True, check=True)
    return out.stdout.strip().split(maxsplit=3)


def test_the_tile_request_is_refused_with_eperm_and_the_script_gets_its_arguments(tmp_path):
    assert _probe(tmp_path, str(WRAPPER)) == ["-1", "1", "0", "['a', '--b']"]


def test_without_the_wrapper_the_request_is_not_refused_with_eperm(tmp_path):
    # granted on a CPU with AMX, EINVAL where the kernel or the CPU has no tile state
    _, errno, _, _ = _probe(tmp_path)
    assert errno != "1"
