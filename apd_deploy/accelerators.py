"""What this machine can run: TensorRT, cupy, onnxruntime's CUDA provider, and the GPU's
compute capability. Each `require_*` returns the module or raises one error line that says what is
missing and how to install it; both `engines` (build) and `runtime` (run) use them."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from apd_deploy.errors import BackendUnavailable

GPU_EXTRA = "pip install 'apd-deploy[gpu]'"
TENSORRT_EXTRA = "pip install 'apd-deploy[tensorrt]'"


def _require(module: str, missing: str) -> ModuleType:
    """The module, or BackendUnavailable with the message `missing` (how to install it)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendUnavailable(missing) from None


def require_cupy() -> ModuleType:
    """cupy with a usable CUDA device."""
    cupy = _require("cupy", f"cupy is not installed; it runs sampling on the GPU: {GPU_EXTRA}")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError has no stable import path across cupy versions
        raise BackendUnavailable(f"cupy is installed but finds no usable CUDA GPU ({exc}); run on a machine with an NVIDIA GPU and driver") from None
    if count < 1:
        raise BackendUnavailable("cupy finds no CUDA GPU on this machine; run on a machine with an NVIDIA GPU")
    return cupy


def require_tensorrt() -> ModuleType:
    return _require("tensorrt", f"TensorRT is not installed (it needs an NVIDIA GPU): {TENSORRT_EXTRA}")


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


OPENVINO_EXTRA = "pip install 'apd-deploy[openvino]'"
# The instruction sets an OpenVINO CPU blob may be compiled for: a blob from a CPU with one of these
# may use it, so a CPU lacking it must compile the graph again.
CPU_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def require_openvino() -> ModuleType:
    return _require("openvino",
                    f"OpenVINO is not installed; it runs the graphs on Intel and AMD CPUs: {OPENVINO_EXTRA}")


def cpu_isa() -> list[str]:
    """The instruction sets of CPU_ISA_FLAGS this machine's CPU has (from /proc/cpuinfo; none elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in CPU_ISA_FLAGS if flag in flags]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def native_bf16(isa: list[str]) -> bool:
    """Whether a CPU with these instruction sets computes in bf16 natively (AMX or AVX512_BF16)."""
    return any(flag in isa for flag in NATIVE_BF16_FLAGS)


def default_threads() -> int:
    """Every core this process may run on (its affinity mask where the OS has one, as taskset and
    container CPU sets narrow it), as onnxruntime and PyTorch choose by default. The two models
    run one after the other, so each session gets all of them; on a shared machine pass fewer."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
