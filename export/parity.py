"""The export's self-check: run each ONNX graph in onnxruntime next to PyTorch, step by step.

The steps mimic how the runtime drives the graphs: a first window from an empty cache, then
windows of one and of several tokens that extend a cache cropped back to some length (APD crops
both caches every step). The graph's own outputs are fed back as its cache, so errors that
compound through the cache are caught too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apd_deploy.export.transformer import DecoderLM

# (past_len kept from the previous cache, new tokens fed) for each step.
DLLM_STEPS = ((0, 7), (5, 6), (11, 1), (12, 1), (13, 4))
VERIFIER_STEPS = ((0, 7), (7, 1), (8, 1), (6, 4), (10, 3))
# Allowed max |ORT - PyTorch| per unit of the largest |logit|.
RELATIVE_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}
BATCH = 2

StepLogits = Callable[[np.ndarray, int, int], np.ndarray]


@dataclass
class CheckResult:
    max_abs_diff: float
    logits_scale: float
    tolerance: float
    per_step: list[dict[str, float | int]]
    reference: str

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {
            "status": "passed",
            "reference": self.reference,
            "max_abs_diff": self.max_abs_diff,
            "logits_scale": self.logits_scale,
            "tolerance": self.tolerance,
            "steps": self.per_step,
        }


def check_tokens(vocab: int, length: int, mask_token_id: int | None, seed: int = 0) -> np.ndarray:
    """[BATCH, length] token ids; for the dLLM the second half of each row is masked, as in decoding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(BATCH, length), dtype=np.int64)
    if mask_token_id is not None:
        tokens[:, length // 2 :] = mask_token_id
    return tokens


def _inputs(tokens: np.ndarray, keep: int, new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.ascontiguousarray(tokens[:, keep : keep + new])
    positions = np.broadcast_to(np.arange(keep, keep + new, dtype=np.int64), ids.shape).copy()
    mask = np.ones((tokens.shape[0], keep + new), dtype=np.int64)
    return ids, positions, mask


def onnx_stepper(session, empty_cache_shape: tuple[int, ...], kv_dtype: np.dtype) -> StepLogits:
    """The graph over a cache buffer that is often longer than the past it holds (after a crop),
    as the runtime hands it over."""
    cache = np.zeros(empty_cache_shape, dtype=kv_dtype)

    def step(tokens: np.ndarray, keep: int, new: int) -> np.ndarray:
        nonlocal cache
        ids, positions, mask = _inputs(tokens, keep, new)
        feed = {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "past_kv": cache,
                "logit_rows": np.arange(ids.size, dtype=np.int64)}  # every row of every batch row
        logits, new_kv = session.run(["logits", "new_kv"], feed)
        cache = np.concatenate([cache[..., :keep, :], new_kv], axis=-2)
        return logits.reshape(*ids.shape, -1)

    return step


def torch_stepper(model: DecoderLM) -> StepLogits:
    cache = model.empty_cache(BATCH)

    @torch.no_grad()
    def step(tokens: np.ndarray, keep: int, new: int) -> np.ndarray:
        nonlocal cache
        ids, positions, mask = (torch.from_numpy(a) for a in _inputs(tokens, keep, new))
        logits, new_kv = model(ids, positions, mask, cache)
        cache = torch.cat([cache[..., :keep, :], new_kv], dim=-2)
        return logits.numpy()

    return step


def full_prefix_stepper(hf_model) -> StepLogits:
    """A causal LM needs no cache to be checked: recompute the whole prefix with transformers."""

    @torch.no_grad()
    def step(tokens: np.ndarray, keep: int, new: int) -> np.ndarray:
        ids, positions, mask = (torch.from_numpy(a) for a in _inputs(tokens, 0, keep + new))
        out = hf_model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False)
        return out.logits[:, keep:].float().numpy()

    return step


def reference_logits(reference: StepLogits, tokens: np.ndarray, steps) -> list[np.ndarray]:
    """The reference's logits for every step, computed up front: the export frees the PyTorch
    model before onnxruntime loads the graph, so the two never take memory at once."""
    return [reference(tokens, keep, new) for keep, new in steps]


def compare(graph: StepLogits, expected: list[np.ndarray], tokens: np.ndarray, steps, dtype: str,
            reference_name: str, tolerance: float | None = None) -> CheckResult:
    per_step, worst, scale = [], 0.0, 0.0
    for (keep, new), ref in zip(steps, expected):
        got = graph(tokens, keep, new)
        diff = float(np.abs(got.astype(np.float64) - ref).max())
        worst, scale = max(worst, diff), max(scale, float(np.abs(ref).max()))
        per_step.append({"past_len": keep, "seq_len": new, "max_abs_diff": diff})
    if tolerance is None:
        tolerance = RELATIVE_TOLERANCE[dtype] * max(1.0, scale)
    return CheckResult(worst, scale, tolerance, per_step, reference_name)


def load_transformers_reference(path: Path, dtype: torch.dtype):
    """The verifier as transformers itself implements it: an independent reference."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.eval()


def ort_session(onnx_path: Path):
    """A CPU session, or a CUDA one where the CPU provider lacks kernels for the graph's dtype
    (bf16). Returns (session, None) or (None, reason) when no installed provider can run it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Prepacking copies every matrix into the kernels' layout while the originals stay mapped: twice
    # the model in memory. The check is about the graph, not that layout, so it runs without.
    options.add_session_config_entry("session.disable_prepacking", "1")
    errors = []
    for provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
        if provider not in ort.get_available_providers():
            continue
        try:
            return ort.InferenceSession(str(onnx_path), options, providers=[provider]), None
        except Exception as exc:  # NOT_IMPLEMENTED and friends come as several exception types
            errors.append(f"{provider}: {str(exc).splitlines()[0][:200]}")
    return None, "no installed onnxruntime provider can run this graph (" + "; ".join(errors) + ")"
