"""Errors at the command line (issue #27): one `error:` line naming the path or flag and the fix,
never a traceback; outputs checked before the work; --threads bounded; an unreachable server
refused; Ctrl-C's exit status."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from apd_deploy.bench.serving import free_port, launched_server
from apd_deploy.cli import main
from apd_deploy.errors import GenerationError
from apd_deploy.runtime import Runtime

CLI = str(Path(sys.executable).with_name("apd-deploy"))
NO_BUNDLE = "no-such-bundle"
# Paths no process can create, root included: /proc takes no new entries, /sys refuses them.
UNWRITABLE = ("/proc/apd-deploy-test/out", "/sys/apd-deploy-test")
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run(*args: str) -> tuple[int, str, str]:
    """The console entry point in-process: exit status, stdout, stderr."""
    with CliRunner().isolation() as (out, err, _):
        with pytest.raises(SystemExit) as exited:
            main(list(args))
    return exited.value.code, out.getvalue().decode(), err.getvalue().decode()


def error_line(err: str) -> str:
    """The one `error:` line, the last line of stderr."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [line for line in lines if line.startswith("error: ")] == [lines[-1]], err
    return lines[-1]


def _export(pair: Path, out: str) -> list[str]:
    return ["export", "--dllm", str(pair / "dllm"), "--verifier", str(pair / "verifier"), "-o", out]


# 13. An output that cannot be written is one error line.
@pytest.mark.parametrize("target", UNWRITABLE)
def test_an_unwritable_output_is_one_error_line(tiny_pair, target):
    for args in (["make-tiny", target], _export(tiny_pair, target)):
        code, out, err = run(*args)
        line = error_line(err)
        assert code == 1 and out == "" and target in line and "choose another output path" in line, line
        assert "exporting" not in err  # refused before the work


def test_an_output_below_a_file_is_one_error_line(tiny_pair, tmp_path):
    (tmp_path / "port").write_text("")
    target = str(tmp_path / "port" / "sub")
    for args in (["make-tiny", target], _export(tiny_pair, target)):
        code, _, err = run(*args)
        line = error_line(err)
        assert code == 1 and f"{tmp_path / 'port'} is not a directory" in line, line
        assert "choose another output path" in line
    assert (tmp_path / "port").read_text() == "" and os.listdir(tmp_path) == ["port"]


@pytest.mark.parametrize("command", [["bench", NO_BUNDLE], ["bench-serve", "http://127.0.0.1:1"]])
def test_a_prompts_file_that_is_not_utf8_is_a_usage_error(tmp_path, command):
    prompts = tmp_path / "latin1.txt"
    prompts.write_bytes("Caf\xe9\n".encode("latin-1"))
    code, out, err = run(*command, "--prompts", str(prompts), "--out", str(tmp_path / "out"))
    line = error_line(err)
    assert code == 2 and out == "" and f"--prompts {prompts}" in line and "UTF-8" in line, line
    assert not (tmp_path / "out").exists()


def test_a_prompt_that_is_not_utf8_is_a_usage_error(runtime, tiny_bundle):
    # The shell passes the bytes as they are; Python decodes the stray 0xe9 to a lone surrogate.
    result = subprocess.run([CLI, "generate", str(tiny_bundle), "--prompt", b"Caf\xe9"], capture_output=True,
                            text=True, timeout=120)
    line = error_line(result.stderr)
    assert result.returncode == 2 and "--prompt" in line and "UTF-8" in line and "0xe9" in line, line
    with pytest.raises(GenerationError, match="not valid UTF-8"):
        runtime.generate("Caf\udce9", max_new_tokens=2)


# 14. Every output path is checked before the work.
@pytest.mark.parametrize("target", UNWRITABLE)
def test_bench_checks_its_out_before_benchmarking(tiny_bundle, target):
    code, _, err = run("bench", str(tiny_bundle), "--random-prompts", "1", "--repeat", "1", "--max-new-tokens", "4",
                       "--no-eager", "--out", target)
    line = error_line(err)
    assert code == 1 and "--out" in line and target in line and "benchmarking" not in err, err


