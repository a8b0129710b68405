"""TensorRT optimisation profiles, derived from the model and the APD parameters.

The shapes each graph sees during decoding are known in advance:
- the first step (prefill) feeds a whole window from an empty cache: the dLLM gets the prompt
  plus M lookahead positions (Dream's own diffusion decoding: the whole canvas), the verifier
  the prompt plus the draft;
- later steps (steady state) feed the dLLM the last W committed positions, the up to M just
  accepted, and M lookahead positions (at most W + 2M - 1) over a cache of any length, and the
  verifier at most M drafted tokens (1 for AR decoding) over a cache of at least one position.
Two profiles, one per regime, let TensorRT tune kernels for the short steady-state windows
instead of for the longest possible prefill. Logits are asked for at most M + 1 rows per request
(`max_logit_rows`): the dLLM's M lookahead rows, the verifier's draft plus the prompt's last row;
a batched call asks for the rows of all its requests, so `logit_len` grows with the batch.
TensorRT reserves memory for the largest shape of a profile, and logits for a whole prefill window
would not fit: [32768, 152064] in fp32 is 19.9 GB.

The activations TensorRT reserves are estimated at build time (`activation_bytes`) with this model:
the exported attention materialises its scores in fp32, [batch, kv_heads, group, S, T] (S the
window, T = past + S), and SCORE_COPIES of them are alive at once in a layer (the scaled scores cast
to fp32, the masked ones, the softmax); layers run one after another, so one layer's copies bound
the peak. The logits [rows, vocab] in fp32 come on top. At Dream-7B's widths (28 query heads) one
copy at a 4096-token prefill is 1.88 GB; the batch and the past multiply it. `--opt-window` only
chooses the shapes kernels are tuned for; TensorRT reserves memory for the largest ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

Range = tuple[int, int, int]  # (min, opt, max)
SCORE_COPIES = 3


@dataclass(frozen=True)
class Profile:
    name: str
    batch: Range
    seq_len: Range
    past_len: Range
    logit_len: Range
    capacity: Range  # the cache buffer handed over: prompt + new tokens of the request

    def input_shapes(self, kv_dims: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shape of every graph input under this profile."""
        layers, kv_heads, head_dim = kv_dims
        total = tuple(s + p for s, p in zip(self.seq_len, self.past_len))
        per_point = range(3)
        return {
            "input_ids": tuple((self.batch[i], self.seq_len[i]) for i in per_point),
            "position_ids": tuple((self.batch[i], self.seq_len[i]) for i in per_point),
            "attention_mask": tuple((self.batch[i], total[i]) for i in per_point),
            "past_kv": tuple((self.batch[i], layers, 2, kv_heads, self.capacity[i], head_dim) for i in per_point),
            "logit_rows": tuple((self.logit_len[i],) for i in per_point),
        }

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def activation_bytes(profile: Profile, config: dict) -> int:
    """Estimated activation memory of one model's engine at `profile`'s largest shapes (model above)."""
    batch, window, past = profile.batch[2], profile.seq_len[2], profile.past_len[2]
    scores = 4 * batch * config["num_attention_heads"] * window * (past + window)
    return SCORE_COPIES * scores + 4 * profile.logit_len[2] * config["vocab_size"]


def _range(low: int, opt: int, high: int) -> Range:
    return (low, min(max(opt, low), high), high)


def derive_profiles(role: str, max_seq_len: int, kv_window: int, max_lookahead: int,
                    max_batch: int = 1, opt_window: int | None = None,
                    max_logit_rows: int | None = None) -> list[Profile]:
    """Steady state first: the runtime picks the first profile that holds a call."""
    batch = _range(1, 1, max_batch)
    rows = min(max_logit_rows or max_lookahead + 1, max_seq_len)  # per request
    capacity = _range(1, max_seq_len // 2, max_seq_len)
    if role == "dllm":
        steady_window = min(kv_window + 2 * max_lookahead - 1, max_seq_len)
        opt = opt_window or kv_window + max_lookahead
        steady = Profile("steady", batch, _range(1, opt, steady_window), _range(0, max_seq_len // 2, max_seq_len - 1),
                         _range(1, max_lookahead, min(rows, steady_window) * max_batch), capacity)
    else:
        steady_window = min(max_lookahead, max_seq_len - 1)
        opt = opt_window or max_lookahead
        steady = Profile("steady", batch, _range(1, opt, steady_window), _range(1, max_seq_len // 2, max_seq_len - 1),
                         _range(1, opt, min(rows, steady_window) * max_batch), capacity)
    # In a batch a request's prefill shares the call with requests that have a cache.
    prefill_past = (0, 0, 0) if max_batch == 1 else (0, 0, max_seq_len - 1)
    prefill = Profile("prefill", batch, _range(1, max_lookahead + 128, max_seq_len), prefill_past,
                      _range(1, max_lookahead, rows * max_batch), capacity)
    return [steady, prefill]
