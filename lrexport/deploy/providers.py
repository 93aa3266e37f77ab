"""Which onnxruntime execution provider to ask for, and which one actually ran.

onnxruntime-gpu lists CUDAExecutionProvider as available even on a machine without a
usable GPU or CUDA libraries; a session then silently falls back to the CPU. So the
provider asked for and the provider that ran are reported separately. Torch-free.
"""

from __future__ import annotations

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def ort_providers(prefer_gpu: bool = True) -> list[str]:
    """Providers for ``ort.InferenceSession(..., providers=...)``: CUDA first when present, CPU always."""
    import onnxruntime as ort

    if prefer_gpu and CUDA in ort.get_available_providers():
        return [CUDA, CPU]
    return [CPU]


def session_provider(session) -> str:
    """The provider that runs ``session``'s graph: the first one it really registered."""
    return session.get_providers()[0]
