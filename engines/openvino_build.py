"""OpenVINO CPU engines: each exported graph compiled once for this CPU and stored as a blob, so
that a load imports it instead of reading and compiling the ONNX graph again.

A blob is compiled for the instruction sets of the CPU that built it (AMX, AVX-512) and for one
OpenVINO version; the record names both, and the runtime compiles the graph again (with a
warning naming the rebuild) on a machine where either differs.
"""

from __future__ import annotations

import io
import platform
from pathlib import Path
from typing import Any

from apd_deploy.accelerators import cpu_isa, cpu_name, native_bf16, require_openvino
from apd_deploy.errors import ApdDeployError

# OpenVINO's names for the precisions it computes in.
INFERENCE_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def compile_config(precision: str, threads: int, streams: int = 1) -> dict[str, Any]:
    """The compile (and import) settings of an engine: the precision it computes in, `threads`
    threads split over `streams` infer streams (one per scheduling lane)."""
    return {
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[precision],
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": streams,
    }


def check_precision(precision: str, exported: str, isa: list[str]) -> None:
    """Refuse what OpenVINO cannot run well here: bf16 without native bf16 instructions (it would
    compute in fp32 at bf16's accuracy, or emulate), and graphs exported in reduced precision."""
    if precision not in INFERENCE_PRECISIONS:
        raise ApdDeployError(f"--precision {precision}: OpenVINO engines compute in fp32 or bf16")
    if exported != "fp32":
        raise ApdDeployError(
            f"--backend openvino compiles fp32 graphs (in fp32 or bf16); this bundle was exported in {exported}: "
            "re-export it with `apd-deploy export --dtype fp32`"
        )
    if precision == "bf16" and not native_bf16(isa):
        raise ApdDeployError(
            "--precision bf16: this CPU has no bf16 instructions (neither AMX nor AVX512_BF16), so bf16 would be "
            "no faster than fp32 and less exact; build --precision fp32"
        )


def build_openvino(bundle: Path, manifest: dict[str, Any], precision: str, threads: int, out: Path) -> dict[str, Any]:
    """Compile both graphs and write `dllm.blob` and `verifier.blob` into `out`; return the engine
    record (paths relative to `out`)."""
    ov = require_openvino()
    isa = cpu_isa()
    check_precision(precision, manifest["export"]["dtype"], isa)
    core = ov.Core()
    sources = {role: manifest["models"][role]["graph"] for role in ("dllm", "verifier")}
    for role, source in sources.items():
        compiled = core.compile_model(str(bundle / source), "CPU", compile_config(precision, threads))
        blob = io.BytesIO()  # export_model writes only to BytesIO; getbuffer() saves a second copy
        compiled.export_model(blob)
        (out / f"{role}.blob").write_bytes(blob.getbuffer())
        del blob, compiled
    return {
        "backend": "openvino",
        "device": "cpu",
        "precision": precision,
        "array_backend": "numpy",
        "graphs": {role: f"{role}.blob" for role in sources},
        "sources": sources,
        "built_with": {"openvino": ov.get_version(), "cpu": cpu_name(), "machine": platform.machine(),
                       "isa": isa, "threads": threads},
    }
