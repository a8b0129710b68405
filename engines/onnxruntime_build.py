"""onnxruntime engines: each graph optimised once for an execution provider and saved, so the
runtime loads it without optimising again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apd_deploy.accelerators import require_ort_cuda
from apd_deploy.errors import ApdDeployError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# EXTENDED applies the transformer fusions (RMSNorm, attention pieces) yet stays free of the
# machine-specific layouts that ORT_ENABLE_ALL may bake in.
BUILD_LEVEL = "ORT_ENABLE_EXTENDED"


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
    graphs = {}
    for role in ("dllm", "verifier"):
        source = bundle / manifest["models"][role]["graph"]
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, BUILD_LEVEL)
        options.optimized_model_filepath = str(out / f"{role}.onnx")
        options.log_severity_level = 3
        if source.with_name(source.name + ".data").exists():  # large graphs keep weights outside
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{role}.onnx.data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(source), options, providers=[provider])
        graphs[role] = f"{role}.onnx"
    return {
        "backend": "onnxruntime",
        "device": device,
        "precision": precision,
        "array_backend": "cupy" if device == "cuda" else "numpy",
        "graphs": graphs,
        "session_options": {"graph_optimization_level": "ORT_DISABLE_ALL"},
        "built_with": {"onnxruntime": ort.__version__, "execution_provider": provider, "optimization": BUILD_LEVEL},
    }
