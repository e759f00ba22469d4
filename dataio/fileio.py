"""Atomic file writes: the one writer every checkpoint, index, table, figure and log uses.

Readers see the old file or the new one, never half a file: the bytes go to a temporary file in
the same folder (same filesystem, so the rename is atomic), which is flushed and fsynced, then
``os.replace``d over the target; the folder is fsynced too so that the rename survives a power
cut. Temporary files are named ``.<name>.<pid>.<random>.tmp`` (a killed process can leave one;
train.py removes those of its checkpoints at start).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable, IO


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable; best effort (not supported everywhere, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write_fn(f)`` on a binary temporary file beside ``path``, then move it over ``path``
    atomically; returns ``path`` as a Path (its folder is created when missing).

    On failure the temporary file is removed and the previous ``path`` is untouched: an OSError
    (disk full, permissions; errno kept) or a RuntimeError (anything ``write_fn`` raised) names
    ``path`` and says what to do. KeyboardInterrupt / SystemExit are cleaned up and re-raised.
    """
    path = Path(path)
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    created = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:  # "x": never clobber; default permissions follow the umask
            created = True
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        created = False
    except BaseException as e:
        if created:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if not isinstance(e, Exception):
            raise  # KeyboardInterrupt / SystemExit: cleaned up, keep their meaning
        what = (f"could not write {path}: {type(e).__name__}: {e}. The previous file, if any, is "
                "unchanged; check free disk space and write permission for that folder")
        if isinstance(e, OSError):
            raise OSError(e.errno, what) if e.errno is not None else OSError(what) from e
        raise RuntimeError(what) from e
    fsync_dir(folder)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """atomic_write of ``text`` as UTF-8."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
