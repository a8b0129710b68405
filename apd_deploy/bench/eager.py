"""The APD loop as research code writes it, in PyTorch eager mode: one model call per step with a
growing KV cache that is concatenated and cropped, logits for every window position and the whole
vocabulary, and a top-p sort of the dLLM's distribution at every lookahead position every step
(even at temperature 0, where it cannot change the argmax). It is the baseline the runtime's
speed is measured against, on the same checkpoints, in the same process."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from apd_deploy.export.checkpoint import load_checkpoint


@dataclass
class EagerResult:
    token_ids: list[int]
    steps: int
    seconds: float


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(ordered, dim=-1)
    drop = probs.cumsum(-1) - probs >= top_p
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, ordered)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class EagerAPD:
    """`device` 'cuda' runs the loop on the GPU (the baseline for GPU engines), in the bundle's
    export `dtype`; fp32 matrix products there without TF32, as the CUDA engines run them."""

    def __init__(self, dllm_dir: str | Path, verifier_dir: str | Path, threads: int, device: str = "cpu",
                 dtype: str = "fp32") -> None:
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        self.dllm, self.verifier = (load_checkpoint(d, role, DTYPES[dtype]).model.to(self.device)
                                    for d, role in ((dllm_dir, "dllm"), (verifier_dir, "verifier")))

    def _call(self, model, tokens: torch.Tensor, start: int, cache: torch.Tensor):
        positions = torch.arange(start, start + tokens.shape[0], device=self.device)[None]
        mask = torch.ones(1, start + tokens.shape[0], dtype=torch.int64, device=self.device)
        logits, kv = model(tokens[None], positions, mask, cache)
        return logits[0], torch.cat([cache, kv], dim=-2)

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, mixture_weight: float, kv_window: int,
                 max_lookahead: int, mask_id: int, eos_ids: frozenset[int], top_p: float = 0.95) -> EagerResult:
        started = time.perf_counter()
        vocab = self.verifier.config.vocab_size
        p0, end = len(prompt), len(prompt) + max_new_tokens
        x = torch.full((end,), mask_id, dtype=torch.int64, device=self.device)
        x[:p0] = torch.tensor(prompt, device=self.device)
        curr, accepted, steps = p0, 0, 0
        dllm_cache, ar_cache, saved = (self.dllm.empty_cache(1).to(self.device), self.verifier.empty_cache(1).to(self.device),
                                       None)
        while curr < end:
            right = min(curr + max_lookahead, end)
            left = 0 if steps == 0 else max(curr - kv_window - accepted + 1, 0)
            logits, dllm_cache = self._call(self.dllm, x[left:right], left, dllm_cache[..., :left, :])
            logits = torch.cat([logits[:1], logits[:-1]])[curr - left : right - left, :vocab]
            draft = _top_p(logits, top_p).argmax(-1)
            if steps == 0:
                fed = torch.cat([x[:curr], draft])
                ar_logits, ar_cache = self._call(self.verifier, fed, 0, ar_cache)
                ar, offset = ar_logits[curr - 1 : right - 1], 0
            else:
                ar_logits, ar_cache = self._call(self.verifier, draft, curr, ar_cache)
                ar, offset = torch.cat([saved[None], ar_logits[:-1]]), curr
            target = (mixture_weight * torch.log_softmax(logits, -1)
                      + (1 - mixture_weight) * torch.log_softmax(ar[:, :vocab], -1)).argmax(-1)
            accepted = 1
            while accepted < len(draft) and draft[accepted] == target[accepted]:
                accepted += 1
            x[curr : curr + accepted] = draft[:accepted]
            ar_cache = ar_cache[..., : curr + accepted, :]
            saved = ar_logits[curr + accepted - 1 - offset]
            curr += accepted
            steps += 1
            if any(int(t) in eos_ids for t in x[p0:curr]):
                break
        tokens = x[p0:curr].tolist()  # on a GPU, waits for the last step
        first_eos = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        return EagerResult(tokens if first_eos is None else tokens[: first_eos + 1], steps, time.perf_counter() - started)
