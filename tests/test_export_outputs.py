"""Export and make-tiny under hostile conditions: foreign output directories, SIGTERM, dead
processes' leftovers, re-exports over engines, memory, random-weight scale, reported times."""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from apd_deploy.bundle import read_manifest
from apd_deploy.errors import BundleError
from apd_deploy.export import parity, pipeline
from apd_deploy.export.carry_engines import carry_engines
from apd_deploy.export.checkpoint import load_checkpoint
from apd_deploy.export.config import read_config
from apd_deploy.export.pipeline import export_bundle
from apd_deploy.export.tiny import PRESETS, make_tiny
from apd_deploy.export.transformer import DecoderLM
from apd_deploy.staging import remove_stale

CLI = str(Path(sys.executable).with_name("apd-deploy"))
ROOT = Path(__file__).resolve().parents[1]


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _foreign_dir(parent: Path) -> Path:
    directory = parent / "d"
    directory.mkdir()
    (directory / "keep.txt").write_text("x")
    return directory


# --overwrite replaces only what apd-deploy wrote.

def test_export_overwrite_refuses_a_directory_it_did_not_write(tiny_pair, tmp_path):
    directory = _foreign_dir(tmp_path)
    with pytest.raises(BundleError, match=r"d: not an apd-deploy bundle \(no manifest.json\)"):
        export_bundle(tiny_pair / "dllm", tiny_pair / "verifier", directory, overwrite=True)
    assert (directory / "keep.txt").read_text() == "x" and _hidden(tmp_path) == []


