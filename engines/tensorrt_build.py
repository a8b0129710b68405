"""TensorRT engines, built with the tensorrt Python API from the bundle's ONNX graphs.

Precision follows the installed TensorRT: TensorRT 11 networks are strongly typed, so the ONNX
graph must already carry the precision (export with --dtype); TensorRT 10 can also lower an fp32
graph with the FP16/BF16 builder flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apd_deploy.accelerators import compute_capability, require_cupy, require_tensorrt
from apd_deploy.bundle import kv_dims
from apd_deploy.engines.profiles import Profile
from apd_deploy.errors import ApdDeployError

WORKSPACE_BYTES = 4 << 30


def precision_plan(tensorrt_major: int, exported: str, precision: str) -> tuple[bool, list[str]]:
    """(strongly typed network?, builder flags) to build an `exported` graph at `precision`."""
    if precision == exported:
        return exported != "fp32" or tensorrt_major >= 11, []
    if tensorrt_major >= 11:
        raise ApdDeployError(
            f"--precision {precision}: TensorRT {tensorrt_major} networks are strongly typed, so the precision comes "
            f"from the ONNX graph, which is {exported}; re-export with `apd-deploy export --dtype {precision}` and build that bundle"
        )
    if exported != "fp32":
        raise ApdDeployError(
            f"--precision {precision}: the graphs were exported in {exported}; build with --precision {exported}, "
            f"or re-export with `apd-deploy export --dtype {precision}`"
        )
    return False, [precision.upper()]


def tensorrt_record(precision: str, tensorrt_version: str, capability: str, gpu: str,
                    profiles: dict[str, list[Profile]], max_batch: int, max_seq_len: int,
                    strongly_typed: bool, flags: list[str]) -> dict[str, Any]:
    """The manifest record of a TensorRT engine pair (graph paths relative to the engine folder)."""
    return {
        "backend": "tensorrt",
        "device": "cuda",
        "precision": precision,
        "array_backend": "cupy",
        "graphs": {role: f"{role}.plan" for role in ("dllm", "verifier")},
        "built_with": {"tensorrt": tensorrt_version, "compute_capability": capability, "gpu": gpu,
                       "strongly_typed": strongly_typed, "builder_flags": flags},
        "profiles": {role: [p.to_dict() for p in ps] for role, ps in profiles.items()},
        "max_batch": max_batch,
        "max_seq_len": max_seq_len,
        "timing_cache": "timing.cache",
    }


def _build_one(trt, onnx_path: Path, profiles: list[Profile], kv_dims: tuple[int, int, int], strongly_typed: bool,
               flags: list[str], precision: str, timing_cache: bytes) -> tuple[bytes, bytes]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed and major < 11 else 0
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # a path, so external weight files are found
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise ApdDeployError(f"{onnx_path}: TensorRT cannot parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # keep fp32 engines token-exact with the CPU run
    for profile in profiles:
        optimisation = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.input_shapes(kv_dims).items():
            optimisation.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimisation)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ApdDeployError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def build_tensorrt(bundle: Path, manifest: dict[str, Any], precision: str, profiles: dict[str, list[Profile]],
                   max_batch: int, max_seq_len: int, timing_cache: bytes, out: Path) -> tuple[dict[str, Any], bytes]:
    """Write `dllm.plan` and `verifier.plan` into `out`; return the record and the timing cache."""
    trt = require_tensorrt()
    cupy = require_cupy()
    capability = compute_capability()
    strongly_typed, flags = precision_plan(int(trt.__version__.split(".")[0]), manifest["export"]["dtype"], precision)
    for role in ("dllm", "verifier"):
        entry = manifest["models"][role]
        plan, timing_cache = _build_one(trt, bundle / entry["graph"], profiles[role], kv_dims(entry), strongly_typed,
                                        flags, precision, timing_cache)
        (out / f"{role}.plan").write_bytes(plan)
    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    gpu = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
    record = tensorrt_record(precision, trt.__version__, capability, gpu, profiles, max_batch, max_seq_len,
                             strongly_typed, flags)
    return record, timing_cache
