"""What this machine can run: TensorRT, cupy, onnxruntime's CUDA provider, and the GPU's
compute capability. Each `require_*` returns the module or raises one error line that says what is
missing and how to install it; both `engines` (build) and `runtime` (run) use them."""

from __future__ import annotations

from types import ModuleType

from apd_deploy.errors import BackendUnavailable

GPU_EXTRA = "pip install 'apd-deploy[gpu]'"
TENSORRT_EXTRA = "pip install 'apd-deploy[tensorrt]'"


def require_cupy() -> ModuleType:
    """cupy with a usable CUDA device."""
    try:
        import cupy
    except ImportError:
        raise BackendUnavailable(f"cupy is not installed; it runs sampling on the GPU: {GPU_EXTRA}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError has no stable import path across cupy versions
        raise BackendUnavailable(f"cupy is installed but finds no usable CUDA GPU ({exc}); run on a machine with an NVIDIA GPU and driver") from None
    if count < 1:
        raise BackendUnavailable("cupy finds no CUDA GPU on this machine; run on a machine with an NVIDIA GPU")
    return cupy


def require_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(f"TensorRT is not installed (it needs an NVIDIA GPU): {TENSORRT_EXTRA}") from None
    return tensorrt


def require_ort_cuda() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise BackendUnavailable(
            "onnxruntime's CUDA provider is not available (the installed onnxruntime is CPU-only): "
            f"pip uninstall onnxruntime && {GPU_EXTRA}"
        )


def compute_capability(device: int = 0) -> str:
    """'major.minor' of the CUDA device, e.g. '9.0' for an H100."""
    cupy = require_cupy()
    cc = cupy.cuda.Device(device).compute_capability  # e.g. '90'
    return f"{cc[:-1]}.{cc[-1]}"
