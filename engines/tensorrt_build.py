"""TensorRT engines, built with the tensorrt Python API from the bundle's ONNX graphs.

Networks are strongly typed on TensorRT 10 and 11 alike: the precision comes from the ONNX graph,
so an fp16/bf16 engine is built from a bundle exported in that precision (`export --dtype`), whose
graph keeps its RMSNorms and softmax in fp32. The FP16/BF16 builder flags (deprecated in 10.12,
removed in 11) are never set: on a weakly typed fp32 network they let TensorRT run the norms in
16 bits, where their sums of squares overflow.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apd_deploy.accelerators import compute_capability, require_cupy, require_tensorrt
from apd_deploy.bundle import kv_dims
from apd_deploy.engines.profiles import Profile, activation_bytes
from apd_deploy.errors import ApdDeployError

WORKSPACE_BYTES = 4 << 30
# Above this share of the GPU's memory, weights plus activations leave too little for the caches:
# warn. Above all of it, refuse.
MEMORY_WARN_SHARE = 0.8


def precision_plan(exported: str, precision: str) -> None:
    """Refuse a precision other than the graph's: the network is strongly typed."""
    if precision != exported:
        raise ApdDeployError(
            f"--precision {precision}: TensorRT engines are built strongly typed, so the precision comes from the "
            f"ONNX graph, which is {exported}; build with --precision {exported}, or re-export with "
            f"`apd-deploy export --dtype {precision}` and build that bundle"
        )


def timing_cache_name(tensorrt_version: str, capability: str) -> str:
    """A timing cache holds tactic timings of one TensorRT build on one GPU architecture: its file
    name says which, so a rebuild elsewhere starts from an empty cache instead of being refused."""
    return f"timing-trt{tensorrt_version}-sm{capability.replace('.', '')}.cache"


def tensorrt_record(precision: str, tensorrt_version: str, capability: str, gpu: str,
                    profiles: dict[str, list[Profile]], max_batch: int, max_seq_len: int) -> dict[str, Any]:
    """The manifest record of a TensorRT engine pair (graph paths relative to the engine folder)."""
    return {
        "backend": "tensorrt",
        "device": "cuda",
        "precision": precision,
        "array_backend": "cupy",
        "graphs": {role: f"{role}.plan" for role in ("dllm", "verifier")},
        "built_with": {"tensorrt": tensorrt_version, "compute_capability": capability, "gpu": gpu,
                       "strongly_typed": True, "builder_flags": []},  # see the module docstring
        "profiles": {role: [p.to_dict() for p in ps] for role, ps in profiles.items()},
        "max_batch": max_batch,
        "max_seq_len": max_seq_len,
    }


def check_memory(bundle: Path, manifest: dict[str, Any], profiles: dict[str, list[Profile]], gpu_bytes: int,
                 report: Callable[[str], None]) -> None:
    """Refuse profiles whose activations and weights exceed the GPU's memory, warn when they come close.
    Both models' engines are loaded at once; each reserves the activations of its largest profile
    (its contexts share one buffer)."""
    weights = sum((bundle / f).stat().st_size for role in ("dllm", "verifier")
                  for f in (manifest["models"][role]["graph"], f"{manifest['models'][role]['graph']}.data")
                  if (bundle / f).is_file())
    activations = {role: max(activation_bytes(p, manifest["models"][role]["config"]) for p in profiles[role])
                   for role in ("dllm", "verifier")}
    total = weights + sum(activations.values())
    figure = (f"the engines would need about {total / 1e9:.1f} GB of GPU memory (weights {weights / 1e9:.1f} GB, "
              f"activations of the largest profiles: dLLM {activations['dllm'] / 1e9:.1f} GB, verifier "
              f"{activations['verifier'] / 1e9:.1f} GB, mostly fp32 attention scores batch x heads x window x "
              f"(past + window)); this GPU has {gpu_bytes / 1e9:.1f} GB")
    shrink = "lower --max-seq-len (the longest prefill window) or --max-batch, which size them"
    if total > gpu_bytes:
        raise ApdDeployError(f"{figure}; {shrink}")
    if total > MEMORY_WARN_SHARE * gpu_bytes:
        report(f"warning: {figure}, leaving little for the KV caches; {shrink}")


