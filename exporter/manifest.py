"""manifest.json: what an output directory holds and how it was made."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path

from exporter.atomic import write_text

MANIFEST = "manifest.json"


def tool_versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("ptekit", "torch", "executorch", "torchao", "pytorch-tokenizers"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def file_sha256(path: Path) -> str:
    return update_with_file(hashlib.sha256(), path).hexdigest()


def update_with_file(h, path: Path):
    """Feeds the file's bytes to the hash h, 4 MiB at a time; returns h."""
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h


def write_manifest(out_dir: Path, record: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    write_text(path, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(out_dir: Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None
