"""The runtime on onnxruntime produces exactly the tokens of the naive PyTorch reference at T=0."""

from __future__ import annotations

import pytest

from apd_deploy.export.checkpoint import load_checkpoint
from reference_decoding import reference_apd, reference_ar, reference_leftright

# (prompt, max_new_tokens): a one-token prompt, short and long prompts, up to the 512 positions.
CASES = [([7], 40), ([72, 101, 108, 108, 111], 96), (list(range(30, 47)), 495)]
APD_SETTINGS = [  # (R, W, M)
    (0.7, 16, 100), (0.5, 4, 16), (0.7, 1, 100), (0.7, 16, 1), (0.9, 1, 1), (0.0, 16, 100), (1.0, 16, 100),
]


@pytest.fixture(scope="module")
def torch_models(tiny_pair):
    return load_checkpoint(tiny_pair / "dllm", "dllm").model, load_checkpoint(tiny_pair / "verifier", "verifier").model


@pytest.mark.parametrize("R, W, M", APD_SETTINGS)
@pytest.mark.parametrize("prompt, n", CASES, ids=["p1", "p5", "p17-max"])
def test_apd_matches_reference(runtime, torch_models, prompt, n, R, W, M):
    dllm, verifier = torch_models
    expected = reference_apd(dllm, verifier, prompt, n, R, W, M, runtime.mask_id, runtime.eos_ids)
    result = runtime.generate(prompt, alg="apd", max_new_tokens=n, apd_mixture_weight=R, kv_window=W, max_lookahead=M)
    assert result.token_ids == expected
    assert sum(result.accepted_per_step) == len(expected)


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("prompt, n", CASES, ids=["p1", "p5", "p17-max"])
def test_leftright_matches_reference(runtime, torch_models, prompt, n, K):
    dllm, _ = torch_models
    expected = reference_leftright(dllm, prompt, n, K, 16, 100, runtime.mask_id, runtime.eos_ids, runtime.vocab_size)
    result = runtime.generate(prompt, alg="leftright", max_new_tokens=n, tokens_per_step=K)
    assert result.token_ids == expected


@pytest.mark.parametrize("prompt, n", CASES[:2], ids=["p1", "p5"])
def test_ar_matches_reference(runtime, torch_models, prompt, n):
    _, verifier = torch_models
    assert runtime.generate(prompt, alg="ar", max_new_tokens=n).token_ids == reference_ar(verifier, prompt, n, runtime.eos_ids)


@pytest.mark.parametrize("alg, settings", [
    ("apd", {"apd_mixture_weight": 0.7, "kv_window": 16, "max_lookahead": 100}),
    ("apd", {"apd_mixture_weight": 0.3, "kv_window": 2, "max_lookahead": 37}),
    ("leftright", {"tokens_per_step": 4}),
])
def test_full_length_to_the_maximum_position(runtime_without_eos, torch_models, alg, settings):
    dllm, verifier = torch_models
    prompt, n = [3, 1, 4, 1, 5], 507  # 5 + 507 = the models' 512 positions
    result = runtime_without_eos.generate(prompt, alg=alg, max_new_tokens=n, **settings)
    if alg == "apd":
        expected = reference_apd(dllm, verifier, prompt, n, settings["apd_mixture_weight"], settings["kv_window"],
                                 settings["max_lookahead"], runtime_without_eos.mask_id, set())
    else:
        expected = reference_leftright(dllm, prompt, n, 4, 16, 100, runtime_without_eos.mask_id, set(), 272)
    assert len(result.token_ids) == n
    assert result.token_ids == expected
