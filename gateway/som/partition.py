"""Scoring a history larger than memory, and on more than one process or machine.

Every feature of the scorer is per customer (its own history, its own families) except the peer
reference, which is a fixed table of sums. So the work splits by customers:

0. split: one streaming pass over the input (a lazy scan, never the whole file in memory; a
   Parquet input a slice of SPLIT_LINES at a time) writes each line to the Parquet files of its
   partition, chosen by a hash of the customer column;
1. first pass: each partition (only its peer columns) gives its peer sums; the sums merge into the
   one reference of the whole history (`merge_references`);
2. second pass: each partition is scored on its own against that same reference and written to its
   own Parquet part;
3. the parts are streamed into the output (Parquet or CSV), with the scorer's columns: the input
   columns, then score, flag, reasons.

Peak memory is one partition per worker plus the reference (the split and the merge hold a slice
and a batch a part); the input is read once in full and the partitions twice. Rows come out in input order, whatever the partitions and workers: each line
carries its position in the input through the split and the scoring (a column no input column is
named like, not kept), and the parts are merged on it, streaming. The same input gives the same
output file with 1 or N partitions, on 1 or N workers.

The same tasks run in-process, on local worker processes (`engine="local"`, `workers=N`), or on a
Dask distributed cluster (`engine="dask"`: a scheduler address, else a LocalCluster of `workers`
processes). With Dask the input and the output directory (where the partitions and parts are
written, next to the output) must be reachable by every worker under the same path (a shared file
system), as usual for file-based Dask jobs; the tasks are given absolute paths. A worker that dies
in a task is PartitionError som_worker_lost; a Dask scheduler lost during the run,
som_engine_unavailable.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import signal
import threading
import time
from concurrent.futures import CancelledError, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import polars as pl
from polars.io.plugins import register_io_source

from gateway.som import io as som_io, scratch
from gateway.som.config import SomConfig
from gateway.som.errors import SomError
from gateway.som.output import (OutputError, check_output, check_output_columns, output_directory,
                                 write_failure, writing)
from gateway.som.peers import merge_peer_references, peer_reference
from gateway.som.score import score_orders

__all__ = ["ENGINES", "PartitionError", "ScoreRun", "score_file", "default_partitions",
           "inspect_input", "split_input", "partition_reference", "merge_references", "steps"]

ENGINES = ("local", "dask")
# Lines per partition when the caller does not say: scoring holds about 250 bytes a line, so about
# 1 GB per worker, and few enough partitions that their overheads stay small.
TARGET_PARTITION_LINES = 4_000_000
CSV_BYTES_PER_LINE = 90  # to estimate a CSV's lines from its size without reading it
DASK_CONNECT_TIMEOUT = 5.0  # seconds to reach a Dask scheduler before giving up
PARENT_CHECK_SECONDS = 0.5  # how often a local worker process checks that its parent is alive
# Lines the merge of the scored parts into input order holds at once, over all parts (one batch
# each): a bound whatever the input's size and the number of partitions.
MERGE_LINES = 262_144
MIN_MERGE_BATCH = 1_024
# Lines of a Parquet input split at a time: Polars' partitioned sink of a whole file (with the
# lines' input positions) grew with the file, about 110 bytes a line, where a file split a slice
# at a time stays near one slice's worth.
SPLIT_LINES = 1_000_000

Progress = Callable[[str], None]


class PartitionError(SomError):
    """Bad partitioning options or an engine that cannot be used; `code` says which."""


@dataclass(frozen=True)
class ScoreRun:
    """What a scoring run did."""

    output: Path
    lines: int
    flagged: int
    partitions: int
    workers: int
    engine: str
    seconds: float


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _parquet_lines(path: Path) -> int:
    """The line count of a Parquet file, from its footer."""
    _require_bytes(path)
    try:
        return pl.scan_parquet(path).select(pl.len()).collect().item()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise som_io.SomInputError("som_unreadable", f"{path}: not a readable Parquet file ({exc})") from None


def _require_bytes(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise som_io.SomInputError("som_file_not_found", f"{path}: no such file") from None
    except OSError as exc:
        raise som_io.SomInputError("som_unreadable", f"{path}: {exc.strerror or exc}") from None
    if size == 0:
        raise som_io.SomInputError("som_empty_input", f"{path}: an empty file, no order lines")


def default_partitions(path: str | Path, workers: int = 1) -> int:
    """Enough partitions to keep each under TARGET_PARTITION_LINES, at least one a worker."""
    path = Path(path)
    if _is_parquet(path):
        lines = _parquet_lines(path)
    else:
        _require_bytes(path)
        lines = path.stat().st_size // CSV_BYTES_PER_LINE
    return max(workers, math.ceil(lines / TARGET_PARTITION_LINES), 1)


def inspect_input(path: str | Path) -> dict[str, pl.DataType]:
    """The input's column types, read as read_orders reads them (footer, header and first line
    only); SomInputError som_empty_input for a file without any line, som_unreadable for one that
    is not Parquet/CSV or is damaged (som_file_not_found, som_unknown_format as read_orders)."""
    path = Path(path)
    _require_bytes(path)
    lf, schema = som_io.scan_schema(path)  # the codes read_orders gives for the file's schema
    try:
        if _is_parquet(path):
            empty = _parquet_lines(path) == 0
        else:
            empty = lf.head(1).collect().height == 0
    except pl.exceptions.NoDataError:
        raise som_io.SomInputError("som_empty_input", f"{path}: no order lines") from None
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        raise som_io.SomInputError("som_unreadable", f"{path}: cannot be read ({exc})") from None
    if empty:
        raise som_io.SomInputError("som_empty_input", f"{path}: no order lines")
    return schema


def _check_shape(schema: dict[str, pl.DataType]) -> None:
    """read_orders' checks of the columns (names, shape, types) on the schema alone."""
    try:
        som_io.read_orders(pl.DataFrame(schema=schema))
    except som_io.SomInputError as exc:
        if exc.code != "som_empty_input":  # the frame is empty on purpose: its lines are not read
            raise


