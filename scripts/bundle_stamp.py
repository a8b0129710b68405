"""Whether a bundle is up to date with what made it, so `scripts/demo.sh` exports only when needed.

    bundle_stamp.py write BUNDLE SOURCE...   record the sources' sha256 and the tools' versions
    bundle_stamp.py check BUNDLE SOURCE...   exit 0 if the record matches now and the bundle is intact;
                                             else exit 1, saying why (or that there is no bundle yet)

The record lives beside the bundle (`BUNDLE.stamp`), not inside it: an export replaces the bundle.
SOURCE is a file or a folder: the checkpoints and the code that exports and builds engines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# What else shapes the exported graphs and engines besides the sources.
TOOLS = ("apd-deploy", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "openvino")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def fingerprint(sources: list[Path]) -> dict[str, Any]:
    """sha256 of every file under `sources` (bytecode caches left out) and the tools' versions."""
    files = {}
    for source in sources:
        paths = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for path in paths:
            if "__pycache__" not in path.parts:
                files[path.as_posix()] = _sha256(path)
    if not files:
        raise SystemExit(f"error: no source files under {', '.join(map(str, sources))}")
    return {"files": files, "versions": {name: _version(name) for name in TOOLS}}


def stamp_path(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + ".stamp")


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What changed since the stamp was written, one line each."""
    changed = []
    for kind in ("files", "versions"):
        old, new = recorded.get(kind, {}), now[kind]
        changed += [f"{name}: {old.get(name)} -> {new.get(name)}" if kind == "versions" else f"{name} changed"
                    for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]
    return changed


def check(bundle: Path, sources: list[Path]) -> list[str]:
    """Reasons the bundle must be made again; empty when it is current."""
    stamp = stamp_path(bundle)
    if not stamp.is_file():
        return [f"no {stamp.name}"]
    changed = differences(json.loads(stamp.read_text()), fingerprint(sources))
    if changed:
        return changed
    from apd_deploy.bundle import read_manifest
    from apd_deploy.errors import BundleError

    try:  # a stamp says nothing about later damage to the bundle itself
        read_manifest(bundle, verify="full")
    except BundleError as exc:
        return [str(exc)]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("check", "write"))
    parser.add_argument("bundle", type=Path)
    parser.add_argument("sources", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.action == "write":
        stamp_path(args.bundle).write_text(json.dumps(fingerprint(args.sources), indent=1, sort_keys=True) + "\n")
        return 0
    if not args.bundle.exists():
        print(f"{args.bundle} is not exported yet", file=sys.stderr)
        return 1
    reasons = check(args.bundle, args.sources)
    for reason in reasons:
        print(f"{args.bundle} is out of date: {reason}", file=sys.stderr)
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
