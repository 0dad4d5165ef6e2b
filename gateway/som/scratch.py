"""Scratch files and directories beside an output, and the removal of those a killed run left.

A run's `finally` removes its scratch (the split input and scored parts of a partitioned run, the
temporary output) on every exit Python sees, SIGTERM included. SIGKILL and the kernel's
out-of-memory killer give it no such chance, and the partitioned path, which exists for data
larger than memory, is the one most likely to meet the latter with the most scratch (about twice
the input) on disk.

So a run holds each scratch entry it makes: an exclusive flock on it, which the kernel releases
when the process ends, however it ends. The next run writing the same output removes the entries
whose lock it can take (`sweep`). An entry is made under a provisional name (`.new`), locked, then
renamed to its final name, and `sweep` looks at final names only: it never takes an entry a live
run has made and not yet locked.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def _names(target: Path) -> re.Pattern[str]:
    """Final names of the scratch of `target`: `.NAME.HEX.tmp` files, `.NAME.parts-HEX` directories."""
    return re.compile(rf"\.{re.escape(target.name)}\.(?:[0-9a-f]{{32}}\.tmp|parts-[0-9a-f]{{32}})")


def _take(path: Path) -> int | None:
    """A descriptor holding the exclusive flock of `path`, or None when a live run holds it (or
    the entry cannot be opened or locked: then it is left alone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _hold(fd: int) -> None:
    """Lock this run's new entry. Where the file system has no flock (some network ones), the run
    goes on without: `sweep` cannot lock there either, so it leaves the entry alone."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass


def _remove(path: Path) -> None:
    """Remove a scratch entry, a directory with what it holds; nothing there is no error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep(target: str | Path) -> list[Path]:
    """Remove the scratch of `target` left by runs that are gone; returns what was removed."""
    target = Path(target)
    names = _names(target)
    removed = []
    try:
        entries = [Path(e.path) for e in os.scandir(target.parent) if names.fullmatch(e.name)]
    except OSError:
        return removed
    for path in entries:
        fd = _take(path)
        if fd is None:
            continue
        try:
            _remove(path)
        finally:
            os.close(fd)
        log.warning("removed %s, left by a run that was killed", path)
        removed.append(path)
    return removed


@contextmanager
def _held(target: Path, name: str, make: Callable[[Path], int]) -> Iterator[Path]:
    """A new entry `name` beside `target`, made by `make` (which returns a descriptor of it) under
    the provisional name `name.new`, locked, then renamed; removed when the block ends (a file
    the block renamed away is not there any more). Abandoned scratch of `target` is swept first."""
    sweep(target)
    # Both names are known before anything is made, and both are removed in `finally`: a SIGTERM
    # just after the entry is made, before its descriptor would be returned, leaves nothing.
    final = target.parent / name
    new = target.parent / f"{name}.new"
    fd = -1
    try:
        fd = make(new)
        _hold(fd)
        os.rename(new, final)
        yield final
    finally:
        _remove(new)
        _remove(final)
        if fd >= 0:
            os.close(fd)


def _new_file(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _new_dir(path: Path) -> int:
    path.mkdir(mode=0o700)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def held_file(target: str | Path) -> AbstractContextManager[Path]:
    """A new empty file beside `target` (`.NAME.HEX.tmp`), this run's for the block; removed after
    it unless the block renamed it. OSError when the file cannot be made."""
    target = Path(target)
    return _held(target, f".{target.name}.{uuid.uuid4().hex}.tmp", _new_file)


def held_dir(target: str | Path) -> AbstractContextManager[Path]:
    """A new directory beside `target` (`.NAME.parts-HEX`, mode 0700), this run's for the block,
    removed with its content after it. OSError when the directory cannot be made."""
    target = Path(target)
    return _held(target, f".{target.name}.parts-{uuid.uuid4().hex}", _new_dir)
