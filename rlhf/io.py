"""Crash-safe file writes: a reader sees the old file or directory, or the complete new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk, not only the file's bytes."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; the result should look like any other write
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_dir(path: Path | str, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` in one rename.

    On any exception (disk full, Ctrl-C) the temporary directory is removed and `path` is left as it was.
    Replacing an existing directory takes two renames (old aside, new in); the old one is deleted only after the new
    one is in place, so a crash in between leaves `<path>.old-*` holding the previous complete version.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            if not overwrite:
                raise FileExistsError(path)
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_atomic_dirs(parent: Path | str, name_glob: str = "*") -> None:
    """Clean up after `atomic_dir`s that were killed in `parent` (for targets matching `name_glob`): a temporary
    directory (`.NAME.*.tmp`) is an unfinished write and goes; a `.NAME.old-*` is the previous complete version, put
    back as NAME when the new one never arrived, removed when it did."""
    parent = Path(parent)
    for old in parent.glob(f".{name_glob}.old-*"):
        target = parent / old.name[1:].rpartition(".old-")[0]
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)
    for tmp in parent.glob(f".{name_glob}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def append_jsonl(path: Path | str, row: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk, so a killed run keeps every row it logged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Read JSON lines, ignoring a last line cut short by a crash."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def trim_jsonl(path: Path | str, last_step: int) -> None:
    """Keep the rows logged up to `last_step` (the checkpoint a run resumes from): every step then appears once."""
    path = Path(path)
    if path.exists():
        rows = [row for row in read_jsonl(path) if row.get("step", 0) <= last_step]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
