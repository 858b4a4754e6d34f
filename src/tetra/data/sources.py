"""Documents from .txt / .jsonl / .parquet files, folders and globs, and the built-in `stdlib` corpus.

Entry points: iter_documents(source, text_field) yields one string per document, in a fixed order;
iter_records(source) yields each JSON record with where it came from (for chat data).
"""

from __future__ import annotations

import glob
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tetra.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
RECORD_SUFFIXES = (".jsonl", ".parquet")
STDLIB = "stdlib"


def stdlib_files() -> list[Path]:
    """The running Python's standard-library sources: on every machine, no download, ~11 MB of text (3.11)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    return sorted(path for path in root.rglob("*.py") if not skip.intersection(path.relative_to(root).parts))


def source_files(source: str) -> list[Path]:
    """The files a source names, sorted so every machine reads them in the same order."""
    if source == STDLIB:
        return stdlib_files()
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES)
    else:
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"No documents found at {source!r}: it is not a file, a folder with .txt/.jsonl/.md/.py "
                        f"files, a glob that matches files, or the built-in corpus name {STDLIB!r}.")
    return files


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not valid JSON ({error.msg}). Each line of a .jsonl file "
                                "must be one JSON object.") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{path}, line {number}: no string field {text_field!r}. Choose the field that "
                                "holds the text (--text-field).")
            yield record[text_field]


def iter_records(source: str) -> Iterator[tuple[str, Any]]:
    """(location 'file, line N', record) for every non-blank line of the source's .jsonl files; a line that is not
    JSON yields a RecordLineError in place of the record, so the caller decides whether to stop or count it."""
    files = [path for path in source_files(source) if path.suffix == ".jsonl"]
    if not files:
        raise DataError(f"{source!r} holds no .jsonl file; chat, alpaca and sharegpt data are JSON lines.")
    for path in files:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}, line {number}", json.loads(line)
                except json.JSONDecodeError as error:
                    yield f"{path}, line {number}", RecordLineError(f"not valid JSON ({error.msg})")


class RecordLineError(DataError):
    """A .jsonl line that could not be parsed."""


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DataError(f"Reading {path} needs pyarrow: pip install 'tetra[parquet]' (or pyarrow).") from None
    try:
        table = parquet.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for damaged files
        raise DataError(f"{path} is not a readable Parquet file ({error}).") from None
    if text_field not in table.schema_arrow.names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}). "
                        "Choose the column that holds the text (--text-field).")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Every document of the source: a whole text file, or one .jsonl / .parquet record."""
    for path in source_files(source):
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        elif path.suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
