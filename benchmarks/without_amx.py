"""Run a benchmark script in a process that may not use AMX tiles, as on a CPU without them.

On Linux a process must ask for AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``) before its first tile instruction; XNNPACK, oneDNN and MLAS ask once and
fall back to their AVX-512/VNNI kernels when refused. A seccomp filter refuses that one request
(EPERM) for this process and every process it starts, so an int8 model runs the kernels it would
run on an x86 CPU without AMX. Everything else runs as usual: fp32 kernels do not use AMX.

    python benchmarks/without_amx.py benchmarks/deploy_efficiency.py --runtime litert --precision int8
"""

from __future__ import annotations

import ctypes
import os
import platform
import runpy
import sys

SYS_ARCH_PRCTL = 158  # x86-64
ARCH_REQ_XCOMP_PERM = 0x1023
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
RET_ERRNO_EPERM, RET_ALLOW = 0x00050000 | 1, 0x7FFF0000
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06  # BPF opcodes
# offsets into struct seccomp_data: nr, arch, args[0] (low word on little-endian)
NR, ARCH, ARG0 = 0, 4, 16


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn))]


def deny_amx() -> None:
    """Install the filter; every other system call, arch_prctl's other requests included, is allowed."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        sys.exit(f"without_amx: AMX permission is a Linux x86-64 request; this is {sys.platform} {platform.machine()}")
    # A failed jeq jumps to the last instruction (allow); the one match refuses with EPERM.
    insns = [(LD_W_ABS, 0, 0, ARCH), (JEQ_K, 0, 5, AUDIT_ARCH_X86_64),
             (LD_W_ABS, 0, 0, NR), (JEQ_K, 0, 3, SYS_ARCH_PRCTL),
             (LD_W_ABS, 0, 0, ARG0), (JEQ_K, 0, 1, ARCH_REQ_XCOMP_PERM),
             (RET_K, 0, 0, RET_ERRNO_EPERM), (RET_K, 0, 0, RET_ALLOW)]
    program = (_Insn * len(insns))(*(_Insn(*i) for i in insns))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(_Prog(len(insns), program))) != 0:
        sys.exit(f"without_amx: the kernel refused the seccomp filter (errno {ctypes.get_errno()})")


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/without_amx.py SCRIPT [ARGS...]")
    deny_amx()
    print("without_amx: AMX tile state refused to this process and its children", file=sys.stderr, flush=True)
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python SCRIPT` would
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
