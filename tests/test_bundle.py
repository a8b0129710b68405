"""The bundle format: validated manifest, verified files, no torch needed to read it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from apd_deploy.bundle import read_manifest
from apd_deploy.errors import BundleError

REPO = Path(__file__).parents[1]
# The interpreter's own packages (numpy, onnxruntime) without the path hooks that site's .pth files
# would install, such as an editable install's finder: with `python -S` and this on PYTHONPATH, an
# import sees what it would see beside a non-editable install.
SITE_PACKAGES = sysconfig.get_paths()["purelib"]
IMPORT_ALL = ("import apd_deploy, apd_deploy.export, apd_deploy.engines.build, apd_deploy.runtime, apd_deploy.cli\n"
              "print(apd_deploy.__file__); print(apd_deploy.export.__file__)")


def _import_all(cwd: Path, *paths: str) -> list[Path]:
    """Import every stage in a fresh `python -S` from `cwd`; returns where apd_deploy and its export came from."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((*paths, SITE_PACKAGES))}
    result = subprocess.run([sys.executable, "-S", "-c", IMPORT_ALL], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [Path(line) for line in result.stdout.split()]


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "b")


def _edit_manifest(bundle, **fields):
    manifest = json.loads((bundle / "manifest.json").read_text()) | fields
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_damaged_file_is_detected(bundle_copy):
    with open(bundle_copy / "verifier.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(BundleError, match="verifier.onnx: sha256 differs"):
        read_manifest(bundle_copy)
    read_manifest(bundle_copy, verify="skip")


def test_missing_file_is_detected(bundle_copy):
    (bundle_copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json: listed"):
        read_manifest(bundle_copy)


def test_other_versions_and_shapes_are_refused(bundle_copy, tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        read_manifest(tmp_path)
    _edit_manifest(bundle_copy, version=1)  # a bundle from before batching: the message names the fix
    with pytest.raises(BundleError, match=r"field 'version' is 1, this apd-deploy reads version 2 .*apd-deploy export"):
        read_manifest(bundle_copy)
    _edit_manifest(bundle_copy, version=3)
    with pytest.raises(BundleError, match="field 'version' is 3"):
        read_manifest(bundle_copy)
    _edit_manifest(bundle_copy, version=2, apd_defaults={"apd_mixture_weight": 1.5, "kv_window": 16, "max_lookahead": 100})
    with pytest.raises(BundleError, match="apd_defaults/apd_mixture_weight"):
        read_manifest(bundle_copy)


def test_runtime_imports_and_reads_a_bundle_without_torch(tiny_bundle):
    code = (
        "import sys, apd_deploy.runtime, apd_deploy.engines, apd_deploy.cli\n"
        "from apd_deploy.bundle import read_manifest\n"
        f"read_manifest({str(tiny_bundle)!r})\n"
        "leaked = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_packages_install_under_one_name():
    import apd_deploy.engines
    import apd_deploy.export
    import apd_deploy.runtime

    for module, folder in ((apd_deploy.export, "export"), (apd_deploy.engines, "engines"), (apd_deploy.runtime, "runtime")):
        assert module.__file__.replace("\\", "/").split("/")[-2] == folder


def test_the_source_folder_imports_every_stage_from_the_repository_root():
    """From the checkout's root the current directory comes first on sys.path, so `apd_deploy` is the
    source folder even when an installed copy exists; export/, engines/ and runtime/ sit beside it."""
    package, export = _import_all(REPO)
    assert package == REPO / "apd_deploy" / "__init__.py" and export == REPO / "export" / "__init__.py"


@pytest.mark.slow
def test_a_non_editable_install_imports_from_anywhere(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True)
    package, export = _import_all(tmp_path, str(target))
    assert package == target / "apd_deploy" / "__init__.py" and export == target / "apd_deploy" / "export" / "__init__.py"
    package, export = _import_all(REPO, str(target))  # the source folder shadows the install here
    assert package == REPO / "apd_deploy" / "__init__.py" and export == REPO / "export" / "__init__.py"