def _customer_column(lf: pl.LazyFrame) -> str:
    """The input's column of customers, as the file names it."""
    names = lf.collect_schema().names()
    written = {native: name for name, native in som_io.native_case(names).items()}
    if written:
        return written["customer"]
    return "BUYER_DEA_NO" if som_io.detect_shape(names) == "arcos" else "customer"


# What the peer reference reads, in either shape: the first pass reads only these columns.
PEER_COLUMNS = som_io.columns_for("customer", "customer_type", "state", "family", "date", "dosage_units")


def split_input(source: str | Path, work: str | Path, count: int, row_index: str | None = None
                ) -> list[str | None]:
    """Write the lines of each partition of customers under `work` (one streaming pass); the
    directory of each partition, None for one no customer hashed to. With `row_index`, each line
    gets its position in the input in a column of that name (see `_row_name`). A Parquet input
    is split SPLIT_LINES at a time (a CSV one has no cheap way to start mid-file): each slice's
    files of a partition are named after the slice, so a partition's files read in input order."""
    source, work = Path(source), Path(work)
    lf = som_io._scan(source)
    names = lf.collect_schema().names() + ([row_index] if row_index is not None else [])
    name = _key_name(names)
    customer = _customer_column(lf)
    key = (pl.col(customer).cast(pl.String).hash(seed=0) % count).cast(pl.UInt32)
    if _is_parquet(source):
        slices: list[tuple[int, int] | None] = [
            (start, SPLIT_LINES) for start in range(0, _parquet_lines(source), SPLIT_LINES)]
    else:
        slices = [None]
    try:
        for k, piece in enumerate(slices):
            chunk = lf if piece is None else lf.slice(*piece)
            if row_index is not None:
                chunk = chunk.with_row_index(row_index, offset=0 if piece is None else piece[0])
            staging = work / f"slice-{k:08d}"
            chunk.with_columns(key.alias(name)).sink_parquet(
                pl.PartitionBy(staging, key=name, include_key=False), mkdir=True,
                compression="uncompressed", statistics=False)  # scratch files: fast to write and read
            for folder in sorted(staging.iterdir()):
                (work / folder.name).mkdir(exist_ok=True)
                for file in sorted(folder.glob("*.parquet")):
                    file.rename(work / folder.name / f"{k:08d}-{file.name}")
            shutil.rmtree(staging)
    except (pl.exceptions.PolarsError, OSError) as exc:
        if write_failure(exc):
            raise OutputError("som_output_unwritable",
                              f"{work}: cannot write the partitions beside the output ({exc})") from None
        if isinstance(exc, pl.exceptions.InvalidOperationError):
            # customers that are no text (a list...): read_orders' code for them, not a bad file
            raise som_io.SomInputError("som_invalid_value", f"{customer}: {exc}") from None
        raise som_io.SomInputError("som_unreadable", str(exc)) from None
    dirs = [Path(work) / f"{name}={i}" for i in range(count)]
    return [str(d) if d.is_dir() and any(d.glob("*.parquet")) else None for d in dirs]


