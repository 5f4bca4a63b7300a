"""Atomic file and folder writes: a temp sibling, then os.replace, so a failure leaves nothing half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's file-mode creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp sibling and ``os.replace``; the file gets the mode any file the
    user's shell creates gets (``0o666 & ~umask``; a bare ``mkstemp`` would leave it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path next to ``path``; on success it is renamed to ``path`` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        raise


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: str | os.PathLike, kind: str = "file") -> None:
    """Raise CompressError (one line naming ``path``) unless a ``kind`` ("file" or "folder") can be written there
    now: not a folder where a file goes or a file where a folder goes, no regular file among its ancestors, and the
    folder it lands in writable (probed by creating and removing a temp file: read-only mounts and permissions
    both show). Writes nothing that stays."""
    from plans.errors import CompressError

    p = Path(path)
    if kind == "folder" and p.exists() and not p.is_dir():
        raise CompressError(f"--out {path}: an existing file, not a folder")
    if kind == "file" and p.is_dir():
        raise CompressError(f"--out {path}: an existing folder, not a file")
    where = {_nearest_existing(p.parent if p.parent != p else p)}
    if kind == "folder" and p.is_dir():
        where.add(p)
    for d in where:
        if not d.is_dir():
            raise CompressError(f"--out {path}: {d} is a file, so nothing can be written below it")
        try:
            fd, probe = tempfile.mkstemp(prefix=".compress-probe.", dir=d)
        except OSError as e:
            raise CompressError(f"--out {path}: cannot write in {d} ({e.strerror})") from None
        os.close(fd)
        os.unlink(probe)
