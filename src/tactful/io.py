"""Atomic file writes and small JSON/JSONL helpers shared by every module.

Every artifact is written to a temporary file in the same directory and then
renamed over the target, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from tactful.errors import UserError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move a finished temporary directory into place, replacing `target` if it exists.

    The old copy is renamed aside first, so readers see either the old or the new
    directory, never a mix; `tmp` must be on the same filesystem (make it next to `target`).
    """
    import shutil

    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def ensure_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create `path` (and parents) and check that files can be written in it, before any slow work.

    A path that is a file, lies under a file, or is not writable is a UserError naming it
    (not a FileExistsError / PermissionError traceback after the model has loaded).
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is an existing file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # os.access ignores read-only mounts and ACLs; writing a file is the honest test
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise UserError(f"cannot create {what} {path}: a file is in the way") from None
    except NotADirectoryError:
        raise UserError(f"cannot create {what} {path}: part of the path is a file") from None
    except OSError as e:
        raise UserError(f"cannot write to {what} {path}: {e.strerror or e}") from None
    return path


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_text_file(path: str | os.PathLike, what: str = "file") -> str:
    """The text of a UTF-8 file, as a UserError naming the file and line if it is not text.

    A UTF-8 byte-order mark (spreadsheets write one) is dropped, and a file with a UTF-16
    byte-order mark (Windows "Unicode" text) is decoded as UTF-16: both are unambiguous.
    Anything else must be UTF-8; binary files (NUL bytes) are refused as such. A gzip file is
    read as the text it holds.
    """
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(b"\x1f\x8b"):  # gzip (e.g. an experiment's items.jsonl.gz): its text, decompressed
        import gzip

        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise UserError(f"{what} {path} is not a readable gzip file ({e})") from None
    if data.startswith(_UTF16_BOMS):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise UserError(f"{what} {path} starts with a UTF-16 byte-order mark but is not valid UTF-16") from None
    if b"\x00" in data:
        sample = data[:4096]
        if sample[1::2].count(0) > len(sample) // 4 or sample[0::2].count(0) > len(sample) // 4:
            raise UserError(f"{what} {path} looks like UTF-16 text without a byte-order mark; save it as UTF-8")
        raise UserError(f"{what} {path} is a binary file, not text (save it as UTF-8 text)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset {e.start}); "
                        "save it as UTF-8", where=f"{path}:{line}") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in rows)
    return atomic_write_text(path, text)


def append_jsonl(path: str | os.PathLike, row: Any) -> None:
    """Append one row and flush it to disk: used for resumable per-item logs.

    A crash can at worst leave a truncated last line, which `read_jsonl_tolerant`
    drops on resume.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl_tolerant(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL log written by `append_jsonl`, ignoring a torn final line."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn last line from an interrupted write
            raise
    return rows


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