def _key_name(columns: Iterable[str], name: str = "_part") -> str:
    """The partition key's column: a name no input column has (the key is not kept)."""
    taken = set(columns)
    while name in taken:
        name = "_" + name
    return name


def _row_name(columns: Iterable[str]) -> str:
    """The column that carries each line's input position through a partitioned run: a name no
    input column has (the output does not keep it)."""
    return _key_name(columns, "_input_row")


def _read_partition(part: str, columns: Iterable[str] | None = None) -> pl.DataFrame:
    """The lines of one partition (a directory of Parquet files, or the whole input file), as read:
    shape detection is read_orders' job."""
    path = Path(part)
    lf = pl.scan_parquet(path / "*.parquet") if path.is_dir() else som_io._scan(path)
    if columns is not None:
        wanted = set(columns)
        names = lf.collect_schema().names()
        case = som_io.native_case(names)  # CUSTOMER is the customer column
        lf = lf.select([c for c in names if case.get(c, c) in wanted])
    try:
        return lf.collect()
    except pl.exceptions.PolarsError as exc:
        raise som_io.SomInputError("som_unreadable", str(exc)) from None


@dataclass(frozen=True)
class _Failure:
    """A coded error raised in a worker, carried back as a result (the domain's exceptions do not
    all survive pickling)."""

    code: str
    message: str


