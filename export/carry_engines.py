"""Keep a bundle's engines across `export --overwrite` when they still fit.

An engine is compiled from the bundle's graphs. When the new export wrote byte-identical graphs
(same checkpoints, dtype, opset and library versions: the exporter is deterministic), the old
engines are still valid and are carried over; otherwise they are dropped, and the caller says so
with the commands that rebuild them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apd_deploy.bundle import FORMAT, MANIFEST


@dataclass
class Carried:
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # engine files, as the old manifest hashed them
    dropped: list[str] = field(default_factory=list)  # one message per engine: why, and how to rebuild it

    def drop(self, bundle: Path, name: str, record: dict[str, Any], why: str) -> None:
        self.dropped.append(
            f"engine '{name}' of the old bundle was dropped: {why}; rebuild it with `apd-deploy build-engine "
            f"{bundle} --backend {record.get('backend')} --device {record.get('device')} "
            f"--precision {record.get('precision')}`"
        )


def _old_manifest(bundle: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((bundle / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _graph_records(manifest: dict[str, Any]) -> dict[str, str]:
    """sha256 of each model graph and its external data, by path."""
    files = manifest.get("files") or {}
    return {rel: files[rel]["sha256"] for model in (manifest.get("models") or {}).values()
            for rel in (model["graph"], model["graph"] + ".data") if rel in files}


def _link_or_copy(source: Path, destination: Path) -> None:
    """A hard link costs no space or time for multi-GB engines; nothing writes engine files in
    place (build-engine replaces whole folders), so sharing the inode is safe."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def carry_engines(old_bundle: Path, staging: Path, new_graphs: dict[str, dict[str, Any]]) -> Carried:
    """Bring the engines of `old_bundle` into `staging` if their graphs equal `new_graphs`
    (path -> file record of the new bundle's graphs); returns what was carried and dropped."""
    carried = Carried()
    manifest = _old_manifest(old_bundle)
    if manifest is None or not manifest.get("engines"):
        return carried
    same_graphs = _graph_records(manifest) == {rel: record["sha256"] for rel, record in new_graphs.items()}
    files = manifest.get("files") or {}
    for name, record in manifest["engines"].items():
        if not same_graphs:
            carried.drop(old_bundle, name, record, "the new graphs differ from the ones it was built from")
            continue
        own = {rel: rec for rel, rec in files.items() if rel.startswith(f"engines/{name}/")}
        damaged = [rel for rel, rec in own.items()
                   if not (old_bundle / rel).is_file() or (old_bundle / rel).stat().st_size != rec["bytes"]]
        if damaged or not own:
            carried.drop(old_bundle, name, record, f"its files are missing or changed ({', '.join(damaged) or 'none recorded'})")
            continue
        for rel in own:
            _link_or_copy(old_bundle / rel, staging / rel)
        carried.engines[name] = record
        carried.records.update(own)
    return carried
