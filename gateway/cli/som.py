"""`gateway som ...`: suspicious order monitoring from the command line.

synth (a labelled synthetic history), score (batch scoring, by partitions of customers on local
worker processes or a Dask cluster), evaluate (precision, recall, ROC AUC against the labels, the
litigation rule sets beside), diligence (a due-diligence page for one flagged line), load-history
(seeds the live SOM state under the home).
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import click

from gateway.cli import Context, pass_context

# Where load-history keeps the live state, inside the home.
STATE_FILE = Path("som") / "state.bin"
# Seconds between redraws of score's progress bar when stderr is no terminal (a log file).
NON_TTY_REDRAW_SECONDS = 30.0


def _fail(code: str, message: str, exit_code: int = 2) -> NoReturn:
    click.echo(json.dumps({"error": {"code": code, "message": message}}), err=True)
    sys.exit(exit_code)


def _guard(exc: Exception) -> NoReturn:
    """Errors a user can act on carry a `code`: print it and exit 2; anything else is a bug."""
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        _fail(code, str(exc))
    raise exc


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGINT (Ctrl-C) raise SystemExit(143 or 130: 128 + the
    signal, as a shell reports them) so that the `finally` blocks remove temporary outputs and
    scratch directories; another of them during that cleanup is ignored. Ctrl-C used to be a
    KeyboardInterrupt ("Aborted!", exit 1). The previous handlers are put back after."""
    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, signal.SIG_DFL if before is None else before)


