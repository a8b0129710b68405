from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

# Tests never reach a model hub; make any accidental attempt fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test models are tiny: a second torch thread only adds synchronisation, and with another
# process on the other core torch's spinning threads made the PyTorch reference decodings 15x
# slower (2.4 s vs 40 s side by side). Set before torch is imported, and inherited by the CLI runs.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """`make(folder)` run once per test run: pytest-xdist's workers share what the first one made
    (an export of the demo pair takes half a minute of a core)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name) / name
        make(folder)
        return folder
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # this run's, above each worker's own
    folder = shared / name / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (shared / name / "made").exists():
            shutil.rmtree(shared / name, ignore_errors=True)  # a worker that failed midway
            folder.parent.mkdir(parents=True)
            make(folder)
            (shared / name / "made").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    from apd_deploy.export.tiny import make_tiny

    return made_once(tmp_path_factory, "tiny", make_tiny)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_pair, tmp_path_factory):
    from apd_deploy.export.pipeline import export_bundle

    return made_once(tmp_path_factory, "bundle", lambda out: export_bundle(tiny_pair / "dllm", tiny_pair / "verifier", out))


@pytest.fixture(scope="session")
def tiny_fp16_bundle(tiny_pair, tmp_path_factory):
    """The tiny pair exported in fp16, once per session: for the export's checks and the CPU engine."""
    from apd_deploy.export.pipeline import export_bundle

    return made_once(tmp_path_factory, "bundle-fp16",
                     lambda out: export_bundle(tiny_pair / "dllm", tiny_pair / "verifier", out, dtype="fp16"))


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    """The bundled trained pair (models/arithmetic), exported with its onnxruntime engine."""
    from apd_deploy.engines.build import build_engine
    from apd_deploy.export.pipeline import export_bundle

    models = Path(__file__).parents[1] / "models" / "arithmetic"

    def make(out: Path) -> None:
        export_bundle(models / "dllm", models / "verifier", out)
        build_engine(out, "onnxruntime")

    return made_once(tmp_path_factory, "demo", make)


@pytest.fixture(scope="module")
def demo_runtime(demo_bundle):
    from apd_deploy.runtime import Runtime

    return Runtime.load(demo_bundle, engine="onnxruntime-cpu-fp32")


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    """The tiny bundle loaded once per test module."""
    from apd_deploy.runtime import Runtime

    return Runtime.load(tiny_bundle)


@pytest.fixture(scope="module")
def runtime_without_eos(tiny_bundle):
    """The tiny bundle, every generation to its full length (ignore_eos by default)."""
    from apd_deploy.runtime import Runtime

    return without_eos(Runtime.load(tiny_bundle))


def without_eos(runtime):
    """`runtime` with ignore_eos on by default: every generation runs to its full length."""
    return replace(runtime, defaults=replace(runtime.defaults, ignore_eos=True))


@pytest.fixture(autouse=True, scope="session")
def _private_verification_memo(tmp_path_factory):
    """Keep the runtime's memo of verified bundle files out of the user's cache directory."""
    os.environ["APD_DEPLOY_CACHE"] = str(tmp_path_factory.mktemp("apd-cache"))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadfile":
        from scheduling import AloneLastScheduling

        return AloneLastScheduling(config, log)
    return None
