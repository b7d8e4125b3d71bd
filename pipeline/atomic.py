"""Atomic file writes: a reader sees either the old file or the whole new one, never half.

Every output file is written to a temporary file in the *same* folder (so the final
``os.replace`` is a rename within one file system, which POSIX makes atomic), flushed and
fsynced, then renamed over the target; the folder is fsynced afterwards so the rename
itself survives a power cut.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where unsupported."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_via_temp(path: Path, fill, mode: int) -> Path:
    """Create a temp file beside ``path``, let ``fill(fh)`` write it, fsync, rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | Path, data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (temp file beside it + fsync + ``os.replace``).

    Parameters
    ----------
    path : path-like
        Final file name; its folder must exist.
    data : bytes
        The whole content.
    mode : int
        Permission bits of the new file (temp files are created 0600).

    Returns
    -------
    Path
        ``path``.
    """
    return _write_via_temp(Path(path), lambda fh: fh.write(data), mode)


def copy_file_atomic(src: str | Path, path: str | Path, *, mode: int = 0o644) -> Path:
    """Copy the file ``src`` to ``path`` atomically (same guarantees as ``write_bytes_atomic``)."""
    def fill(fh):
        with open(src, "rb") as fin:
            shutil.copyfileobj(fin, fh, 1 << 20)

    return _write_via_temp(Path(path), fill, mode)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (see ``write_bytes_atomic``)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write a JSON document atomically, indented and newline-terminated."""
    return write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def replace_into(src: str | Path, dst: str | Path) -> Path:
    """Move a finished (already fsynced) file to ``dst`` with one atomic rename.

    ``src`` and ``dst`` must be on the same file system (keep staging folders beside the
    destination). The destination folder is fsynced so the move is durable.
    """
    dst = Path(dst)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    return dst


def write_bytes_exclusive(path: str | Path, data: bytes, *, mode: int = 0o644) -> Path:
    """Create ``path`` with ``data`` atomically, failing if it already exists.

    The content is written and fsynced to a temp file beside ``path``, then hard-linked to
    ``path`` (``os.link`` refuses an existing name, even against another process), so the
    file appears whole or not at all and an existing file is never replaced.

    Raises
    ------
    FileExistsError
        When ``path`` exists.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system: check, then rename
            if os.path.lexists(path):
                raise FileExistsError(str(path)) from None
            os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    fsync_dir(path.parent)
    return path
