"""Where scoring writes: checks made before anything is read or written (the output is not the
input, its directory can be made and written, its format can hold the input's columns), the
output's directory made only for a run that succeeds, and OS refusals while writing turned into
coded errors. The house rule: bad input or a bad output path gets a code and loses nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from gateway.som.errors import SomError

__all__ = ["OutputError", "check_output", "check_output_columns", "output_directory", "writing",
           "write_failure"]


class OutputError(SomError):
    """The output cannot be written as asked: som_output_is_input (it would replace the input),
    som_output_unwritable (its directory cannot be made or written, or the write failed: the OS
    message says why), som_output_unsupported (the format cannot hold some input columns)."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # b does not exist (or a dangling link): it is not the input
        return False


def _missing_dirs(directory: Path) -> list[Path]:
    """The directories to make for `directory` to exist, outermost first; OutputError when the
    nearest existing one is not a directory or cannot be written."""
    missing: list[Path] = []
    d = directory
    while not os.path.lexists(d) and d.parent != d:
        missing.append(d)
        d = d.parent
    if not d.is_dir():
        raise OutputError("som_output_unwritable", f"{directory}: {d} is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        # os.access says no for a read-only mount too, where chmod would not help
        why = "read-only file system" if os.statvfs(d).f_flag & os.ST_RDONLY else "permission denied"
        raise OutputError("som_output_unwritable", f"{directory}: {d}: {why}")
    return missing[::-1]


def check_output(output: str | Path, source: str | Path | None = None) -> None:
    """Refuse up front, before anything is read or written, an output that would replace the
    input (whatever the spelling of its path, a link to it included) and one whose directory
    cannot be made or written."""
    output = Path(output)
    if source is not None and _same_file(Path(source), output):
        raise OutputError("som_output_is_input", f"{output}: this is the input {source}; write the output "
                                                 "to another file")
    if output.is_dir():
        raise OutputError("som_output_unwritable", f"{output}: is a directory")
    _missing_dirs(output.parent)


def check_output_columns(output: str | Path, schema: dict[str, pl.DataType]) -> None:
    """Refuse a CSV output of input columns (`schema`) that CSV cannot hold."""
    output = Path(output)
    if output.suffix.lower() == ".csv":
        bad = _not_csv(schema)
        if bad:
            raise OutputError("som_output_unsupported",
                              f"{output}: CSV cannot hold the columns {', '.join(bad)} "
                              f"({', '.join(str(schema[c]) for c in bad)}); write Parquet instead")


def _not_csv(schema: dict[str, pl.DataType]) -> list[str]:
    """The columns a CSV writer refuses (nested, binary, durations...), found by writing one null
    of each type."""
    bad = []
    for name, dtype in schema.items():
        try:
            pl.DataFrame({"c": pl.Series([None], dtype=dtype)}).write_csv()
        except (pl.exceptions.PolarsError, TypeError, ValueError):
            bad.append(name)
    return bad


def _remove_dirs(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except FileNotFoundError:  # listed, not made yet (or gone): its parent may be ours
            continue
        except OSError:  # not empty: not ours to clear
            return


@contextlib.contextmanager
def output_directory(output: str | Path) -> Iterator[Path]:
    """Make the missing directories of `output`'s parent and prove it writable (a file made there
    and removed); when the block fails (an exception, SystemExit included), remove again the
    directories made here. OutputError som_output_unwritable with the OS message otherwise."""
    output = Path(output)
    created: list[Path] = []
    try:
        for d in _missing_dirs(output.parent):
            created.append(d)  # listed before it is made: a SIGTERM as mkdir returns finds it
            try:
                d.mkdir()
            except FileExistsError:  # made meanwhile by someone else: not ours to remove
                created.pop()
        # Named here and removed in `finally`, for the same reason (mkstemp names it too late).
        probe = output.parent / f".{output.name}.{uuid.uuid4().hex}.probe"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)
    except OSError as exc:
        _remove_dirs(created)
        raise OutputError("som_output_unwritable", f"{output}: {exc.strerror or exc}") from None
    except BaseException:
        _remove_dirs(created)
        raise
    try:
        yield output.parent
    except BaseException:
        _remove_dirs(created)
        raise


# The OS errors that put the output side at fault (permission, file too large, no space,
# read-only file system, quota), when a read and a write share one call.
_WRITE_ERRNOS = {errno.EACCES, errno.EFBIG, errno.ENOSPC, errno.EROFS, errno.EDQUOT}


def _os_errno(exc: BaseException) -> int | None:
    """The errno of an OSError, or of the OS error a Polars error reports ('(os error N)')."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return int(found.group(1)) if found else None


def write_failure(exc: BaseException) -> bool:
    return _os_errno(exc) in _WRITE_ERRNOS


@contextlib.contextmanager
def writing(output: Path, what: str = "") -> Iterator[None]:
    """A failed write becomes OutputError som_output_unwritable, with the OS message."""
    try:
        yield
    except (OSError, pl.exceptions.PolarsError) as exc:
        if not isinstance(exc, OSError) and _os_errno(exc) is None:  # not the OS's refusal: ours
            raise
        raise OutputError("som_output_unwritable", f"{output}: {what}{exc}") from None
