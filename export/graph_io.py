"""The I/O of the exported graphs, described once as data.

The export call, the manifest and (through the manifest) every runtime binding are derived
from this table, so a name or an axis is changed in one place only.
"""

from __future__ import annotations

from typing import Any

from apd_deploy.export.config import ModelConfig

# Symbolic axes. The mask's length is its own axis: it equals past_len + seq_len at run time,
# but exporters want it declared independently. capacity: the length of the cache buffer handed
# over, of which the first total_len - seq_len positions are read. logit_len: how many window rows
# get logits (indices into the batch's window rows flattened, batch * seq_len of them).
DYNAMIC_AXES = ("batch", "seq_len", "total_len", "capacity", "logit_len")


def graph_io(cfg: ModelConfig, kv_dtype: str) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of a decoder graph: name, element type and shape (ints or axis names)."""
    layers, heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    return {
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq_len"]},
            {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq_len"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_len"]},
            {"name": "past_kv", "dtype": kv_dtype, "shape": ["batch", layers, 2, heads, "capacity", head_dim]},
            {"name": "logit_rows", "dtype": "int64", "shape": ["logit_len"]},
        ],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["logit_len", cfg.vocab_size]},
            {"name": "new_kv", "dtype": kv_dtype, "shape": ["batch", layers, 2, heads, "seq_len", head_dim]},
        ],
    }