def test_bench_serve_checks_its_out_before_loading_the_server():
    code, _, err = run("bench-serve", "http://127.0.0.1:1", "--requests", "1", "--concurrency", "1",
                       "--out", UNWRITABLE[0])
    line = error_line(err)
    assert code == 1 and "--out" in line and UNWRITABLE[0] in line and "loading the server" not in err, err


# 15. --threads is bounded by the cores.
@pytest.mark.parametrize("command", [
    ["generate", NO_BUNDLE, "--prompt-ids", "1"], ["eval", NO_BUNDLE], ["bench", NO_BUNDLE, "--random-prompts", "1"],
    ["bench-serve", "http://127.0.0.1:1"],
])
def test_threads_beyond_four_per_core_are_a_usage_error(command):
    code, out, err = run(*command, "--threads", "10000")
    line = error_line(err)
    assert code == 2 and out == "" and err.startswith("Usage: "), err
    assert "--threads" in line and f"{CORES} cores" in line and f"at most {4 * CORES}" in line, line


def test_python_api_bounds_threads(tiny_bundle):
    with pytest.raises(GenerationError, match=rf"threads {4 * CORES + 1} is more than 4x the {CORES} cores .* "
                                              rf"at most {4 * CORES}"):
        Runtime.load(tiny_bundle, threads=4 * CORES + 1)
    assert Runtime.load(tiny_bundle, threads=4 * CORES).threads == 4 * CORES


def test_threads_help_states_the_bound():
    _, out, _ = run("generate", "-h")
    assert "at most 4x the cores" in " ".join(out.split())


# 16. bench-serve refuses a server it cannot reach, and fails when every request fails.
def test_bench_serve_refuses_an_unreachable_server(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run("bench-serve", url, "--requests", "2", "--concurrency", "1", "--out", str(tmp_path / "out"))
    line = error_line(err)
    assert code == 1 and out == "" and f"cannot reach {url}" in line and "apd-deploy serve" in line, line
    assert not (tmp_path / "out").exists()


def test_bench_serve_fails_when_every_request_fails(tiny_bundle, tmp_path):
    with launched_server([str(tiny_bundle), "--threads", "1", "--api-key", "secret"]) as (url, _):
        code, _, err = run("bench-serve", url, "--requests", "2", "--concurrency", "1", "--max-tokens", "2",
                           "--out", str(tmp_path / "out"))
    line = error_line(err)
    assert code == 1 and "every one of the 2 requests at concurrency 1 failed" in line and "401" in line, line
    assert "--api-key" in line and not (tmp_path / "out").exists()


# 21. Ctrl-C exits 130; a missing bundle is called missing; counts agree with their nouns.
def test_ctrl_c_during_export_exits_130(tiny_pair, tmp_path):
    process = subprocess.Popen([CLI, *_export(tiny_pair, "b")], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".b.staging-") for p in tmp_path.iterdir()):
        assert process.poll() is None and time.monotonic() < deadline, "the export never started staging"
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and error_line(stderr) == "error: interrupted (Ctrl-C); nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_a_missing_bundle_is_said_not_to_exist(tmp_path):
    code, _, err = run("generate", str(tmp_path / "nonexistent"), "--prompt-ids", "1")
    assert code == 1 and error_line(err).startswith(f"error: {tmp_path / 'nonexistent'}: does not exist; ")


def test_the_summary_line_agrees_in_number(tiny_bundle):
    code, _, err = run("generate", str(tiny_bundle), "--prompt-ids", "72,101", "--alg", "ar", "--max-new-tokens", "1")
    assert code == 0 and re.search(r"^\[ar\] 1 token in 1 step \(1\.00 per step\)", err.strip(), re.M), err