def _terminable(command: Callable[..., Any]) -> Callable[..., Any]:
    """A command that cleans up after itself on SIGTERM (see _sigterm_exits)."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _sigterm_exits():
            return command(*args, **kwargs)
    return run


def state_path(ctx: Context) -> Path:
    return ctx.settings.home / STATE_FILE


def _config(ctx: Context, path: str | None) -> Any:
    """Thresholds: --config FILE (a [som] table or top-level keys), else the home's gateway.toml
    [som] table, else the defaults."""
    from gateway.som.config import SomConfig, SomConfigError

    try:
        if path:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
            return SomConfig.from_dict(data.get("som", data))
        return SomConfig.from_dict(ctx.settings.section("som"))
    except (tomllib.TOMLDecodeError, SomConfigError, UnicodeDecodeError) as exc:
        # UnicodeDecodeError: TOML is UTF-8, and the file is not
        _fail("som_config_invalid", f"{path or ctx.settings.config_path}: {exc}")
    except OSError as exc:
        _fail("som_config_invalid", f"{path}: cannot be read ({exc.strerror or exc})")


# The column a scored table is searched by (diligence --line); a scored CSV, or the Parquet
# output of a CSV input, holds it as the text it was written. Every other column is parsed where
# it is used, with a code for text that is not what it should be (io.read_orders for units and
# dates, evaluate for scores, labels and flags): a cast here would make `abc` a missing value.
_NUMERIC = {"line": "Int64"}


def _scan_table(path: str) -> Any:
    """A lazy scan of a scored table (Parquet or CSV), every CSV column as text (never typed
    from the first rows: `2000` above a later `2.5` is a number), `line` as a number."""
    import polars as pl

    if path.lower().endswith(".csv"):
        lf = pl.scan_csv(path, infer_schema=False)
    else:
        lf = pl.scan_parquet(path)
    schema = lf.collect_schema()
    return lf.with_columns(
        pl.col(name).str.strip_chars().cast(pl.Float64, strict=False).cast(getattr(pl, kind),
                                                                          strict=False)
        for name, kind in _NUMERIC.items() if schema.get(name) == pl.String)


def _read_table(path: str, columns: tuple[str, ...] | None = None) -> Any:
    """A scored table (Parquet or CSV); `columns`: read only those of them that exist.
    SomInputError som_empty_input for a file without lines, som_unreadable for one that is not
    Parquet/CSV or is damaged."""
    import polars as pl

    from gateway.som.io import SomInputError, native_case

    try:
        if Path(path).stat().st_size == 0:
            raise SomInputError("som_empty_input", f"{path}: an empty file, no lines")
        lf = _scan_table(path)
        if columns is not None:
            names = lf.collect_schema().names()
            renamed = native_case(names)  # CUSTOMER, DATE...: read as the scorer read them
            if renamed:
                lf = lf.rename(renamed)
                names = [renamed.get(c, c) for c in names]
            # At least one column, so that the table keeps the file's lines: a file with none of
            # `columns` is judged on what it lacks (som_no_labels...), not taken for empty.
            lf = lf.select([c for c in names if c in columns] or names[:1])
        table = lf.collect()
    except pl.exceptions.NoDataError:
        raise SomInputError("som_empty_input", f"{path}: no lines") from None
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        raise SomInputError("som_unreadable", f"{path}: cannot be read ({exc})") from None
    if not table.height:
        raise SomInputError("som_empty_input", f"{path}: no lines")
    return table


# What evaluate reads: labels and the scorer's verdict (and evaluate.RULE_SET_COLUMNS for the
# rule sets).
EVALUATE_COLUMNS = ("label", "anomaly", "anomaly_detail", "score", "flag")


@click.group("som")
def som_group() -> None:
    """Suspicious order monitoring (21 CFR 1301.74(b))."""


@som_group.command("synth")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Output file: .parquet or .csv.")
@click.option("--customers", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--days", default=730, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--start", type=click.DateTime(formats=["%Y-%m-%d"]), default="2024-01-01", show_default=True,
              help="First day of the history.")
@_terminable
def synth_command(out: str, customers: int, days: int, seed: int, start: Any) -> None:
    """Write a synthetic order history with labelled anomalies (label, anomaly columns)."""
    from gateway.som.output import check_output, output_directory
    from gateway.som.synth import synthesize, write_synthetic

    if not out.lower().endswith((".parquet", ".pq", ".csv")):
        _fail("som_unknown_format", f"{out}: expected .parquet or .csv")
    started = time.perf_counter()
    try:
        check_output(out)  # before the work, not after
        frame = synthesize(customers=customers, days=days, seed=seed, start=start.date())
        with output_directory(out):  # made if missing, removed again if the write fails
            write_synthetic(frame, out)
    except Exception as exc:  # noqa: BLE001
        _guard(exc)
    kinds = frame.filter("label")["anomaly"].value_counts(sort=True)
    summary = ", ".join(f"{k} {n:,}" for k, n in kinds.iter_rows())
    click.echo(f"{frame.height:,} lines, {customers:,} customers, {days} days -> {out} "
               f"({time.perf_counter() - started:.1f} s)")
    click.echo(f"labelled: {int(frame['label'].sum()):,} lines ({summary or 'none'})")


@som_group.command("score")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Output file: .parquet or .csv (input columns + score, flag, reasons).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="Thresholds (TOML: a [som] table or top-level keys).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Worker processes (local) or LocalCluster workers (dask).")
@click.option("--engine", type=click.Choice(["local", "dask"]), default="local", show_default=True)
@click.option("--partitions", type=click.IntRange(min=1), default=None,
              help="Partitions of customers (default: from the input size; 1 = all in memory).")
@click.option("--scheduler", default=None, help="Dask scheduler address (engine dask); default: a LocalCluster.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@pass_context
@_terminable
def score_command(ctx: Context, source: str, out: str, config_path: str | None, workers: int,
                  engine: str, partitions: int | None, scheduler: str | None, quiet: bool) -> None:
    """Score SOURCE (Parquet or CSV, native or ARCOS shape) into --out."""
    from tqdm import tqdm

    from gateway.som.output import check_output
    from gateway.som.partition import default_partitions, score_file, steps

    config = _config(ctx, config_path)
    bar = None

    def tick(stage: str) -> None:
        bar.set_description(stage, refresh=False)  # redrawn by update, at most every mininterval
        bar.update(1)

    try:
        check_output(out, source)  # before anything is read
        count = partitions or default_partitions(source, workers if engine == "local" else max(workers, 2))
        # Into a log (no terminal) every redraw is another line's worth of text: a few do.
        bar = tqdm(total=steps(count, workers, engine), unit="step", disable=quiet, file=sys.stderr,
                   desc="score", mininterval=0.1 if sys.stderr.isatty() else NON_TTY_REDRAW_SECONDS)
        run = score_file(source, out, config, partitions=count, workers=workers, engine=engine,
                         scheduler=scheduler, progress=tick)
    except Exception as exc:  # noqa: BLE001 - coded errors become exit 2, others propagate
        if bar is not None:
            bar.close()
        _guard(exc)
    finally:
        if bar is not None:
            bar.close()
    rate = run.lines / run.seconds if run.seconds else 0.0
    click.echo(f"{run.lines:,} lines scored, {run.flagged:,} flagged -> {run.output} "
               f"({run.partitions} partition{'s' if run.partitions > 1 else ''}, {run.workers} "
               f"worker{'s' if run.workers > 1 else ''}, {run.engine}; {run.seconds:.1f} s, {rate:,.0f} lines/s)")


@som_group.command("evaluate")
@click.argument("scored", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-rules", is_flag=True, help="Do not measure the litigation rule sets.")
@_terminable
def evaluate_command(scored: str, as_json: bool, no_rules: bool) -> None:
    """Precision, recall and ROC AUC of a scored, labelled history, overall and by anomaly kind."""
    from gateway.som.evaluate import RULE_SET_COLUMNS, evaluate

    try:
        columns = EVALUATE_COLUMNS if no_rules else EVALUATE_COLUMNS + RULE_SET_COLUMNS
        report = evaluate(_read_table(scored, columns), rule_sets=not no_rules)
    except Exception as exc:  # noqa: BLE001
        _guard(exc)
    click.echo(report.to_json() if as_json else report.table())


@som_group.command("diligence")
@click.argument("scored", type=click.Path(exists=True, dir_okay=False))
@click.option("--order", "order_id", required=True, help="Order id of the line.")
@click.option("--line", "line", required=True, type=int, help="Line number in the order.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="HTML page to write.")
@_terminable
def diligence_command(scored: str, order_id: str, line: int, out: str) -> None:
    """Write a self-contained due-diligence page for one line of a scored history."""
    import polars as pl

    from gateway.som.diligence import diligence_page
    from gateway.som.io import SomInputError, atomic_output
    from gateway.som.output import OutputError, check_output, output_directory

    try:
        check_output(out, scored)  # the page must never replace the scored history
        page = diligence_page(_scan_table(scored), order_id, line)
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        _guard(SomInputError("som_unreadable", f"{scored}: cannot be read ({exc})"))
    except Exception as exc:  # noqa: BLE001
        _guard(exc)
    try:
        with output_directory(out), atomic_output(out) as tmp:
            tmp.write_text(page, encoding="utf-8")
    except OSError as exc:
        _guard(OutputError("som_output_unwritable", f"{out}: {exc.strerror or exc}"))
    except Exception as exc:  # noqa: BLE001
        _guard(exc)
    click.echo(f"due-diligence page for order {order_id} line {line} -> {out}")


@som_group.command("load-history")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="Thresholds (TOML); default: the home's gateway.toml [som] table.")
@click.option("--quiet", is_flag=True, help="Print nothing on success.")
@pass_context
@_terminable
def load_history_command(ctx: Context, file: str, config_path: str | None, quiet: bool) -> None:
    """Seed the live SOM state from a history file (replaces the home's state)."""
    from gateway.som.incremental import SomState
    from gateway.som.io import read_orders
    from gateway.som.output import check_output, output_directory, writing
    from gateway.som.peers import peer_reference

    config = _config(ctx, config_path)
    started = time.perf_counter()
    target = state_path(ctx)
    try:
        check_output(target, file)  # before the work, not after
        # Date order first: a customer's class of trade and state are then those of its
        # earliest line, for the peer reference and the state alike.
        history = read_orders(file).sort("date", maintain_order=True)
        state = SomState(config, peer_reference(history))
        # Each customer's lines in time order, same-day lines in file order (as update takes them).
        state.extend(history)
        # All or nothing: the previous state stays when the new one cannot be written.
        with output_directory(target), writing(target, "cannot write the state: "):
            state.save(target)
    except Exception as exc:  # noqa: BLE001
        _guard(exc)
    if quiet:
        return
    click.echo(f"{history.height:,} lines, {len(state.customers):,} customers, "
               f"{len(state.groups):,} customer-family series -> {target} "
               f"({time.perf_counter() - started:.1f} s)")


def register(group: click.Group) -> None:
    group.add_command(som_group)
