"""`apd-deploy export`: two checkpoint directories in, one checked bundle out.

Memory: one model at a time. Both checkpoints are first checked without reading their weights;
then each model is loaded, traced, run once for the reference logits and freed before
onnxruntime loads its graph, so the peak is about one model (the larger) plus what the exporter
or onnxruntime adds, not the sum of both models and a session.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apd_deploy import __version__
from apd_deploy.bundle import FORMAT, FORMAT_VERSION, file_records, recognise_bundle, store_manifest
from apd_deploy.errors import CheckpointError, ExportCheckError
from apd_deploy.export import parity
from apd_deploy.export.carry_engines import carry_engines
from apd_deploy.export.checkpoint import CheckpointFiles, inspect_checkpoint, load_checkpoint
from apd_deploy.export.graph_io import graph_io
from apd_deploy.export.trace import release_weights, trace_to_onnx
from apd_deploy.runtime.params import group
from apd_deploy.staging import check_destination, staged_directory

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_ELEMENT_TYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_OPSET = 18
APD_DEFAULTS = {name: param.default for name, param in group("apd").items()}  # R, W, M: the manifest's apd_defaults
KV_LAYOUT = "[batch, num_layers, 2, num_kv_heads, capacity, head_dim]; past_kv's first total_len - seq_len positions are read"

Report = Callable[[str], None]


@contextlib.contextmanager
def _stage(report: Report, what: str) -> Iterator[None]:
    report(f"{what} ...")
    start = time.perf_counter()
    yield
    report(f"{what}: done in {time.perf_counter() - start:.1f} s")


def check_compatible(dllm: CheckpointFiles, verifier: CheckpointFiles) -> None:
    """The pair must share a tokenizer: APD compares their predictions token id by token id."""
    d, v = dllm.config, verifier.config
    if v.vocab_size > d.vocab_size:
        raise CheckpointError(
            f"{verifier.path / 'config.json'}: field 'vocab_size' is {v.vocab_size}, larger than the dLLM's "
            f"{d.vocab_size}; APD cuts the dLLM's logits to the verifier's vocabulary, so the verifier's "
            "must be the smaller (pick a verifier trained on the dLLM's tokenizer)"
        )
    if not 0 <= d.mask_token_id < d.vocab_size:
        raise CheckpointError(f"{dllm.path / 'config.json'}: field 'mask_token_id' {d.mask_token_id} is outside the vocabulary")
    if not d.eos_token_ids + v.eos_token_ids:
        raise CheckpointError(f"{dllm.path / 'config.json'}: field 'eos_token_id' is missing; generation could never stop")
    for tokens_id in d.eos_token_ids + v.eos_token_ids:
        if tokens_id >= v.vocab_size:
            raise CheckpointError(
                f"{dllm.path / 'config.json'}: eos token {tokens_id} is outside the verifier's vocabulary ({v.vocab_size})"
            )


def _steps_and_tokens(cfg) -> tuple[tuple[tuple[int, int], ...], np.ndarray]:
    steps = parity.VERIFIER_STEPS if cfg.causal else parity.DLLM_STEPS
    mask = None if cfg.causal else cfg.mask_token_id
    return steps, parity.check_tokens(cfg.vocab_size, max(k + n for k, n in steps), mask)


def _check_graph(source: CheckpointFiles, onnx_path: Path, dtype: str, expected: list[np.ndarray], reference_name: str,
                 tolerance: float | None) -> dict[str, Any]:
    session, reason = parity.ort_session(onnx_path)
    if session is None:
        return {"status": "skipped", "reason": reason}
    cfg = source.config
    steps, tokens = _steps_and_tokens(cfg)
    cache_shape = (parity.BATCH, cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 0, cfg.head_dim)
    graph = parity.onnx_stepper(session, cache_shape, np.dtype(ONNX_ELEMENT_TYPES[dtype]))
    result = parity.compare(graph, expected, tokens, steps, dtype, reference_name, tolerance)
    if not result.passed:
        raise ExportCheckError(
            f"{onnx_path.name}: onnxruntime and PyTorch ({reference_name}) disagree: max |logits diff| "
            f"{result.max_abs_diff:.3g} > tolerance {result.tolerance:.3g}; the export is not trustworthy "
            "(try another --opset, or report the model)"
        )
    return result.to_dict()


def _export_model(role: str, source: CheckpointFiles, graph: Path, dtype: str, opset: int, allow_pickle: bool,
                  tolerance: float | None, report: Report) -> dict[str, Any]:
    """Load, trace and check one model, holding one copy of its weights at a time; returns the check.

    The reference logits are computed first and the PyTorch weights freed before onnxruntime
    loads the graph. The dLLM is checked against the project's model; the verifier against
    transformers' own implementation, loaded (and freed) before the project's model."""
    steps, tokens = _steps_and_tokens(source.config)
    if source.config.causal:
        with _stage(report, f"computing {role} reference logits with transformers"):
            reference_name = "transformers"
            hf_model = parity.load_transformers_reference(source.path, DTYPES[dtype])
            expected = parity.reference_logits(parity.full_prefix_stepper(hf_model), tokens, steps)
            del hf_model
            gc.collect()
    with _stage(report, f"loading {role} from {source.path}"):
        model = load_checkpoint(source.path, role, DTYPES[dtype], allow_pickle).model
    if not source.config.causal:
        with _stage(report, f"computing {role} reference logits"):
            reference_name = "apd_deploy.export.transformer"
            expected = parity.reference_logits(parity.torch_stepper(model), tokens, steps)
    with _stage(report, f"tracing {role} to ONNX (opset {opset}, {dtype})"):
        trace_to_onnx(model, graph, opset)
    release_weights(model)
    del model
    with _stage(report, f"checking {role} graph against PyTorch"):
        return _check_graph(source, graph, dtype, expected, reference_name, tolerance)


def _model_entry(ckpt: CheckpointFiles, graph: str, dtype: str, check: dict[str, Any]) -> dict[str, Any]:
    return {
        "graph": graph,
        "source": str(ckpt.path.resolve()),
        "config": ckpt.config.to_dict(),
        "attention": "causal" if ckpt.config.causal else "bidirectional",
        "logits_shift": 1,
        "kv_layout": KV_LAYOUT,
        **graph_io(ckpt.config, ONNX_ELEMENT_TYPES[dtype]),
        "check": check,
    }


def _copy_tokenizer(dllm: CheckpointFiles, verifier: CheckpointFiles, staging: Path) -> dict[str, Any] | None:
    source = next((c for c in (dllm, verifier) if (c.path / "tokenizer.json").is_file()), None)
    if source is None:
        return None
    (staging / "tokenizer").mkdir()
    files = [f"tokenizer/{f.name}" for f in source.tokenizer_files]
    for f in source.tokenizer_files:
        shutil.copy2(f, staging / "tokenizer" / f.name)
    return {"tokenizer_json": "tokenizer/tokenizer.json", "files": files}


def export_bundle(
    dllm_dir: str | Path,
    verifier_dir: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    allow_pickle: bool = False,
    overwrite: bool = False,
    tolerance: float | None = None,
    report: Report = lambda _: None,
    warn: Report = lambda _: None,
) -> dict[str, Any]:
    """Export both checkpoints into the bundle directory `out` and return its manifest.

    `tolerance` overrides the per-dtype bound on max |ORT - PyTorch| logits. Nothing is written
    at `out` unless every step succeeds; with `overwrite`, `out` may be an existing bundle (and
    nothing else). `warn` receives what the user must know even without progress output: a check
    that could not run, engines of the replaced bundle that were dropped.
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out)
    check_destination(out, overwrite, recognise_bundle)  # before minutes of loading and tracing
    started = time.perf_counter()
    # The exporter logs a line per optional op library it cannot find; none matter here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    dllm = inspect_checkpoint(dllm_dir, "dllm", allow_pickle)
    verifier = inspect_checkpoint(verifier_dir, "verifier", allow_pickle)
    check_compatible(dllm, verifier)

    with staged_directory(out, overwrite, recognise_bundle) as staging:
        models = {}
        for role, source in (("dllm", dllm), ("verifier", verifier)):
            graph = f"{role}.onnx"
            check = _export_model(role, source, staging / graph, dtype, opset, allow_pickle, tolerance, report)
            if check["status"] == "skipped":
                warn(f"warning: {role} graph not checked: {check['reason']}")
            models[role] = _model_entry(source, graph, dtype, check)
        graphs = file_records(staging)
        carried = carry_engines(out, staging, graphs)
        for message in carried.dropped:
            warn(f"warning: {message}")
        import onnx

        d, v = dllm.config, verifier.config
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created_by": f"apd-deploy {__version__}",
            "models": models,
            "special_tokens": {
                "mask": d.mask_token_id,
                "eos": list(dict.fromkeys(d.eos_token_ids + v.eos_token_ids)),
                "pad": d.pad_token_id if d.pad_token_id is not None else v.pad_token_id,
                "bos": d.bos_token_id if d.bos_token_id is not None else v.bos_token_id,
            },
            "apd_defaults": dict(APD_DEFAULTS),
            "tokenizer": _copy_tokenizer(dllm, verifier, staging),
            "export": {"dtype": dtype, "opset": opset, "torch": torch.__version__, "onnx": onnx.__version__},
        }
        if carried.engines:
            manifest["engines"] = carried.engines
        with _stage(report, "hashing files and writing manifest.json"):
            manifest["files"] = file_records(staging, known={**graphs, **carried.records})
            manifest["export"]["seconds"] = round(time.perf_counter() - started, 2)
            store_manifest(staging, manifest)
    return manifest
