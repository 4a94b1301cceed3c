"""Readers for JSONL, JSON, CSV and Parquet files and for Hugging Face datasets.

Every reader returns a list of `Row`s: a dict plus where it came from (file and line),
so that a later missing field can be reported as `file:line: missing field 'x'`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from tactful.errors import UserError
from tactful.io import read_text_file

FORMATS = ("jsonl", "json", "csv", "parquet")


@dataclass
class Row:
    data: dict[str, Any]
    where: str  # "file:line" (or "hub-id[split]#index")

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def require(self, key: str) -> Any:
        """The value of `key`, or a UserError naming the file, line and field."""
        if key not in self.data or self.data[key] is None:
            have = ", ".join(sorted(map(str, self.data))) or "none"
            raise UserError(f"missing field {key!r} (fields present: {have})", where=self.where)
        return self.data[key]


def detect_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    for s in reversed(suffixes):
        s = s.lstrip(".")
        if s in ("jsonl", "ndjson"):
            return "jsonl"
        if s in FORMATS:
            return s
    raise UserError(f"cannot tell the format of {path} from its name; use .jsonl, .json, .csv or .parquet")


def read_rows(path: str | os.PathLike, *, fmt: str | None = None) -> list[Row]:
    """Read a local data file into rows. Empty files and malformed lines are user errors."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data file {path} does not exist")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a data file (or a hub dataset id)")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    rows = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[fmt](path)
    if not rows:
        raise UserError(f"data file {path} is empty (no records)")
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    # split on "\n" only: str.splitlines would also split at U+2028 etc., which JSON strings may hold
    for i, line in enumerate(read_text_file(path, "data file").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"malformed JSON ({e.msg} at column {e.colno})", where=f"{path}:{i}") from None
        if not isinstance(obj, dict):
            raise UserError(f"expected a JSON object per line, got {type(obj).__name__}", where=f"{path}:{i}")
        rows.append(Row(obj, f"{path}:{i}"))
    return rows


def _read_json(path: Path) -> list[Row]:
    text = read_text_file(path, "data file")
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"malformed JSON ({e.msg})", where=f"{path}:{e.lineno}") from None
    if isinstance(obj, dict):
        # {"data": [...]} / {"train": [...]} style wrappers
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1:
            obj = lists[0]
        else:
            obj = [obj]
    if not isinstance(obj, list):
        raise UserError("expected a JSON list of objects", where=str(path))
    rows = []
    for i, item in enumerate(obj):
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict):
            raise UserError(f"item {i} is a {type(item).__name__}, expected an object", where=str(path))
        rows.append(Row(item, f"{path}[{i}]"))
    return rows


def _read_csv(path: Path) -> list[Row]:
    rows = []
    # strict: an unterminated quote is an error, not the rest of the file merged into one value
    reader = csv.DictReader(io.StringIO(read_text_file(path, "data file"), newline=""), strict=True)
    try:
        if reader.fieldnames is None:
            return []
    except csv.Error as e:
        raise UserError(f"malformed CSV header ({e})", where=f"{path}:1") from None
    if any(not name for name in reader.fieldnames if name is not None) and len(reader.fieldnames) > 1:
        # pandas-style index column with an empty header: name it so rows stay well-formed
        reader.fieldnames = [name or "_index" for name in reader.fieldnames]
    while True:
        start = reader.line_num + 1  # the line the next record starts on (or a blank line before it)
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise UserError("unterminated quoted field: its opening quote is never closed, so the rest of "
                                "the file would become one value", where=f"{path}:{start}") from None
            raise UserError(f"malformed CSV ({e})", where=f"{path}:{reader.line_num}") from None
        if None in row:
            raise UserError(f"row has more values than the header's {len(reader.fieldnames)} columns",
                            where=f"{path}:{reader.line_num}")
        rows.append(Row(dict(row), f"{path}:{reader.line_num}"))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise UserError(f"cannot read Parquet file ({e})", where=str(path)) from None
    return [Row(r, f"{path}#{i}") for i, r in enumerate(table.to_pylist())]


def read_hub(dataset_id: str, *, split: str = "train", name: str | None = None,
             data_files: str | Sequence[str] | None = None) -> list[Row]:
    """Rows of a Hugging Face dataset (hub id or local dataset directory)."""
    try:
        import datasets
    except ImportError:
        raise UserError("reading hub datasets needs `datasets`: pip install datasets") from None
    try:
        ds = datasets.load_dataset(dataset_id, name, split=split, data_files=data_files)
    except Exception as e:  # network, auth, missing split: all user-facing
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load dataset {dataset_id!r} (split {split!r}): {msg}. "
            "Offline? Download the file and pass its local path instead."
        ) from None
    return [Row(dict(r), f"{dataset_id}[{split}]#{i}") for i, r in enumerate(ds)]


def read_any(source: str | os.PathLike, *, split: str = "train", fmt: str | None = None) -> list[Row]:
    """A local file if it exists, otherwise a hub dataset id."""
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower().lstrip(".") in FORMATS + ("ndjson",):
        return read_rows(path, fmt=fmt)
    return read_hub(str(source), split=split)


T = TypeVar("T")


def convert(rows: Iterable[Row], fn: Callable[[Row], T | None]) -> list[T]:
    """Map rows to records, dropping rows for which `fn` returns None."""
    out = []
    for row in rows:
        rec = fn(row)
        if rec is not None:
            out.append(rec)
    return out


def parse_bool(value: Any, row: Row, field_name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise UserError(f"field {field_name!r} should be true/false, got {value!r}", where=row.where)