def _coded(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def task(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - only errors with a code are the user's to fix
            code = getattr(exc, "code", None)
            if isinstance(code, str):
                return _Failure(code, str(exc))
            raise
    return task


@_coded
def partition_reference(part: str) -> pl.DataFrame | None:
    """First pass task: the peer sums of one partition (None when it holds no line)."""
    lines = _read_partition(part, PEER_COLUMNS)
    return peer_reference(lines) if lines.height else None


@_coded
def _score_task(part: str, index: int, config: dict[str, Any], peers: pl.DataFrame,
                out_dir: str, row_index: str | None = None, batch: int | None = None
                ) -> tuple[str | None, int, int]:
    """Second pass task: score one partition against the shared reference; write its part (in
    input order when the lines carry their input position, `row_index`: _concat_parts merges on it,
    reading `batch` lines, one row group, at a time)."""
    lines = _read_partition(part)
    if not lines.height:
        return None, 0, 0
    scored = som_io.with_input_columns(score_orders(lines, SomConfig.from_dict(config), peers), lines)
    if row_index is not None and not scored[row_index].is_sorted():
        scored = scored.sort(row_index)
    target = Path(out_dir) / f"part-{index:05d}.parquet"
    with writing(target, "cannot write a scored partition beside the output: "):
        scored.write_parquet(target, compression="uncompressed", statistics=False,  # scratch, read once
                             row_group_size=batch)
    return str(target), scored.height, int(scored["flag"].sum())


def merge_references(tables: list[pl.DataFrame]) -> pl.DataFrame:
    """The reference of the whole history from the references of its partitions."""
    return merge_peer_references(tables)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while worker processes start, so that they inherit it ignored (through
    exec, as spawned processes are): a Ctrl-C at the terminal reaches the whole process group,
    and each worker, still importing, printed a KeyboardInterrupt traceback. The parent handles
    it and stops them (they also exit with it)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


class _Runner:
    """Runs a list of task argument tuples, reporting each completion."""

    def __init__(self, engine: str, workers: int, scheduler: str | None) -> None:
        self.engine = engine
        self.workers = workers
        self.scheduler = scheduler
        self._pool: ProcessPoolExecutor | None = None
        self._thread_hook: Any = None
        self._client: Any = None
        self._cluster: Any = None

    def __enter__(self) -> "_Runner":
        if self.engine == "dask":
            try:
                from distributed import Client, LocalCluster
            except ImportError:  # pragma: no cover - dask is an optional dependency
                raise PartitionError("som_engine_unavailable",
                                     "engine 'dask' needs dask[distributed] installed") from None
            try:
                if self.scheduler:
                    self._client = Client(self.scheduler, timeout=DASK_CONNECT_TIMEOUT)
                else:
                    self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1,
                                                 processes=True, dashboard_address=None)
                    self._client = Client(self._cluster)
            except (OSError, ValueError, TypeError) as exc:  # TimeoutError is an OSError
                self.__exit__(None, None, None)
                where = (f"the Dask scheduler {self.scheduler}" if self.scheduler
                         else "a local Dask cluster")
                raise PartitionError("som_engine_unavailable", f"cannot reach {where}: {exc}") from None
        elif self.workers > 1:
            # Spawned, not forked: the parent may hold Polars' and Numba's threads.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                             initializer=_exit_with_parent, initargs=(os.getpid(),))
            self._thread_hook = threading.excepthook
            threading.excepthook = self._thread_failed
        return self

    def _thread_failed(self, args: Any) -> None:
        """The pool's own manager thread can trip over a worker killed while the pool was still
        starting the others (a rare race inside concurrent.futures); the caller learns of it as
        som_worker_lost, so its traceback would only say the same thing louder."""
        if args.thread is None or args.thread is not getattr(self._pool, "_executor_manager_thread", None):
            self._thread_hook(args)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._pool is not None:
            if exc_type is not None:
                # Failed or interrupted (SIGTERM): the running tasks' results are not wanted, so
                # their workers are stopped rather than waited for.
                for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
                    proc.terminate()
            self._pool.shutdown(cancel_futures=True)
            threading.excepthook = self._thread_hook
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()

    def share(self, value: Any) -> Any:
        """`value` as an argument every task takes: on Dask, sent once to each worker (a plain
        argument goes whole into the graph of every task: the peer reference once a partition,
        held by the scheduler until the run ends); local tasks take it as it is."""
        if self._client is not None:
            try:
                return self._client.scatter(value, broadcast=True, hash=False)
            except (OSError, CancelledError) as exc:  # CommClosedError, TimeoutError are OSErrors
                raise self._lost(exc) from None
        return value

    def _lost(self, exc: BaseException) -> PartitionError:
        where = f"the Dask scheduler {self.scheduler}" if self.scheduler else "the local Dask cluster"
        return PartitionError("som_engine_unavailable", f"lost {where} during the run: {exc}")

    def map(self, fn: Callable[..., Any], tasks: list[tuple], on_done: Callable[[], None]) -> list[Any]:
        """Results in task order. A worker that dies in a task (killed, typically by the kernel's
        out-of-memory killer or a Dask nanny's memory limit) is PartitionError som_worker_lost."""
        results: list[Any] = [None] * len(tasks)
        if self._client is not None:
            from distributed import KilledWorker, as_completed as dask_completed

            futures = [self._client.submit(fn, *args, pure=False) for args in tasks]
            position = {f.key: i for i, f in enumerate(futures)}
            try:
                for fut in dask_completed(futures):
                    results[position[fut.key]] = fut.result()
                    on_done()
            except KilledWorker as exc:
                raise _worker_lost(f"Dask: {exc}") from None
            except CancelledError as exc:  # the scheduler went away: Dask cancels every future
                raise self._lost(exc) from None
        elif self._pool is not None:
            try:  # a pool broken since the last map refuses new tasks alike
                try:
                    with _sigint_ignored():  # the workers it starts ignore Ctrl-C (see there)
                        futures = {self._pool.submit(fn, *args): i for i, args in enumerate(tasks)}
                except Exception as exc:
                    # A worker killed while the pool still starts the others: the pool, marked
                    # broken, closes its pipes, and starting the next fails on them in one of
                    # several ways (OSError "handle is closed", ValueError "bad value(s) in
                    # fds_to_keep"...). OSError alone: a process that could not start at all.
                    if getattr(self._pool, "_broken", False) or isinstance(exc, OSError):
                        raise _worker_lost(f"a local worker process ended or could not start "
                                           f"({type(exc).__name__}: {exc})") from None
                    raise
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    on_done()
            except BrokenProcessPool:
                raise _worker_lost("a local worker process ended abruptly") from None
        else:
            for i, args in enumerate(tasks):
                results[i] = fn(*args)
                on_done()
        failed = [r for r in results if isinstance(r, _Failure)]
        if failed:
            first = failed[0]
            if len(tasks) > 1:
                # Each partition counts its own lines: the figures are not the file's.
                raise PartitionError(first.code, f"{first.message} (in the first failing partition; "
                                                 f"{len(failed)} of {len(tasks)} partitions failed)")
            raise PartitionError(first.code, first.message)
        return results


def _exit_with_parent(parent: int) -> None:
    """In a local worker process: exit once the parent is gone. A parent killed outright (SIGKILL,
    the out-of-memory killer) cannot stop its workers, and they would wait for tasks for ever,
    each holding what it had loaded."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker_lost(detail: str) -> PartitionError:
    return PartitionError("som_worker_lost",
                          "a worker died while scoring a partition (killed, for instance for lack "
                          "of memory); nothing was written: more partitions make each smaller "
                          f"({detail})")


def _merge_batch(parts: int) -> int:
    """Lines read at a time from each of `parts` scored parts when they are merged."""
    return max(MIN_MERGE_BATCH, MERGE_LINES // max(parts, 1))


def _batches(part: str, size: int) -> Iterator[pl.DataFrame]:
    """The lines of a scored part, `size` at a time (a row group each: _score_task writes them so)."""
    offset = 0
    while True:
        lines = pl.scan_parquet(part).slice(offset, size).collect()
        if not lines.height:
            return
        offset += lines.height
        yield lines


def _in_input_order(parts: list[str], row_index: str, size: int) -> Iterator[pl.DataFrame]:
    """The lines of the parts (each sorted on `row_index`) in input order, streaming: one batch of
    each part at a time. Polars' merge_sorted of many parts held them all in memory (1.3 GB for 3M
    lines on 8 partitions, more than scoring them unpartitioned). Every line a part has still to
    read comes after that part's last buffered line, so the lines up to the smallest of those
    (over the parts not read to the end) can go out."""
    readers = [_batches(p, size) for p in parts]
    buffers: list[pl.DataFrame | None] = [next(r, None) for r in readers]
    more = [b is not None for b in buffers]
    while True:
        held = [i for i, b in enumerate(buffers) if b is not None and b.height]
        if not held:
            return
        ends = [buffers[i][row_index][-1] for i in held if more[i]]
        upto = min(ends) if ends else None
        out = []
        for i in held:
            lines = buffers[i]
            n = lines.height if upto is None else int(lines[row_index].search_sorted(upto, side="right"))
            out.append(lines[:n])
            buffers[i] = lines[n:]
            if more[i] and not buffers[i].height:
                buffers[i] = next(readers[i], None)
                more[i] = buffers[i] is not None
        yield pl.concat(out).sort(row_index).drop(row_index)


def _concat_parts(parts: Iterable[str], output: Path, row_index: str | None = None,
                  batch: int | None = None) -> None:
    """Stream the parts (each with its input columns as read: io.with_input_columns) into the
    output, written under a temporary name, then renamed. With `row_index`, the parts are merged
    on it into input order (`_in_input_order`, `batch` lines of each part at a time, by default
    `_merge_batch`), and it is dropped."""
    parts = list(parts)
    batch = batch or _merge_batch(len(parts))
    if row_index is None:
        lazy = pl.concat([pl.scan_parquet(p) for p in parts], how="vertical")
    else:
        schema = pl.scan_parquet(parts[0]).drop(row_index).collect_schema()

        def source(columns: list[str] | None, predicate: Any, n_rows: int | None,
                   batch_size: int | None) -> Iterator[pl.DataFrame]:
            for lines in _in_input_order(parts, row_index, batch):
                yield lines if columns is None else lines.select(columns)

        lazy = register_io_source(source, schema=schema)
    with writing(output), som_io.atomic_output(output) as tmp:
        if output.suffix.lower() == ".csv":
            lazy.sink_csv(tmp)
        else:
            lazy.sink_parquet(tmp, **som_io.PARQUET_OUTPUT)


def score_file(source: str | Path, output: str | Path, config: SomConfig = SomConfig(), *,
               partitions: int | None = None, workers: int = 1, engine: str = "local",
               scheduler: str | None = None, progress: Progress | None = None) -> ScoreRun:
    """Score a Parquet/CSV history (native or ARCOS shape) into `output` (Parquet or CSV).

    partitions=1 with one local worker reads the whole file at once (the plain path); otherwise
    the file is scored by partitions of customers in bounded memory as described above.
    `progress` is called with a stage name after every step (see `steps`).
    """
    source, output = Path(source), Path(output)
    if engine not in ENGINES:
        raise PartitionError("som_unknown_engine", f"unknown engine {engine!r}: use {' or '.join(ENGINES)}")
    if workers < 1:
        raise PartitionError("som_bad_workers", "workers must be at least 1")
    if partitions is not None and partitions < 1:
        raise PartitionError("som_bad_partitions", "partitions must be at least 1")
    if output.suffix.lower() not in (".parquet", ".pq", ".csv"):
        raise PartitionError("som_unknown_output", f"{output}: expected .parquet or .csv")
    if not source.exists():
        raise som_io.SomInputError("som_file_not_found", f"{source}: no such file")
    if scheduler and engine != "dask":
        raise PartitionError("som_bad_engine_options", "a scheduler address needs engine 'dask'")
    # Everything that can be known before reading the lines: the output is not the input and can
    # be written, the input is readable, not empty, of a known shape, and fits the output format.
    check_output(output, source)
    schema = inspect_input(source)
    _check_shape(schema)
    check_output_columns(output, schema)
    tick = progress or (lambda stage: None)
    started = time.perf_counter()
    with output_directory(output):  # made only now; removed again if this run fails
        count = partitions or default_partitions(source, workers if engine == "local" else max(workers, 2))
        if count == 1 and workers == 1 and engine == "local":
            return _score_whole(source, output, config, tick, started)
        return _score_partitions(source, output, config, count, workers, engine, scheduler, tick, started)


def _score_whole(source: Path, output: Path, config: SomConfig, tick: Progress, started: float) -> ScoreRun:
    """The plain path: the whole file in memory."""
    raw = som_io.read_table(source)
    tick("read")
    scored = score_orders(raw, config)
    tick("score")
    with writing(output):
        som_io.write_like_input(scored, raw, output)
    tick("write")
    return ScoreRun(output, scored.height, int(scored["flag"].sum()), 1, 1, "local",
                    time.perf_counter() - started)


def _score_partitions(source: Path, output: Path, config: SomConfig, count: int, workers: int, engine: str,
                      scheduler: str | None, tick: Progress, started: float) -> ScoreRun:
    # The tasks get absolute paths: a Dask worker runs in a directory of its own, where a relative
    # path names another file or none.
    source = source.absolute()
    with contextlib.ExitStack() as stack:
        try:  # removes the scratch of killed runs too; this run's goes when the block ends
            work = stack.enter_context(scratch.held_dir(output.absolute()))
        except OSError as exc:
            raise OutputError("som_output_unwritable", f"{output.parent}: {exc.strerror or exc}") from None
        row = _row_name(som_io.scan_schema(source)[1]) if count > 1 else None  # one part: in order already
        if count > 1:
            parts = [p for p in split_input(source, work / "input", count, row) if p is not None]
        else:
            parts = [str(source)]
        tick("split")
        skipped = count - len(parts)  # partitions no customer hashed to: nothing to do
        (work / "scored").mkdir()
        with _Runner(engine, workers, scheduler) as runner:
            refs = runner.map(partition_reference, [(p,) for p in parts], lambda: tick("peers"))
            for _ in range(skipped):
                tick("peers")
            refs = [r for r in refs if r is not None]
            if not refs:
                raise som_io.SomInputError("som_empty_input", f"{source}: no order lines")
            peers = merge_references(refs)
            tick("reference")
            cfg, shared = config.as_dict(), runner.share(peers)
            batch = _merge_batch(len(parts))
            done = runner.map(_score_task, [(p, i, cfg, shared, str(work / "scored"), row, batch)
                                            for i, p in enumerate(parts)], lambda: tick("score"))
            for _ in range(skipped):
                tick("score")
        _concat_parts([d[0] for d in done if d[0] is not None], output, row, batch)
        tick("write")
    return ScoreRun(output, sum(d[1] for d in done), sum(d[2] for d in done), count, workers, engine,
                    time.perf_counter() - started)


def steps(partitions: int, workers: int = 1, engine: str = "local") -> int:
    """How many times `score_file` calls `progress` (for a progress bar's total)."""
    if partitions == 1 and workers == 1 and engine == "local":
        return 3
    return 2 * partitions + 3