def _attach_timing_cache(config, serialized: memoryview, report: Callable[[str], None]) -> None:
    """Attach `serialized` (or, if TensorRT refuses it, an empty cache) to `config`, which keeps it alive."""
    if serialized.nbytes:
        cache = config.create_timing_cache(serialized)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        report("the timing cache was made by another TensorRT version or GPU (TensorRT refused it): "
               "building from an empty one")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise ApdDeployError("TensorRT could not create an empty timing cache (see its log above)")


def _write_buffer(path: Path, buffer) -> None:
    """Write TensorRT's host memory (a plan, a timing cache) through its buffer, without a copy."""
    with open(path, "wb") as f:
        f.write(memoryview(buffer))


def _build_one(trt, onnx_path: Path, profiles: list[Profile], kv_dims: tuple[int, int, int], precision: str,
               timing_cache: memoryview, plan_path: Path, report: Callable[[str], None]) -> memoryview | None:
    """Build one engine into `plan_path`; return the timing cache after the build (None if
    TensorRT has none to give)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # TensorRT 11 networks are always strongly typed (the flag is deprecated there and ignored).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if major < 11 else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # a path, so external weight files are found
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise ApdDeployError(f"{onnx_path}: TensorRT cannot parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # keep fp32 engines token-exact with the CPU run
    for profile in profiles:
        optimisation = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.input_shapes(kv_dims).items():
            optimisation.set_shape(name, low, opt, high)  # raises on inconsistent shapes
        if config.add_optimization_profile(optimisation) < 0:
            raise ApdDeployError(f"{onnx_path}: TensorRT refused the {profile.name} optimisation profile "
                                 f"{profile.to_dict()} (see its log above)")
    _attach_timing_cache(config, timing_cache, report)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ApdDeployError(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    del parser, network  # the parser holds the graph's weights: free them before the plan is written
    _write_buffer(plan_path, plan)
    built = config.get_timing_cache()
    if built is None:
        report(f"{onnx_path.name}: TensorRT returned no timing cache; the next build starts from an empty one")
        return None
    return memoryview(built.serialize())


def build_tensorrt(bundle: Path, manifest: dict[str, Any], precision: str, profiles: dict[str, list[Profile]],
                   max_batch: int, max_seq_len: int, timing_cache: Path | None, previous: Path, out: Path,
                   report: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Write `dllm.plan`, `verifier.plan` and the timing cache into `out`; return the record.

    The timing cache comes from `timing_cache` if given (and is written back there), else from
    `previous` (the engine folder of an earlier build) under this TensorRT's and GPU's name."""
    trt = require_tensorrt()
    cupy = require_cupy()
    precision_plan(manifest["export"]["dtype"], precision)
    capability = compute_capability()
    properties = cupy.cuda.runtime.getDeviceProperties(0)
    check_memory(bundle, manifest, profiles, int(properties["totalGlobalMem"]), report)
    cache_name = timing_cache_name(trt.__version__, capability)
    source = timing_cache if timing_cache is not None else previous / cache_name
    cache = memoryview(source.read_bytes() if source.is_file() else b"")
    for role in ("dllm", "verifier"):
        entry = manifest["models"][role]
        built = _build_one(trt, bundle / entry["graph"], profiles[role], kv_dims(entry), precision, cache,
                           out / f"{role}.plan", report)
        cache = memoryview(b"") if built is None else built
    gpu = properties["name"]
    gpu = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
    record = tensorrt_record(precision, trt.__version__, capability, gpu, profiles, max_batch, max_seq_len)
    if cache.nbytes:
        _write_buffer(out / cache_name, cache)
        record["timing_cache"] = cache_name
        if timing_cache is not None:
            staged = timing_cache.with_name(f".{timing_cache.name}.partial")
            _write_buffer(staged, cache)
            os.replace(staged, timing_cache)
    return record
