"""onnxruntime engines: each graph optimised once for an execution provider and saved, so the
runtime loads it without optimising again."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from apd_deploy.accelerators import require_ort_cuda
from apd_deploy.errors import ApdDeployError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# EXTENDED applies the transformer fusions (RMSNorm, attention pieces) yet stays free of the
# machine-specific layouts that ORT_ENABLE_ALL may bake in.
BUILD_LEVEL = "ORT_ENABLE_EXTENDED"
# onnxruntime's CPU provider has no fp16 matrix kernels: optimising an fp16 graph for it wraps
# those nodes in Casts to fp32, including Casts of the weights, inserted after constant folding
# has run. Saved like that and loaded with optimisation off, every call would convert the weights
# again (3x slower than the plain graphs). A second pass folds them into fp32 weights, once.
FOLD_LEVEL = "ORT_ENABLE_BASIC"


def _optimise(ort: Any, source: Path, target: Path, provider: str, level: str) -> None:
    """Optimise `source` at `level` for `provider` and save it as `target` (weights of large
    graphs in `<target>.data`, as the exported graph had them)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    if source.with_name(source.name + ".data").exists():  # large graphs keep weights outside
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{target.name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), options, providers=[provider])


def build_onnxruntime(bundle: Path, manifest: dict[str, Any], device: str, precision: str, out: Path) -> dict[str, Any]:
    """Write optimised `dllm.onnx` and `verifier.onnx` into `out`; return the engine record
    (graph paths relative to `out`)."""
    import onnxruntime as ort

    exported = manifest["export"]["dtype"]
    if precision != exported:
        raise ApdDeployError(
            f"--precision {precision}: onnxruntime runs the graphs in the precision they were exported in "
            f"({exported}); re-export with `apd-deploy export --dtype {precision}`, or build with --precision {exported}"
        )
    if device == "cuda":
        require_ort_cuda()
    provider = PROVIDERS[device]
    fold_weights = device == "cpu" and precision != "fp32"
    passes = [BUILD_LEVEL, FOLD_LEVEL] if fold_weights else [BUILD_LEVEL]
    for role in ("dllm", "verifier"):
        source = bundle / manifest["models"][role]["graph"]
        with tempfile.TemporaryDirectory(prefix=f".{role}-", dir=out) as scratch:
            for number, level in enumerate(passes, 1):
                target = out / f"{role}.onnx" if number == len(passes) else Path(scratch) / f"{number}-{role}.onnx"
                _optimise(ort, source, target, provider, level)
                source = target
    return {
        "backend": "onnxruntime",
        "device": device,
        "precision": precision,
        "array_backend": "cupy" if device == "cuda" else "numpy",
        "graphs": {role: f"{role}.onnx" for role in ("dllm", "verifier")},
        "session_options": {"graph_optimization_level": "ORT_DISABLE_ALL"},
        "built_with": {"onnxruntime": ort.__version__, "execution_provider": provider, "optimization": "+".join(passes)},
    }
