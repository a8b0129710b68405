"""The bundle: a directory of ONNX graphs, tokenizer files and `manifest.json`.

`manifest.schema.json` (next to this file) is the contract for loaders in any language. A
bundle is always assembled in a staging directory beside its destination and renamed into
place only when complete (`apd_deploy.staging`), so a reader never sees half a bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

from apd_deploy.errors import BundleError

MANIFEST = "manifest.json"
FORMAT = "apd-deploy-bundle"
FORMAT_VERSION = 2
# What the current version changed, for the message that refuses an older bundle.
VERSION_CHANGES = "version 2 batches requests: the KV cache is batch-first and logit rows index the whole batch"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_records(directory: Path, under: str = ".", known: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file below `directory / under` except the manifest, keyed by
    POSIX path relative to `directory`. Files in `known` take its records instead of being hashed
    again (multi-GB graphs take seconds each)."""
    known = known or {}
    records = {}
    for path in sorted(p for p in (directory / under).rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel in known:
            records[rel] = known[rel]
        elif rel != MANIFEST:
            records[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return records


def validate_manifest(manifest: dict[str, Any], where: Path) -> None:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(manifest, schema)
    except jsonschema.ValidationError as exc:
        field = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise BundleError(f"{where}: field '{field}': {exc.message}") from None


def store_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Validate `manifest` and replace `directory`'s manifest with it in one rename."""
    validate_manifest(manifest, directory / MANIFEST)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{MANIFEST}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Names this tool gives its own temporary files inside a bundle (store_manifest's manifest being
# written, build-engine's staging and retired folders); a killed process may leave them behind.
TEMPORARY_NAME = re.compile(r"^\.(manifest\.json\.|.+\.(staging|old)-)")


def recognise_bundle(directory: Path) -> None:
    """Raise BundleError unless `directory` holds a bundle and nothing else: only then may
    `export --overwrite` replace it."""
    refuse = "--overwrite replaces only a bundle written by apd-deploy; move it away or choose another output path"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise BundleError(f"{directory}: not an apd-deploy bundle (no {MANIFEST}); {refuse}") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{directory / MANIFEST}: unreadable ({exc}); {refuse}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{directory / MANIFEST}: field 'format' is not '{FORMAT}'; {refuse}")
    listed = set(manifest.get("files") or {}) | {MANIFEST}
    foreign = [
        rel for rel in (p.relative_to(directory).as_posix() for p in sorted(directory.rglob("*")) if not p.is_dir())
        if rel not in listed and not any(TEMPORARY_NAME.match(part) for part in rel.split("/"))
    ]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise BundleError(
            f"{directory}: holds files that are not part of the bundle ({shown}: not in {MANIFEST} 'files'); "
            "--overwrite would delete them: move them out of the bundle or choose another output path"
        )


VERIFY_MODES = ("full", "remembered", "skip")


def _memo_path() -> Path:
    root = os.environ.get("APD_DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "apd-deploy")
    return Path(root) / "verified-files.json"


def _load_memo() -> dict[str, list]:
    try:
        return json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_memo(memo: dict[str, list]) -> None:
    """Best effort: a read-only home only costs a full check next time."""
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".verified-")
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, path)
    except OSError:
        pass


def verify_files(bundle: Path, manifest: dict[str, Any], mode: str = "full", only: Collection[str] | None = None) -> None:
    """Check every file listed in the manifest against its sha256, or only the files `only` names
    (the ones a loader is about to read; each must be listed).

    'remembered' skips a file whose path, size and modification time match an earlier successful
    check of the same sha256 (multi-GB graphs take seconds to hash); 'skip' checks nothing.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode {mode!r} is not one of {VERIFY_MODES}")
    if mode == "skip":
        return
    unlisted = sorted(set(only or ()) - set(manifest["files"]))
    if unlisted:
        raise BundleError(f"{bundle / unlisted[0]}: not listed in {MANIFEST} 'files', so it cannot be checked; "
                          "re-export the bundle")
    memo = _load_memo() if mode == "remembered" else {}
    changed = False
    for rel, record in manifest["files"].items():
        if only is not None and rel not in only:
            continue
        file = bundle / rel
        try:
            stat = file.stat()
        except FileNotFoundError:
            raise BundleError(f"{file}: listed in {MANIFEST} 'files' but missing; re-export the bundle") from None
        key, seen = str(file.resolve()), [stat.st_size, stat.st_mtime_ns, record["sha256"]]
        if memo.get(key) == seen:
            continue
        if stat.st_size != record["bytes"] or sha256_file(file) != record["sha256"]:
            raise BundleError(f"{file}: sha256 differs from {MANIFEST} 'files'; the file is damaged or was changed")
        memo[key], changed = seen, True
    if mode == "remembered" and changed:
        _save_memo(memo)


def read_manifest(bundle: str | Path, verify: str = "full") -> dict[str, Any]:
    """Load and validate `bundle`'s manifest and check its files (see `verify_files` for modes)."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not os.path.lexists(bundle):
        raise BundleError(f"{bundle}: does not exist; give the directory `apd-deploy export` wrote")
    if not path.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST}; is this a bundle written by `apd-deploy export`?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); re-run `apd-deploy export`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: field 'format' is not '{FORMAT}'; this is not an apd-deploy bundle")
    if manifest.get("version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: field 'version' is {manifest.get('version')!r}, this apd-deploy reads version "
            f"{FORMAT_VERSION} ({VERSION_CHANGES}); export the bundle again with `apd-deploy export` and "
            "rebuild its engines with `apd-deploy build-engine`"
        )
    validate_manifest(manifest, path)
    verify_files(bundle, manifest, verify)
    return manifest


def kv_dims(entry: dict[str, Any]) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a model entry's `past_kv` input, laid out
    [batch, layers, 2, kv_heads, capacity, head_dim]."""
    _, layers, _, kv_heads, _, head_dim = next(t for t in entry["inputs"] if t["name"] == "past_kv")["shape"]
    return layers, kv_heads, head_dim
