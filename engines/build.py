"""`apd-deploy build-engine`: add an engine pair to a bundle and record it in the manifest.

The bundle is updated atomically: the engine is built in a staging folder inside the bundle, moved
into `engines/<name>/`, and committed by one rename of the new manifest. Until that rename the
bundle reads exactly as before; after a failure it is restored.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apd_deploy.accelerators import cpu_isa, default_threads, native_bf16, require_openvino
from apd_deploy.bundle import file_records, read_manifest, store_manifest, verify_files
from apd_deploy.engines.onnxruntime_build import build_onnxruntime
from apd_deploy.engines.openvino_build import build_openvino
from apd_deploy.engines.profiles import derive_profiles
from apd_deploy.engines.tensorrt_build import build_tensorrt
from apd_deploy.errors import ApdDeployError, BackendUnavailable

BACKENDS = ("onnxruntime", "openvino", "tensorrt")
DEVICES = {"onnxruntime": ("cpu", "cuda"), "openvino": ("cpu",), "tensorrt": ("cuda",)}
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_MAX_SEQ_LEN = 4096


def fastest_cpu_engine() -> tuple[str, str]:
    """(backend, precision) of the fastest CPU engine this machine can build for an fp32 bundle:
    OpenVINO in bf16 where the CPU computes bf16 natively (AMX, AVX512_BF16), OpenVINO in fp32
    where it is installed, else onnxruntime."""
    try:
        require_openvino()
    except BackendUnavailable:
        return "onnxruntime", "fp32"
    return "openvino", "bf16" if native_bf16(cpu_isa()) else "fp32"


def build_engine(
    bundle: str | Path,
    backend: str,
    device: str | None = None,
    precision: str | None = None,
    max_batch: int = 1,
    max_seq_len: int | None = None,
    opt_window: int | None = None,
    timing_cache: str | Path | None = None,
    max_logit_rows: int | None = None,
    threads: int | None = None,
    report: Callable[[str], None] = lambda _: None,
) -> tuple[str, dict[str, Any]]:
    """Build an engine pair into `bundle`; returns its name and manifest record. `threads`: the
    threads an OpenVINO engine is compiled for (default: every core; the runtime's own count wins)."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle, verify="skip")
    # Only the graphs the engine is built from must be sound: a damaged engine (this one or
    # another) is what a rebuild replaces.
    verify_files(bundle, manifest, "full", only=_sources(bundle, manifest))
    if backend not in BACKENDS:
        raise ApdDeployError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = device or DEVICES[backend][0]
    if device not in DEVICES[backend]:
        raise ApdDeployError(f"--device {device}: the {backend} backend runs on {' or '.join(DEVICES[backend])}")
    precision = precision or manifest["export"]["dtype"]
    if precision not in PRECISIONS:
        raise ApdDeployError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    model_positions = min(m["config"]["max_position_embeddings"] for m in manifest["models"].values())
    # Real models have 32k-131k positions; profiles (and the memory TensorRT reserves for them)
    # sized for that would serve no ordinary request better. --max-seq-len raises it.
    max_seq_len = max_seq_len or min(DEFAULT_MAX_SEQ_LEN, model_positions)
    for flag, value, low in (("--max-batch", max_batch, 1), ("--max-seq-len", max_seq_len, 2), ("--opt-window", opt_window, 1),
                             ("--max-logit-rows", max_logit_rows, 1), ("--threads", threads, 1)):
        if value is not None and value < low:
            raise ApdDeployError(f"{flag} must be at least {low}, got {value}")
    if max_seq_len > model_positions:
        raise ApdDeployError(f"--max-seq-len {max_seq_len} exceeds the models' {model_positions} positions")

    name = f"{backend}-{device}-{precision}"
    engines_dir = bundle / "engines"
    created_engines_dir = not engines_dir.exists()
    engines_dir.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=engines_dir))
    final, retired, moved_in = engines_dir / name, None, False
    try:
        report(f"building {name} ...")
        if backend == "onnxruntime":
            record = build_onnxruntime(bundle, manifest, device, precision, staging)
        elif backend == "openvino":
            record = build_openvino(bundle, manifest, precision, threads or default_threads(), staging)
        else:
            defaults = manifest["apd_defaults"]
            profiles = {role: derive_profiles(role, max_seq_len, defaults["kv_window"], defaults["max_lookahead"],
                                              max_batch, opt_window, max_logit_rows) for role in ("dllm", "verifier")}
            # The timing cache of the previous build is reused only if this TensorRT on this GPU made it.
            record = build_tensorrt(bundle, manifest, precision, profiles, max_batch, max_seq_len,
                                    Path(timing_cache) if timing_cache else None, final, staging, report)
            if "timing_cache" in record:
                record["timing_cache"] = f"engines/{name}/{record['timing_cache']}"
        record["graphs"] = {role: f"engines/{name}/{path}" for role, path in record["graphs"].items()}
        staging.chmod(0o755)
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=engines_dir)) / name
            os.replace(final, retired)
        os.replace(staging, final)
        moved_in = True
        files = {k: v for k, v in manifest["files"].items() if not k.startswith(f"engines/{name}/")}
        files.update(file_records(bundle, f"engines/{name}"))
        engines = {**manifest.get("engines", {}), name: record}
        store_manifest(bundle, {**manifest, "engines": engines, "files": files})
    except BaseException:
        if moved_in:
            shutil.rmtree(final)
        if retired is not None:
            os.replace(retired, final)
        shutil.rmtree(staging, ignore_errors=True)
        _cleanup(retired, engines_dir if created_engines_dir else None)
        raise
    _cleanup(retired, None)
    report(f"built {name} in {bundle / 'engines' / name}")
    return name, record


def _sources(bundle: Path, manifest: dict[str, Any]) -> list[str]:
    """The exported graphs (and their external weights) every engine is built from."""
    graphs = [manifest["models"][role]["graph"] for role in ("dllm", "verifier")]
    return graphs + [f"{graph}.data" for graph in graphs if (bundle / f"{graph}.data").exists()]


def _cleanup(retired: Path | None, created_dir: Path | None) -> None:
    if retired is not None:
        shutil.rmtree(retired.parent, ignore_errors=True)
    if created_dir is not None and not any(created_dir.iterdir()):
        created_dir.rmdir()
