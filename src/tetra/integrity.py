"""Checksummed manifests: a folder records each file's size and SHA-256 so a torn or damaged copy is caught
before anything reads it (training checkpoints, prepared data).

Entry points: write_manifest(folder) (written last, after every other file is on disk) and
check_manifest(folder, hashes) -> the problems found, each naming its file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
ALGORITHM = "sha256"


def file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, ALGORITHM).hexdigest()


def _sync(path: Path) -> None:
    """Push a file (or a folder's entries) to the disk, so a crash after the rename finds what the manifest says."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST)


def write_manifest(folder: Path) -> dict[str, dict[str, int | str]]:
    """Sync every file under `folder`, then record its size and digest in folder/manifest.json."""
    entries = {}
    for path in _files(folder):
        _sync(path)
        entries[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, ALGORITHM: file_digest(path)}
    target = folder / MANIFEST
    target.write_text(json.dumps({"algorithm": ALGORITHM, "files": entries}, indent=1) + "\n", encoding="utf-8")
    _sync(target)
    for directory in {folder, *(path.parent for path in _files(folder))}:
        _sync(directory)
    return entries


def has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def check_manifest(folder: Path, hashes: bool = True) -> list[str]:
    """What is wrong with `folder` against its manifest: a missing, resized or (with hashes) altered file, or an
    unreadable manifest. Sizes alone cost one stat per file; hashes read every byte."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return [f"{folder / MANIFEST} is missing (the save did not finish, or the folder predates manifests)"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        return [f"{folder / MANIFEST} is unreadable ({error})"]
    problems = []
    for name, entry in recorded.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes; the manifest records {entry['bytes']}")
        elif hashes and file_digest(path) != entry[ALGORITHM]:
            problems.append(f"{path} does not match its recorded {ALGORITHM} (the file is damaged)")
    return problems