def test_export_overwrite_refuses_a_bundle_holding_foreign_files(tiny_pair, tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    (bundle / "tokenizer" / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="tokenizer/notes.txt: not in manifest.json 'files'"):
        export_bundle(tiny_pair / "dllm", tiny_pair / "verifier", bundle, overwrite=True)
    assert (bundle / "tokenizer" / "notes.txt").read_text() == "mine"


def test_make_tiny_overwrite_replaces_its_own_pair_and_nothing_else(tmp_path):
    directory = _foreign_dir(tmp_path)
    with pytest.raises(BundleError, match="d: not a pair written by make-tiny"):
        make_tiny(directory, overwrite=True)
    assert (directory / "keep.txt").read_text() == "x"

    pair = make_tiny(tmp_path / "pair")
    make_tiny(pair, seed=1, overwrite=True)
    assert json.loads((pair / "make-tiny.json").read_text())["seed"] == 1
    (pair / "dllm" / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match=r"holds files make-tiny did not write \(dllm/notes.txt\)"):
        make_tiny(pair, overwrite=True)
    assert (pair / "dllm" / "notes.txt").exists() and _hidden(tmp_path) == []


def test_an_empty_directory_is_written_without_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    make_tiny(tmp_path / "empty")
    assert (tmp_path / "empty" / "dllm" / "config.json").is_file()


def test_cli_overwrite_of_a_foreign_directory_is_one_error_line(tiny_pair, tmp_path):
    directory = _foreign_dir(tmp_path)
    for args in (["make-tiny", str(directory), "--overwrite"],
                 ["export", "--dllm", str(tiny_pair / "dllm"), "--verifier", str(tiny_pair / "verifier"),
                  "-o", str(directory), "--overwrite"]):
        result = CliRunner().invoke(_cli(), args)
        assert result.exit_code == 1 and "replaces only" in result.output
    assert (directory / "keep.txt").read_text() == "x" and _hidden(tmp_path) == []


def _cli():
    from apd_deploy.cli import cli

    return cli


# An existing output is refused before anything is loaded.

def test_existing_output_is_refused_before_the_checkpoints_are_read(tmp_path):
    directory = _foreign_dir(tmp_path)
    # Checkpoints that do not exist: an error about them would mean they were read first.
    with pytest.raises(BundleError, match="d: already exists; choose another output path or pass --overwrite"):
        export_bundle(tmp_path / "no-dllm", tmp_path / "no-verifier", directory)


# SIGTERM cleans up like SIGINT; a dead process's leftovers are removed by the next run.

def test_sigterm_during_export_removes_the_staging_folder(tiny_pair, tmp_path):
    process = subprocess.Popen([CLI, "export", "--dllm", str(tiny_pair / "dllm"), "--verifier",
                                str(tiny_pair / "verifier"), "-o", "b"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".b.staging-") for p in tmp_path.iterdir()):
        assert process.poll() is None and time.monotonic() < deadline, "the export never started staging"
        time.sleep(0.05)
    time.sleep(1.0)  # into loading or tracing
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert "error: terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_next_run_removes_staging_folders_of_dead_processes_only(tmp_path):
    dead = tmp_path / f".pair.staging-{_dead_pid()}-abc123"
    (dead / "dllm").mkdir(parents=True)
    (dead / "dllm" / "model.safetensors").write_bytes(b"partial")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f".pair.staging-{sleeper.pid}-def456"
        alive.mkdir()
        unknown = tmp_path / ".pair.staging-xyz"  # not named by apd-deploy: its owner cannot be told
        unknown.mkdir()
        make_tiny(tmp_path / "pair")
        assert sorted(_hidden(tmp_path)) == sorted([alive.name, unknown.name])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dead_process_caught_between_its_renames_gets_its_old_output_back(tmp_path):
    retired = tmp_path / f".b.old-{_dead_pid()}-abc123" / "b"
    retired.mkdir(parents=True)
    (retired / "manifest.json").write_text("{}")
    assert remove_stale(tmp_path / "b") == [retired.parent]
    assert (tmp_path / "b" / "manifest.json").read_text() == "{}" and _hidden(tmp_path) == []


# One re-export over a bundle with an engine: `export --overwrite` via
# The CLI, with the models' lifetimes and the final hashing observed.

@pytest.fixture(scope="module")
def reexport(tiny_pair, tiny_bundle, tmp_path_factory):
    from apd_deploy.engines.build import build_engine

    bundle = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("reexport") / "b")
    build_engine(bundle, "onnxruntime")
    live: list[weakref.ref] = []  # every parameter of every model loaded
    events: list[tuple[str, int]] = []
    times: dict[str, float] = {}

    def weight_bytes() -> int:
        tensors = [ref() for ref in live]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def loading(*args, **kwargs):
        times.setdefault("first load", time.perf_counter())
        events.append(("load", weight_bytes()))
        checkpoint = load_checkpoint(*args, **kwargs)
        live.extend(weakref.ref(p) for p in checkpoint.model.parameters())
        return checkpoint

    def loading_reference(*args, **kwargs):
        events.append(("load transformers", weight_bytes()))
        model = load_reference(*args, **kwargs)
        live.extend(weakref.ref(p) for p in model.parameters())
        return model

    def session(*args, **kwargs):
        events.append(("onnxruntime", weight_bytes()))
        return ort_session(*args, **kwargs)

    def slow_records(*args, **kwargs):
        if kwargs.get("known"):  # the final hashing, just before the manifest is written
            time.sleep(1.5)
            records = pipeline_file_records(*args, **kwargs)
            times["hashed"] = time.perf_counter()
            return records
        return pipeline_file_records(*args, **kwargs)

    load_reference, ort_session, pipeline_file_records = (
        parity.load_transformers_reference, parity.ort_session, pipeline.file_records)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "load_checkpoint", loading)
        patch.setattr(parity, "load_transformers_reference", loading_reference)
        patch.setattr(parity, "ort_session", session)
        patch.setattr(pipeline, "file_records", slow_records)
        result = CliRunner().invoke(_cli(), ["export", "--dllm", str(tiny_pair / "dllm"), "--verifier",
                                             str(tiny_pair / "verifier"), "-o", str(bundle), "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    return bundle, json.loads(result.stdout), events, times


def test_reexport_of_identical_graphs_keeps_the_engines(reexport):
    from apd_deploy.runtime import Runtime

    bundle, summary, _, _ = reexport
    assert summary["engines"] == ["onnxruntime-cpu-fp32"]
    manifest = read_manifest(bundle, verify="full")
    assert any(rel.startswith("engines/onnxruntime-cpu-fp32/") for rel in manifest["files"])
    result = Runtime.load(bundle, engine="onnxruntime-cpu-fp32", verify="full").generate([72, 101], max_new_tokens=4)
    assert len(result.token_ids) >= 1


def test_engines_of_other_graphs_are_dropped_with_the_command_to_rebuild_them(reexport, tmp_path):
    bundle, _, _, _ = reexport
    staging = tmp_path / "staging"
    staging.mkdir()
    other = {"dllm.onnx": {"sha256": "0" * 64, "bytes": 1}, "verifier.onnx": {"sha256": "1" * 64, "bytes": 1}}
    carried = carry_engines(bundle, staging, other)
    assert carried.engines == {} and list(staging.iterdir()) == []
    assert carried.dropped == [
        f"engine 'onnxruntime-cpu-fp32' of the old bundle was dropped: the new graphs differ from the ones it was "
        f"built from; rebuild it with `apd-deploy build-engine {bundle} --backend onnxruntime --device cpu "
        "--precision fp32`"
    ]


def test_export_holds_one_model_at_a_time(reexport):
    _, _, events, _ = reexport
    # Each model is loaded with no other model's weights in memory, and onnxruntime loads a graph
    # with no PyTorch weights in memory.
    assert events == [("load", 0), ("onnxruntime", 0), ("load transformers", 0), ("load", 0), ("onnxruntime", 0)]


def test_reported_time_includes_hashing_and_writing(reexport):
    bundle, summary, _, times = reexport
    hashing_done = times["hashed"] - times["first load"]  # a lower bound of the whole export's time
    assert read_manifest(bundle)["export"]["seconds"] >= hashing_done - 0.01
    assert summary["seconds"] >= hashing_done - 0.01


# The presets' scale and the 600m preset.

@pytest.mark.parametrize("preset", ["tiny", "30m"])
def test_presets_give_logits_at_a_trained_models_scale(preset, tmp_path):
    pair = make_tiny(tmp_path / "pair", preset=preset)
    for role in ("dllm", "verifier"):
        model = load_checkpoint(pair / role, role).model
        ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(48).expand(2, 48)
        with torch.no_grad():
            logits, _ = model(ids, positions, torch.ones(2, 48, dtype=torch.int64), model.empty_cache(2))
        assert torch.isfinite(logits).all() and 3 < logits.abs().max() < 30, (role, float(logits.abs().max()))


def test_600m_preset_has_real_widths_and_loadable_shapes(tmp_path):
    from apd_deploy.export.tiny import SPECIAL_TOKENS, build_tokenizer, model_config, weight_shapes

    tokenizer = build_tokenizer()
    special = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    preset = PRESETS["600m"]
    counts = {}
    for role, dims, tied in (("dllm", preset.dllm, False), ("verifier", preset.verifier, True)):
        (tmp_path / role).mkdir()
        (tmp_path / role / "config.json").write_text(json.dumps(model_config(dims, special, role == "dllm", preset)))
        config = read_config(tmp_path / role / "config.json", role)
        shapes = weight_shapes(dims, tied)
        with torch.device("meta"):
            model = DecoderLM(config, qkv_bias=True)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        assert shapes == expected
        counts[role] = sum(int(np.prod(s)) for s in shapes.values())
        assert config.rope_theta == 1e6 and config.tie_word_embeddings == tied
    d = read_config(tmp_path / "dllm" / "config.json", "dllm")
    assert (d.hidden_size, d.num_hidden_layers, d.num_attention_heads, d.num_key_value_heads, d.intermediate_size,
            d.vocab_size) == (896, 24, 14, 2, 4864, 152064)
    v = read_config(tmp_path / "verifier" / "config.json", "verifier")
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.num_key_value_heads, v.intermediate_size,
            v.vocab_size) == (512, 8, 8, 2, 2048, 151936)
    assert 0.62e9 < counts["dllm"] < 0.64e9


@pytest.mark.slow
def test_600m_preset_writes_a_loadable_pair(tmp_path):
    pair = make_tiny(tmp_path / "pair", preset="600m")
    for role in ("dllm", "verifier"):
        model = load_checkpoint(pair / role, role).model
        assert abs(float(model.model.embed_tokens.weight.std()) - 0.02) < 1e-3


@pytest.mark.slow
def test_30m_pair_passes_its_fp16_check(tmp_path):
    pair = make_tiny(tmp_path / "pair", preset="30m")
    manifest = export_bundle(pair / "dllm", pair / "verifier", tmp_path / "b", dtype="fp16")
    for model in manifest["models"].values():
        assert model["check"]["status"] == "passed" and model["check"]["logits_scale"] < 30


# Peak memory on a pair whose dLLM (0.66 GB in fp32) dwarfs the libraries' own memory.

def _memory_script():
    spec = importlib.util.spec_from_file_location("export_memory", ROOT / "scripts" / "export_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _peak_in_child(pair: str | None, root: Path) -> int:
    """Peak RSS of an export in a fresh process (RUSAGE_CHILDREN counts the largest child per process)."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import export_memory as m\n"
        "root = Path(sys.argv[2])\n"
        "if sys.argv[3] == 'tiny':\n"
        "    from apd_deploy.export.tiny import make_tiny; make_tiny(root / 'pair'); d, v = root / 'pair/dllm', root / 'pair/verifier'\n"
        "else:\n"
        "    d, v = m.build_pair(root / 'pair', sys.argv[3])\n"
        "print(m.measure_export(d, v, root / 'bundle', 'fp32')['peak_rss_bytes'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "scripts"), str(root), pair],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_export_peak_memory_is_one_model_plus_a_constant(tmp_path):
    script = _memory_script()
    larger = script.PAIRS["small"][0].parameters() * 4
    baseline = _peak_in_child("tiny", tmp_path / "tiny")  # the libraries and the exporter, with no weights to speak of
    peak = _peak_in_child("small", tmp_path / "small")
    # Measured: 0.93 x here, against 4.7 x before models were exported one at a time and 1.48 x
    # before the traced graph let go of its weights (export/trace.py). The target is 1.3 x.
    assert peak <= 1.3 * larger + baseline, (peak, larger, baseline)


def test_chunked_checkpoint_reader_matches_safetensors(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from apd_deploy.export import checkpoint

    monkeypatch.setattr(checkpoint, "READ_CHUNK_BYTES", 7)  # many chunks, the last ones partial
    tensors = {"w": torch.randn(3, 5, dtype=torch.bfloat16), "h": torch.randn(7, dtype=torch.float16),
               "f": torch.randn(2, 2), "empty": torch.zeros(0, 4), "ids": torch.arange(5)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    for dtype in (torch.float32, torch.bfloat16):
        read = checkpoint._read_safetensors(tmp_path / "x.safetensors", dtype)
        expected = load_file(str(tmp_path / "x.safetensors"))
        assert read.keys() == expected.keys()
        assert all(torch.equal(read[k], expected[k].to(dtype)) and read[k].dtype == dtype for k in read)


# What make-tiny and export write follows the umask (safetensors' save_file
# Made the weights 0600, unreadable to a server running as another user).

def _modes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask, file_mode, dir_mode, export", [(0o022, 0o644, 0o755, True),
                                                               (0o027, 0o640, 0o750, False)])
def test_written_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode, export):
    script = f"umask {umask:03o} && {CLI} make-tiny pair"
    if export:  # one export is enough: it takes half a minute
        script += f" && {CLI} export --dllm pair/dllm --verifier pair/verifier -o bundle --quiet"
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for root in (tmp_path / "pair", *([tmp_path / "bundle"] if export else [])):
        modes = _modes(root)
        assert "dllm/model.safetensors" in modes or "dllm.onnx" in modes
        wrong = {name: oct(mode) for name, mode in modes.items()
                 if mode != (dir_mode if (root / name).is_dir() else file_mode)}
        assert wrong == {}, root
