"""The command line's options: ranges, usage errors, help, defaults."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from apd_deploy.cli import cli, main
from apd_deploy.runtime import Runtime

CLI_DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
MY_COMMANDS = ("generate", "eval", "bench", "build-engine", "serve", "bench-serve")
NO_BUNDLE = "no-such-bundle"  # usage errors are found before a bundle is opened


def run(*args: str) -> tuple[int, str, str]:
    """The console entry point in-process: exit status, stdout, stderr."""
    with CliRunner().isolation() as (out, err, _):
        with pytest.raises(SystemExit) as exited:
            main(list(args))
    return exited.value.code, out.getvalue().decode(), err.getvalue().decode()


def assert_usage_error(code: int, out: str, err: str, message: str) -> None:
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith("Usage: apd-deploy ") and lines[1].startswith("Try 'apd-deploy ")
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]]
    assert message in lines[-1], lines[-1]


# Every integer option is range-checked before any work.
@pytest.mark.parametrize("args, flag", [
    (["generate", NO_BUNDLE, "--prompt-ids", "1", "--seed", "-1"], "--seed"),
    (["generate", NO_BUNDLE, "--prompt-ids", "1", "--seed", str(2**63)], "--seed"),
    (["generate", NO_BUNDLE, "--prompt-ids", "1", "--kv-window", "0"], "--kv-window"),
    (["generate", NO_BUNDLE, "--prompt-ids", "1", "--max-lookahead", "0"], "--max-lookahead"),
    (["generate", NO_BUNDLE, "--prompt-ids", "1", "--tokens-per-step", "0"], "--tokens-per-step"),
    (["generate", NO_BUNDLE, "--prompt-ids", "1", "--steps", "0"], "--steps"),
    (["generate", NO_BUNDLE, "--prompt-ids", "1", "--top-k", "0"], "--top-k"),
    (["generate", NO_BUNDLE, "--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", NO_BUNDLE, "--prompt-ids", "1", "--threads", "0"], "--threads"),
    (["eval", NO_BUNDLE, "--n", "0"], "--n"),
    (["eval", NO_BUNDLE, "--seed", "-1"], "--seed"),
    (["eval", NO_BUNDLE, "--kv-window", "-3"], "--kv-window"),
    (["eval", NO_BUNDLE, "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", NO_BUNDLE, "--threads", "-1"], "--threads"),
    (["bench", NO_BUNDLE, "--random-prompts", "0"], "--random-prompts"),
    (["bench", NO_BUNDLE, "--random-prompts", "1", "--repeat", "0"], "--repeat"),
    (["bench", NO_BUNDLE, "--task", "arithmetic", "--n", "0"], "--n"),
    (["bench", NO_BUNDLE, "--random-prompts", "1", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["bench", NO_BUNDLE, "--random-prompts", "1", "--threads", "0"], "--threads"),
    (["build-engine", NO_BUNDLE, "--backend", "onnxruntime", "--max-batch", "0"], "--max-batch"),
    (["build-engine", NO_BUNDLE, "--backend", "tensorrt", "--max-seq-len", "1"], "--max-seq-len"),
    (["build-engine", NO_BUNDLE, "--backend", "tensorrt", "--opt-window", "0"], "--opt-window"),
])
def test_integer_options_out_of_range_are_usage_errors(args, flag):
    assert_usage_error(*run(*args), f"'{flag}'")


@pytest.mark.parametrize("params, message", [
    (dict(seed=-1), "seed must be at least 0, got -1"),
    (dict(seed=2**63), "seed must be at most"),
    (dict(seed=1.5, temperature=0.5), "seed must be an integer, got 1.5"),
    (dict(kv_window=2.5), "kv_window must be an integer"),
    (dict(max_lookahead=True), "max_lookahead must be an integer, got True"),
    (dict(top_k=0, temperature=1.0), "top_k must be at least 1"),
    (dict(steps=0, alg="diffusion"), "steps must be at least 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(max_new_tokens="8"), "max_new_tokens must be an integer, got '8'"),
])
def test_python_api_range_checks_integers(runtime, params, message):
    from apd_deploy.errors import GenerationError

    with pytest.raises(GenerationError, match=re.escape(message)):
        runtime.generate([72, 101], **params)


def test_an_error_names_the_parameter_as_each_caller_does(runtime, tiny_bundle):
    """The keyword in Python, the flag on the command line (the server's field: test_server)."""
    from apd_deploy.errors import GenerationError

    with pytest.raises(GenerationError) as caught:
        runtime.generate([72, 101], alg="diffusion", steps=9, max_new_tokens=4)
    assert str(caught.value) == "steps 9 is more than the 4 new tokens to decide (max_new_tokens); use steps 4 or less"
    assert caught.value.param == "steps"
    code, _, err = run("generate", str(tiny_bundle), "--prompt-ids", "72," * 510 + "72", "--max-new-tokens", "2")
    assert code == 1 and err == ("error: prompt of 511 tokens + --max-new-tokens 2 exceeds the models' 512 positions; "
                                 "use --max-new-tokens 1 or less\n")


def test_options_come_from_the_parameter_table():
    from apd_deploy.runtime.params import PARAMS

    options = {p.name: p for p in cli.commands["generate"].params}
    for param in PARAMS:
        if param.flag:
            assert options[param.name].opts == [param.flag] and options[param.name].help.startswith(param.help)
            assert f"[default: {param.default_help or ''}" in options[param.name].help


def test_commands_receive_parsed_values():
    from apd_deploy.evaluation import AlgSpec

    bench = cli.commands["bench"].make_context("bench", [NO_BUNDLE, "--random-prompts", "1", "--concurrency", "4,1",
                                                         "--algs", "leftright:4", "--sweep", "kv_window=4,8"])
    assert bench.params["levels"] == [1, 4] and bench.params["algs"] == [AlgSpec("leftright:4", "leftright",
                                                                                   {"tokens_per_step": 4})]
    assert bench.params["sweeps"] == (("kv_window", [4, 8]),)
    serve = cli.commands["serve"].make_context("serve", [NO_BUNDLE, "--ray", "--autoscale", "1:3"])
    assert serve.params["autoscale"] == (1, 3)


def test_python_api_range_checks_threads(tiny_bundle):
    from apd_deploy.errors import GenerationError

    with pytest.raises(GenerationError, match="threads must be at least 1, got 0"):
        Runtime.load(tiny_bundle, threads=0)


# Floats must be finite; token id lists well formed.
@pytest.mark.parametrize("args, flag", [
    (["--temperature", "inf"], "--temperature"), (["--temperature", "nan"], "--temperature"),
    (["--top-p", "nan"], "--top-p"), (["--top-p", "0"], "--top-p"),
    (["--apd-mixture-weight", "nan"], "--apd-mixture-weight"), (["--apd-mixture-weight", "1.5"], "--apd-mixture-weight"),
])
def test_floats_must_be_finite_and_in_range(args, flag):
    assert_usage_error(*run("generate", NO_BUNDLE, "--prompt-ids", "1", *args), f"'{flag}'")
    assert_usage_error(*run("eval", NO_BUNDLE, *args), f"'{flag}'")


@pytest.mark.parametrize("ids, message", [
    ("1,,2", "item 2 is empty"), ("1,2,", "item 3 is empty"), (",1", "item 1 is empty"), ("", "item 1 is empty"),
    ("1;2", "item 1 is '1;2', not a token id"), ("1,-2", "item 2 is '-2'"), ("1,x", "item 2 is 'x'"),
    ("1.5", "item 1 is '1.5'"),
])
def test_prompt_ids_must_be_well_formed(ids, message):
    assert_usage_error(*run("generate", NO_BUNDLE, "--prompt-ids", ids), message)


def test_prompt_ids_allow_spaces(runtime, tiny_bundle):
    code, out, err = run("generate", str(tiny_bundle), "--prompt-ids", "72, 101 ,108", "--max-new-tokens", "4",
                         "--alg", "ar")
    assert code == 0, err
    assert out.rstrip("\n") == runtime.generate([72, 101, 108], alg="ar", max_new_tokens=4).text


@pytest.mark.parametrize("params, message", [
    (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
    (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
    (dict(temperature="hot"), "temperature must be a finite number, got 'hot'"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p must be a finite number"),
    (dict(apd_mixture_weight=float("inf")), "apd_mixture_weight must be a finite number"),
])
def test_python_api_refuses_non_finite_floats(runtime, params, message):
    from apd_deploy.errors import GenerationError

    with pytest.raises(GenerationError, match=re.escape(message)):
        runtime.generate([72, 101], **params)


# Usage errors: exit status 2 with the usage line, everywhere; -h is help.
@pytest.mark.parametrize("args, message", [
    (["build-engine", NO_BUNDLE, "--backend", "foo"], "'--backend'"),
    (["build-engine", NO_BUNDLE, "--backend", "onnxruntime", "--precision", "fp8"], "'--precision'"),
    (["build-engine", NO_BUNDLE, "--backend", "tensorrt", "--device", "cpu"], "the tensorrt backend runs on cuda"),
    (["generate", NO_BUNDLE, "--prompt-ids", "1", "--alg", "foo"], "'--alg'"),
    (["generate", NO_BUNDLE, "--prompt-ids", "1", "--diffusion-order", "foo"], "'--diffusion-order'"),
    (["generate", NO_BUNDLE, "--prompt", "Hi", "--prompt-ids", "1"], "give exactly one of --prompt TEXT or --prompt-ids"),
    (["generate", NO_BUNDLE], "give exactly one of --prompt TEXT or --prompt-ids"),
    (["generate", NO_BUNDLE, "--prompt-ids", "1", "--chat"], "--chat wraps a text prompt"),
    (["generate", NO_BUNDLE, "--prompt-ids", "1", "--verify", "sometimes"], "'--verify'"),
    (["eval", NO_BUNDLE, "--task", "poetry"], "'--task'"),
    (["eval", NO_BUNDLE, "--split", "dev"], "'--split'"),
    (["bench", NO_BUNDLE], "give exactly one of --task, --prompts FILE or --random-prompts N"),
    (["bench", NO_BUNDLE, "--random-prompts", "1", "--task", "arithmetic"], "give exactly one of"),
    (["bench", NO_BUNDLE, "--prompts", "no-such-file.txt"], "'--prompts'"),
    (["bench", NO_BUNDLE, "--random-prompts", "1", "--sweep", "kv_window=0,4"], "--sweep 'kv_window=0,4': --kv-window must be at least 1"),
    (["bench", NO_BUNDLE, "--random-prompts", "1", "--sweep", "temperature=1"], "--sweep 'temperature=1'"),
    (["bench", NO_BUNDLE, "--random-prompts", "1", "--algs", "apd,beam"], "--algs: 'beam' is not understood"),
    (["generate"], "Missing argument 'BUNDLE'"),
    (["generate", NO_BUNDLE, "--no-such-option"], "No such option '--no-such-option'"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_usage_errors_exit_2_with_the_usage_line(args, message):
    assert_usage_error(*run(*args), message)


@pytest.mark.parametrize("command", [[], *([name] for name in sorted(cli.commands))])
def test_dash_h_is_help(command):
    code, out, _ = run(*command, "-h")
    assert code == 0 and out.startswith("Usage: apd-deploy") and "-h, --help" in out


def test_runtime_errors_exit_1_with_one_line(tiny_bundle):
    code, out, err = run("generate", str(tiny_bundle), "--prompt-ids", "1,2,9999")
    assert code == 1 and out == "" and err.strip().splitlines() == ["error: prompt token id 9999 is outside the vocabulary [0, 272)"]


# The default --max-new-tokens fits the prompt; a prompt that leaves no room says so.
def test_default_max_new_tokens_fits_what_the_prompt_leaves(runtime_without_eos):
    assert len(runtime_without_eos.generate([5] * 500, alg="ar").token_ids) == 12  # 512 positions
    assert len(runtime_without_eos.generate([5, 6], alg="ar").token_ids) == 128  # the cap


def test_a_prompt_that_leaves_no_room_is_called_too_long(tiny_bundle):
    code, _, err = run("generate", str(tiny_bundle), "--prompt-ids", ",".join(["5"] * 512))
    assert code == 1
    assert err.strip() == ("error: the prompt alone is too long: its 512 tokens leave no room for new tokens in "
                           "the models' 512 positions; shorten it to at most 511 tokens")
    code, _, err = run("generate", str(tiny_bundle), "--prompt-ids", ",".join(["5"] * 511), "--max-new-tokens", "2")
    assert code == 1 and "use --max-new-tokens 1 or less" in err


# Diffusion steps beyond the new tokens are refused (not clamped: see docs/apd.md).
def test_more_diffusion_steps_than_new_tokens_are_refused(runtime, tiny_bundle):
    from apd_deploy.errors import GenerationError

    code, _, err = run("generate", str(tiny_bundle), "--prompt-ids", "1,2", "--alg", "diffusion", "--steps", "975",
                       "--max-new-tokens", "2")
    assert code == 1
    assert err.strip() == ("error: --steps 975 is more than the 2 new tokens to decide (--max-new-tokens); "
                           "use --steps 2 or less")
    with pytest.raises(GenerationError, match="steps 13 is more than the 12 new tokens"):  # the default fits 12
        runtime.generate([5] * 500, alg="diffusion", steps=13)
    assert runtime.generate([5, 6], alg="diffusion", steps=8, max_new_tokens=8).dllm_forwards <= 8
    assert runtime.generate([5, 6], alg="apd", steps=975, max_new_tokens=2).steps <= 2  # --steps is diffusion's only


# eval checks every argument before it starts solving.
@pytest.mark.parametrize("args, message, code", [
    (["--algs", "foo"], "--algs: 'foo' is not understood", 2),
    (["--algs", "apd,leftright:x"], "--algs: 'leftright:x' is not understood", 2),
    (["--algs", "apd:3"], "--algs: 'apd:3' is not understood", 2),
    (["--algs", ","], "--algs is empty", 2),
    (["--algs", "diffusion:50", "--max-new-tokens", "32"], "--algs 'diffusion:50': --steps 50 is more than the 32", 1),
    (["--algs", "leftright:0"], "--algs: 'leftright:0' is not understood", 2),
    (["--max-new-tokens", "600"], "exceeds the models' 512 positions", 1),
])
def test_eval_checks_arguments_before_solving(tiny_bundle, args, message, code):
    got, out, err = run("eval", str(tiny_bundle), "--n", "2", *args)
    assert got == code and out == "" and "solving" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err


# The seed of a sampled generation is printed with the statistics.
def test_the_seed_is_printed_without_json(tiny_bundle):
    code, out, err = run("generate", str(tiny_bundle), "--prompt-ids", "72,101", "--temperature", "0.9",
                         "--max-new-tokens", "6")
    assert code == 0, err
    seed = re.search(r", seed (\d+)$", err.strip()).group(1)
    again = run("generate", str(tiny_bundle), "--prompt-ids", "72,101", "--temperature", "0.9", "--max-new-tokens", "6",
                "--seed", seed)
    assert again[1] == out and again[2].strip().endswith(f", seed {seed}")
    assert "seed" not in run("generate", str(tiny_bundle), "--prompt-ids", "72,101", "--max-new-tokens", "6")[2]


# Help text for every option; the synopses in docs/cli.md list every flag.
def _options(name: str) -> list[click.Option]:
    return [p for p in cli.commands[name].params if isinstance(p, click.Option) and p.name != "help"]


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_option_has_help(name):
    missing = [p.opts[0] for p in _options(name) if not (p.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("name", MY_COMMANDS)
def test_cli_doc_synopsis_lists_every_flag(name):
    text = CLI_DOC.read_text()
    start = re.search(rf"apd-deploy {re.escape(name)} (BUNDLE|URL)", text).start()
    synopsis = text[start : text.index("`", start)]
    flags = [flag for p in _options(name) for flag in p.opts + p.secondary_opts if flag.startswith("--")]
    assert [flag for flag in flags if not re.search(re.escape(flag) + r"(?![\w-])", synopsis)] == []


def test_verify_help_says_what_remembered_trusts():
    code, out, _ = run("generate", "-h")
    text = " ".join(out.split())
    assert code == 0 and "once per size and modification time, so a change that keeps both goes unnoticed" in text


# Threads: every core the process may run on.
def test_default_threads_is_every_core_the_process_may_use(monkeypatch):
    import os

    from apd_deploy.runtime import engine

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert engine.default_threads() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    assert engine.default_threads() == 64
    assert "every core this process may run on" in " ".join(p.help for p in _options("generate") if p.name == "threads")
