"""Atomic writes whose results other users can read.

``tempfile.mkstemp`` / ``mkdtemp`` create 0600 files and 0700 folders. Renamed into place,
they would make an artifact that only its writer can read: a container serving it as another
user (``deploy/Dockerfile`` runs as uid 10001 over a read-only mount) could not open it. Files
and folders written here get the modes a plain ``open()`` / ``mkdir()`` would give them under
the process umask.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask_now() -> int:
    """Set-and-restore (``os.umask`` has no getter); only at import, before threads exist."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_now()


def _umask() -> int:
    """The process umask: from /proc where there is one (no race with other threads), else
    as it was when this module was imported."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def atomic_write(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename (``durable``: fsync
    before the rename, for state that must survive a power loss)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def staging_dir(target: Path) -> Path:
    """A new empty folder beside ``target`` (same file system, so it can be renamed onto it),
    with the mode a plain ``mkdir`` gives."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    os.chmod(tmp, dir_mode())
    return tmp


def share_tree(root: Path) -> None:
    """Give every file and folder under ``root`` the plain-``open``/``mkdir`` modes (for
    writers, like safetensors' ``save_file``, that create owner-only files)."""
    fmode, dmode = file_mode(), dir_mode()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, dmode if path.is_dir() else fmode)
