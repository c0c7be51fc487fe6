"""The app's downloads: a private folder per process, files written without following links.

The folder comes from tempfile.mkdtemp (mode 0700, a fresh random name), so two app processes on
one machine never share a path, and it is removed when the process exits. Each run writes under
`run-<id>/`; a file is opened with O_NOFOLLOW, so a link planted at its name is refused, not followed.
"""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path

PREFIX = "llamaviz-app-"
_root: Path | None = None
_lock = threading.Lock()


def export_root() -> Path:
    """This process's private export folder, made on first use and removed at exit."""
    global _root
    with _lock:
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix=PREFIX))  # 0700, unique name
            atexit.register(remove_root)
        return _root


def remove_root() -> None:
    """Delete the export folder and everything in it (at exit, or when the app shuts down)."""
    global _root
    with _lock:
        root, _root = _root, None
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def run_folder(run_id: int) -> Path:
    """run-<id> inside the export folder, made private; ValueError when something else sits at that name."""
    folder = export_root() / f"run-{int(run_id)}"
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ValueError(f"refusing to export into {folder}: it is not a folder this app made")
    return folder


def remove_run_folder(run_id: int) -> None:
    """Delete one run's exports (nothing when the export folder was never made)."""
    if _root is not None:
        shutil.rmtree(_root / f"run-{int(run_id)}", ignore_errors=True)


def write_private(path: Path, data: bytes) -> Path:
    """Write `data` to `path` (mode 0600), replacing a file of ours; ValueError when `path` is a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags, 0o600)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK):
            raise ValueError(f"refusing to write {path.name}: a symbolic link sits at {path}") from None
        raise
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    return path
