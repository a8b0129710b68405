"""A deliberately naive PyTorch implementation of the decoding algorithms, written from
docs/apd.md line by line (torch tensors, caches concatenated and cropped, prefixes
recomputed), on the PyTorch models of the export step. The runtime must match it token for
token at temperature 0. Shares no code with the runtime."""

from __future__ import annotations

import torch


def _forward(model, tokens, start, cache):
    """Run `tokens` [n] at positions start.. over `cache`; returns logits [n, V] and the new cache."""
    n = tokens.shape[0]
    positions = torch.arange(start, start + n)[None]
    mask = torch.ones(1, start + n, dtype=torch.int64)
    with torch.no_grad():
        logits, kv = model(tokens[None], positions, mask, cache)
    return logits[0], torch.cat([cache, kv], dim=-2)


def _truncate_at_eos(tokens, eos_ids):
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


def reference_apd(dllm, verifier, prompt, max_new_tokens, R, W, M, mask_id, eos_ids):
    vocab = verifier.config.vocab_size
    P0 = len(prompt)
    L = P0 + max_new_tokens
    x = torch.full((L,), mask_id, dtype=torch.int64)
    x[:P0] = torch.tensor(prompt)
    curr, a, first = P0, 0, True
    dllm_cache = dllm.empty_cache(1)
    ar_cache = verifier.empty_cache(1)
    saved = None
    while curr < L:
        # 1-3: window and dLLM forward over the cache of [0, left)
        right = min(curr + M, L)
        left = 0 if first else max(curr - W - a + 1, 0)
        dllm_cache = dllm_cache[..., :left, :]
        logits, dllm_cache = _forward(dllm, x[left:right], left, dllm_cache)
        logits = torch.cat([logits[:1], logits[:-1]])  # shifted: row j-1 predicts j
        dllm_logits = logits[curr - left : right - left, :vocab]
        # 4: draft
        x0 = dllm_logits.argmax(-1)
        # 5: verifier
        if first:
            seq = x[:right].clone()
            seq[curr:right] = x0
            ar_logits, ar_cache = _forward(verifier, seq, 0, ar_cache)
            ar = ar_logits[curr - 1 : right - 1]
            offset = 0
        else:
            ar_logits, ar_cache = _forward(verifier, x0, curr, ar_cache)
            ar = torch.cat([saved[None], ar_logits[:-1]])
            offset = curr
        # 6: mixture target, longest agreeing prefix, first always accepted
        target = (R * dllm_logits + (1 - R) * ar[:, :vocab]).argmax(-1)
        a = 1
        while a < len(x0) and x0[a] == target[a]:
            a += 1
        # 7: commit, crop, save the prediction for curr + a
        x[curr : curr + a] = x0[:a]
        ar_cache = ar_cache[..., : curr + a, :]
        saved = ar_logits[curr + a - 1 - offset]
        curr += a
        first = False
        # 8: stop at EOS in the generated part
        if any(int(t) in eos_ids for t in x[P0:curr]):
            break
    return _truncate_at_eos(x[P0:curr].tolist(), eos_ids)


def reference_leftright(dllm, prompt, max_new_tokens, K, W, M, mask_id, eos_ids, vocab):
    P0 = len(prompt)
    L = P0 + max_new_tokens
    x = torch.full((L,), mask_id, dtype=torch.int64)
    x[:P0] = torch.tensor(prompt)
    curr, a, first = P0, 0, True
    cache = dllm.empty_cache(1)
    while curr < L:
        right = min(curr + M, L)
        left = 0 if first else max(curr - W - a + 1, 0)
        cache = cache[..., :left, :]
        logits, cache = _forward(dllm, x[left:right], left, cache)
        logits = torch.cat([logits[:1], logits[:-1]])
        a = min(K, right - curr)
        x[curr : curr + a] = logits[curr - left : curr - left + a, :vocab].argmax(-1)
        curr += a
        first = False
        if any(int(t) in eos_ids for t in x[P0:curr]):
            break
    return _truncate_at_eos(x[P0:curr].tolist(), eos_ids)


def reference_ar(verifier, prompt, max_new_tokens, eos_ids):
    """No cache at all: the whole prefix every token."""
    vocab = verifier.config.vocab_size
    seq = list(prompt)
    for _ in range(max_new_tokens):
        logits, _ = _forward(verifier, torch.tensor(seq), 0, verifier.empty_cache(1))
        seq.append(int(logits[-1, :vocab].argmax()))
        if seq[-1] in eos_ids:
            break
    return seq[len(prompt):]
