"""Atomic file writes: the one writer every checkpoint, index, table, figure and log uses.

Readers see the old file or the new one, never half a file: the bytes go to a temporary file in
the same folder (same filesystem, so the rename is atomic), which is flushed and fsynced, then
``os.replace``d over the target; the folder is fsynced too so that the rename survives a power
cut. Temporary files are named ``.<name>.<pid>.<random>.tmp`` (a killed process can leave one;
train.py removes those of its checkpoints at start).
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
from pathlib import Path
import shutil
import tempfile
from typing import IO
import uuid


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
        what = (
            f"could not write {path}: {type(e).__name__}: {e}. The previous file, if any, is "
            "unchanged; check free disk space and write permission for that folder"
        )
        if isinstance(e, OSError):
            raise OSError(e.errno, what) if e.errno is not None else OSError(what) from e
        raise RuntimeError(what) from e
    fsync_dir(folder)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """atomic_write of ``text`` as UTF-8."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ============ dataset folders: written in a temporary sibling, published whole ============

# Written last into a folder datasets.py finished (generation, download, resize, convert): a
# folder without it was interrupted. Never a photo, never reported as skipped.
COMPLETE_MARKER = ".complete"


def write_marker(folder, info):
    """Last file written into a finished dataset folder (see COMPLETE_MARKER)."""
    (Path(folder) / COMPLETE_MARKER).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def read_marker(root):
    """The dict stored in ``root/.complete``, or None when the folder is not complete."""
    marker = Path(root) / COMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def is_complete(root):
    """True when ``root`` was finished by this module (generation, download or resize)."""
    return read_marker(root) is not None


def make_tmp_dir(final):
    """A fresh sibling of ``final`` (same filesystem, so a rename can publish it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def publish_dir(tmp, final):
    """Move a finished ``tmp`` folder to ``final``; an empty ``final`` is replaced,
    an old complete dataset is swapped out and deleted only after the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists() and any(final.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rename(final, old / "data")
    elif final.exists():
        final.rmdir()
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
