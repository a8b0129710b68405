"""Properties of the runtime that the product promises, and its handling of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from apd_deploy import bundle as bundle_module
from apd_deploy.errors import BundleError, GenerationError
from apd_deploy.runtime import Runtime

CLI = str(Path(sys.executable).with_name("apd-deploy"))
PROMPT = [72, 101, 108, 108, 111]


def _with_manifest(tiny_bundle, tmp_path, edit):
    copy = shutil.copytree(tiny_bundle, tmp_path / "edited")
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("sampling", [{"temperature": 0.8}, {"temperature": 1.5, "top_p": 0.9}, {"temperature": 0.5, "top_k": 5}])
def test_r1_with_coupled_sampling_accepts_every_drafted_token(runtime_without_eos, sampling):
    M, n = 24, 100
    result = runtime_without_eos.generate(PROMPT, alg="apd", apd_mixture_weight=1.0, max_lookahead=M,
                                          max_new_tokens=n, seed=1, **sampling)
    assert result.accepted_per_step == [24, 24, 24, 24, 4]


def test_leftright_k1_commits_one_token_per_step(runtime_without_eos):
    result = runtime_without_eos.generate(PROMPT, alg="leftright", tokens_per_step=1, max_new_tokens=50)
    assert result.accepted_per_step == [1] * 50 and result.dllm_forwards == 50 and result.verifier_forwards == 0


@pytest.mark.parametrize("R, W, M, T", [(0.0, 16, 100, 0.0), (0.7, 16, 100, 0.0), (0.3, 1, 8, 1.0), (0.7, 4, 100, 0.7)])
def test_apd_commits_at_least_one_token_per_step(runtime_without_eos, R, W, M, T):
    result = runtime_without_eos.generate(PROMPT, alg="apd", apd_mixture_weight=R, kv_window=W, max_lookahead=M,
                                          temperature=T, seed=3, max_new_tokens=120)
    assert min(result.accepted_per_step) >= 1 and sum(result.accepted_per_step) == 120
    assert result.dllm_forwards == result.steps <= result.verifier_forwards  # verification comes in chunks


def test_apd_takes_fewer_steps_as_r_grows(runtime_without_eos):
    steps = [runtime_without_eos.generate(PROMPT, alg="apd", apd_mixture_weight=R, max_new_tokens=200).steps
             for R in (0.0, 0.9, 1.0)]
    assert steps[0] > steps[1] > steps[2] == 2


@pytest.mark.parametrize("alg", ["apd", "leftright", "ar", "diffusion"])
def test_output_stops_at_the_first_eos(runtime_without_eos, tiny_bundle, tmp_path, alg):
    full = runtime_without_eos.generate(PROMPT, alg=alg, max_new_tokens=80).token_ids
    eos = full[len(full) // 2]
    runtime = Runtime.load(_with_manifest(tiny_bundle, tmp_path, lambda m: m["special_tokens"].update(eos=[eos])))
    result = runtime.generate(PROMPT, alg=alg, max_new_tokens=80)
    assert result.token_ids == full[: full.index(eos) + 1]
    assert eos not in result.token_ids[:-1]


@pytest.mark.parametrize("alg", ["apd", "leftright", "ar", "diffusion"])
def test_same_seed_same_tokens_other_seed_other_tokens(runtime, alg):
    def run(seed):
        return runtime.generate(PROMPT, alg=alg, temperature=1.0, top_p=0.95, seed=seed, max_new_tokens=40).token_ids

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_unseeded_sampling_reports_its_seed(runtime):
    first = runtime.generate(PROMPT, temperature=1.0, max_new_tokens=30)
    assert first.seed is not None
    again = runtime.generate(PROMPT, temperature=1.0, max_new_tokens=30, seed=first.seed)
    assert again.token_ids == first.token_ids


def test_greedy_ignores_top_p_and_top_k(runtime):
    plain = runtime.generate(PROMPT, max_new_tokens=60).token_ids
    assert runtime.generate(PROMPT, max_new_tokens=60, top_p=0.5, top_k=3).token_ids == plain


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_text_stream_pieces_add_up_to_the_whole_decode(runtime, chunk):
    from apd_deploy.runtime.tokenizer import TextStream

    ids = runtime.tokenizer.encode("Héllo wörld, 3 + 4 = 7 ✓ 日本語 done", add_special_tokens=False)
    ids = ids + sorted(runtime.eos_ids)[:1] + ids[:3]
    pieces = TextStream(runtime.tokenizer)
    text = "".join(pieces.push(ids[i:i + chunk]) or "" for i in range(0, len(ids), chunk))
    assert text == runtime.tokenizer.decode(ids)
    assert "\ufffd" not in text


def test_stream_yields_each_committed_chunk(runtime):
    stream = runtime.stream("Hello", alg="apd", max_new_tokens=60)
    chunks = list(stream)
    steps = len(stream.result().accepted_per_step)
    assert [len(c.token_ids) for c in chunks[:steps]] == stream.result().accepted_per_step
    # After the steps, at most one chunk without tokens: text held back inside a last character.
    assert len(chunks) <= steps + 1 and all(not c.token_ids and c.text for c in chunks[steps:])
    assert sum((c.token_ids for c in chunks), []) == stream.result().token_ids
    assert "".join(c.text or "" for c in chunks) == stream.result().text


def test_diffusion_follows_its_step_budget(runtime_without_eos):
    for order in ("confidence", "entropy", "margin"):
        result = runtime_without_eos.generate(PROMPT, alg="diffusion", steps=8, diffusion_order=order, max_new_tokens=32)
        assert result.dllm_forwards == 8 and sum(result.accepted_per_step) == 32
        assert len(result.token_ids) == 32


def test_two_threads_share_one_runtime(runtime):
    requests = [dict(alg="apd", max_new_tokens=150), dict(alg="leftright", tokens_per_step=2, max_new_tokens=150),
                dict(alg="apd", temperature=0.9, seed=5, max_new_tokens=150), dict(alg="ar", max_new_tokens=100)]
    expected = [runtime.generate(PROMPT, **r).token_ids for r in requests]
    results = [None] * len(requests)

    def work(i):
        for _ in range(3):
            results[i] = runtime.generate(PROMPT, **requests[i]).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_chat_template_wraps_the_prompt(runtime):
    ids = runtime.prompt_ids("Hi", chat=True)
    text = runtime.tokenizer.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("params, message", [
    (dict(apd_mixture_weight=1.5), "apd_mixture_weight must be in \\[0, 1\\]"),
    (dict(apd_mixture_weight=-0.1), "apd_mixture_weight"),
    (dict(kv_window=0), "kv_window must be at least 1"),
    (dict(max_lookahead=0), "max_lookahead must be at least 1"),
    (dict(alg="leftright", tokens_per_step=0), "tokens_per_step must be at least 1"),
    (dict(alg="beam"), "alg must be one of"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_new_tokens=600), "exceeds the models' 512 positions"),
])
def test_bad_parameters_are_refused_before_any_work(runtime, params, message):
    with pytest.raises(GenerationError, match=message):
        runtime.generate(PROMPT, **params)


@pytest.mark.parametrize("prompt, message", [
    ([], "the prompt is empty"), ("", "the prompt is empty"), ([5, 300], "token id 300 is outside the vocabulary"),
    ([-1], "token id -1"), (list(range(200)) * 3, "the prompt alone is too long"),
])
def test_bad_prompts_are_refused(runtime, prompt, message):
    with pytest.raises(GenerationError, match=message):
        runtime.generate(prompt, max_new_tokens=1)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["special_tokens"].update(eos=[280]), "special_tokens.eos 280 is outside the verifier's vocabulary"),
    (lambda m: m["models"]["verifier"]["config"].update(vocab_size=300), "exceeds the dLLM's"),
    (lambda m: m["special_tokens"].update(mask=288), "special_tokens.mask 288"),
])
def test_incompatible_bundles_are_refused(tiny_bundle, tmp_path, edit, message):
    with pytest.raises(BundleError, match=message):
        Runtime.load(_with_manifest(tiny_bundle, tmp_path, edit))


def test_remembered_verification_hashes_each_file_version_once(tiny_bundle, tmp_path, monkeypatch):
    copy = shutil.copytree(tiny_bundle, tmp_path / "b")
    hashed = []
    real = bundle_module.sha256_file
    monkeypatch.setattr(bundle_module, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    bundle_module.read_manifest(copy, verify="remembered")
    assert "dllm.onnx" in hashed
    hashed.clear()
    bundle_module.read_manifest(copy, verify="remembered")
    assert hashed == []
    data = bytearray((copy / "dllm.onnx").read_bytes())
    data[-1] ^= 1
    (copy / "dllm.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="dllm.onnx: sha256 differs"):
        bundle_module.read_manifest(copy, verify="remembered")


def _cli(*args):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300, env={**os.environ})


def test_cli_generate_json(tiny_bundle):
    result = _cli("generate", str(tiny_bundle), "--prompt", "Hello", "--max-new-tokens", "30", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    keys = {"token_ids", "text", "steps", "accepted_per_step", "dllm_forwards", "verifier_forwards", "seconds", "tokens_per_second"}
    assert keys <= set(out)
    assert sum(out["accepted_per_step"]) == len(out["token_ids"]) and out["steps"] == len(out["accepted_per_step"])


def test_cli_generate_streams_plain_text_when_not_a_terminal(tiny_bundle, runtime):
    result = _cli("generate", str(tiny_bundle), "--prompt-ids", "72,101,108", "--alg", "leftright",
                  "--tokens-per-step", "2", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout
    assert result.stdout.rstrip("\n") == runtime.generate([72, 101, 108], alg="leftright", tokens_per_step=2,
                                                           max_new_tokens=12).text
    assert "[leftright]" in result.stderr and "tokens/s" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1,2,9999"], "outside the vocabulary"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "x" * 600], "the prompt alone is too long"),
])
def test_cli_errors_are_one_line(tiny_bundle, args, message):
    """What only the bundle can reveal: one line, exit status 1 (usage errors: tests/test_cli_options.py)."""
    result = _cli("generate", str(tiny_bundle), *args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and message in result.stderr and result.stdout == ""


def test_cli_refuses_an_incompatible_bundle(tiny_bundle, tmp_path):
    edited = _with_manifest(tiny_bundle, tmp_path, lambda m: m["special_tokens"].update(eos=[280]))
    result = _cli("generate", str(edited), "--prompt-ids", "1,2")
    assert result.returncode == 1 and result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_generation_never_imports_torch(tiny_bundle):
    code = (
        "import sys\n"
        "import apd_deploy.runtime\n"
        f"rt = apd_deploy.runtime.Runtime.load({str(tiny_bundle)!r})\n"
        "for alg in ('apd', 'leftright', 'diffusion', 'ar'):\n"
        "    rt.generate('Hello', alg=alg, max_new_tokens=20, temperature=0.5, top_p=0.9, seed=0)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
