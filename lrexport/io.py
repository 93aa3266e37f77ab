"""Atomic file writes, torch-free: the one place results reach the disk whole or not at all.

Checkpoints, run directories, artifacts, sweeps and reports all write through here, so that
a reader (report, infer) need not import the training code to write a file. And muting what
native libraries print straight to a file descriptor, past Python's streams.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from .errors import WriteError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes, what: str = "file") -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk leaves the previous file intact; a failed write is a WriteError.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        raise WriteError(f"cannot write {path}: {e.strerror or e}; nothing was overwritten, the previous {what}s are intact") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def muted(fd: int):
    """Send what is written to descriptor ``fd`` (1: stdout, 2: stderr) to /dev/null meanwhile: for native code
    that prints there directly (the TorchScript ONNX exporter's graph dumps, ExecuTorch's CPU probing)."""
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved, devnull = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved), os.close(devnull)
