"""Safe file output: a folder is built beside its destination and renamed into place only when complete.

Entry points: atomic_directory(path, overwrite), read_json(path, what), write_json, and is_gguf_file(path).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tetra.errors import TetraError


@contextlib.contextmanager
def atomic_directory(destination: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `destination`, on any error it is removed.

    An existing non-empty destination is refused unless overwrite is set, so a typo never destroys earlier work.
    """
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())) and not overwrite:
        raise TetraError(f"{destination} already exists and is not empty. Choose another output folder, "
                         "or remove it first (or pass --overwrite where the command offers it).")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary output folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if destination.exists():
        retired = destination.with_name(f".{destination.name}.old-{staging.name[-8:]}")
        destination.rename(retired)
        staging.rename(destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(destination)


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file, turning a missing or malformed file into a clear TetraError naming `what` it is."""
    if not path.is_file():
        raise TetraError(f"{path} does not exist; it should hold the {what}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TetraError(f"{path} is not valid JSON ({error}); it should hold the {what}. "
                         "Restore it from the original source.") from None


def write_json(path: Path, value: Any) -> None:
    """Write indented JSON with a trailing newline."""
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def is_gguf_file(path: str | Path) -> bool:
    """A file whose first four bytes are GGUF's magic (llama.cpp's model format)."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(4) == b"GGUF"
