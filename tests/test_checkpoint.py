"""Loading checkpoint directories: the real layouts, and clear errors for everything else."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from apd_deploy.errors import CheckpointError
from apd_deploy.export.checkpoint import load_checkpoint
from apd_deploy.export.pipeline import export_bundle
from checkpoints import checkpoint_from_config, fixture_config, shard


def test_tiny_pair_has_the_features_of_real_pairs(tiny_pair):
    dllm = load_checkpoint(tiny_pair / "dllm", "dllm")
    verifier = load_checkpoint(tiny_pair / "verifier", "verifier")
    for ckpt in (dllm, verifier):
        assert ckpt.config.num_key_value_heads < ckpt.config.num_attention_heads  # GQA
        assert ckpt.model.qkv_bias
    assert verifier.model.lm_head.weight is verifier.model.model.embed_tokens.weight
    assert dllm.config.vocab_size > verifier.config.vocab_size
    assert not dllm.config.causal and verifier.config.causal
    assert dllm.config.mask_token_id < verifier.config.vocab_size
    assert (tiny_pair / "dllm" / "tokenizer.json").is_file()


def test_tiny_models_do_not_repeat_one_token(tiny_pair):
    ckpt = load_checkpoint(tiny_pair / "verifier", "verifier")
    ids = torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        logits, _ = ckpt.model(ids, ids, torch.ones_like(ids), ckpt.model.empty_cache(1))
    assert len(set(logits.argmax(-1)[0].tolist())) > 10


def _transformers_causal_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


@pytest.mark.parametrize("model_type, qkv_bias", [("qwen2", True), ("llama", False)])
def test_own_decoder_matches_transformers(tmp_path, model_type, qkv_bias):
    config = fixture_config("qwen2-verifier-config.json") | {"model_type": model_type}
    if model_type == "llama":
        config |= {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "tie_word_embeddings": False}
    path = checkpoint_from_config(tmp_path / model_type, config, qkv_bias=qkv_bias)
    ours = load_checkpoint(path, "verifier").model
    ids = torch.randint(0, config["vocab_size"], (2, 9))
    positions = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        logits, _ = ours(ids, positions, torch.ones_like(ids), ours.empty_cache(2))
        expected = _transformers_causal_lm(path)(input_ids=ids, position_ids=positions).logits
    assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()


def test_dream_layout_is_qwen2_with_bidirectional_attention(tmp_path):
    """Dream's weights run through Qwen2's math; only the mask differs."""
    config = fixture_config("dream-config.json")
    path = checkpoint_from_config(tmp_path / "dream", config)
    dream = load_checkpoint(path, "dllm").model
    as_qwen2 = json.loads((path / "config.json").read_text()) | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    (path / "config.json").write_text(json.dumps(as_qwen2))
    causal = load_checkpoint(path, "verifier").model
    ids = torch.randint(0, config["vocab_size"], (1, 8))
    positions = torch.arange(8)[None]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = _transformers_causal_lm(path)(input_ids=ids, position_ids=positions).logits
        assert torch.allclose(causal(ids, positions, mask, causal.empty_cache(1))[0], expected, atol=1e-4)
        bidirectional, _ = dream(ids, positions, mask, dream.empty_cache(1))
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % config["vocab_size"]
        after, _ = dream(changed, positions, mask, dream.empty_cache(1))
    assert not torch.allclose(bidirectional[0, 0], expected[0, 0], atol=1e-3)
    assert not torch.allclose(after[0, 0], bidirectional[0, 0])  # position 0 sees the last token


def test_sharded_checkpoint_with_index_loads_the_same(tiny_pair, tmp_path):
    single = load_checkpoint(tiny_pair / "dllm", "dllm").model.state_dict()
    sharded = load_checkpoint(shard(tiny_pair / "dllm", tmp_path / "sharded", parts=3), "dllm").model.state_dict()
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_loads_in_half_precision(tiny_pair):
    model = load_checkpoint(tiny_pair / "dllm", "dllm", dtype=torch.float16).model
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "breakage, role, message",
    [
        (lambda d: shutil.rmtree(d), "dllm", "not a directory"),
        (lambda d: (d / "config.json").unlink(), "dllm", "no config.json"),
        (lambda d: (d / "config.json").write_text("{not json"), "dllm", "not valid JSON"),
        (lambda d: (d / "model.safetensors").unlink(), "dllm", "no weights found"),
        (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 10), "dllm", "cannot read weights"),
        (lambda d: _edit(d, model_type="gpt2"), "dllm", "field 'model_type' is 'gpt2'"),
        (lambda d: _edit(d, hidden_size=96), "dllm", "has shape"),
        (lambda d: _edit(d, vocab_size=None), "dllm", "field 'vocab_size' is missing"),
        (lambda d: _edit(d, mask_token_id=None), "dllm", "field 'mask_token_id' is missing"),
        (lambda d: _edit(d, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "dllm", "rope type 'yarn'"),
        (lambda d: _edit(d, num_key_value_heads=3), "dllm", "not a multiple"),
        (lambda d: None, "verifier", "model_type' is 'Dream'"),
    ],
    ids=["missing-dir", "no-config", "garbled-config", "no-weights", "garbled-weights", "unsupported-model-type",
         "wrong-shapes", "missing-field", "no-mask-token", "rope-scaling", "bad-gqa", "dream-as-verifier"],
)
def test_bad_checkpoints_get_a_clear_error_and_export_writes_nothing(tiny_pair, tmp_path, breakage, role, message):
    directory = _copy(tiny_pair / "dllm", tmp_path / "ckpt")
    breakage(directory)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(directory, role)
    assert str(directory) in str(info.value)
    out = tmp_path / "out"
    out.mkdir()
    pair = {"dllm": tiny_pair / "dllm", "verifier": tiny_pair / "verifier", role: directory}
    with pytest.raises(CheckpointError, match=message):
        export_bundle(pair["dllm"], pair["verifier"], out / "bundle")
    assert list(out.iterdir()) == []


def _edit(directory, **fields):
    config = json.loads((directory / "config.json").read_text())
    for key, value in fields.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


def test_pickled_weights_are_refused_unless_allowed(tiny_pair, tmp_path):
    from safetensors.torch import load_file

    directory = _copy(tiny_pair / "verifier", tmp_path / "bin")
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_checkpoint(directory, "verifier")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        export_bundle(tiny_pair / "dllm", directory, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    loaded = load_checkpoint(directory, "verifier", allow_pickle=True).model
    reference = load_checkpoint(tiny_pair / "verifier", "verifier").model
    assert torch.equal(loaded.model.embed_tokens.weight, reference.model.embed_tokens.weight)


def test_index_naming_a_missing_shard_is_an_error(tiny_pair, tmp_path):
    directory = shard(tiny_pair / "dllm", tmp_path / "sharded")
    next(directory.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(directory, "dllm")
