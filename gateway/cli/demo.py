"""`gateway init`, `gateway demo` and `gateway catalog import`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from gateway.cli import CommandError, Context, pass_context


@contextmanager
def _setup_refusals() -> Iterator[None]:
    """What stops `init` or `demo` setting up the home, as `error [code]: message` and exit 1
    instead of a traceback: the HSM (a module that is not one, a PIN the token refuses), the
    database, the test PKI, or a home that cannot be written."""
    from gateway.config import ConfigError
    from gateway.signing.errors import SigningError
    from gateway.signing.pki import PkiError
    from gateway.storage import StorageError

    try:
        yield
    except StorageError as exc:
        raise CommandError(exc.code, exc.message) from exc
    except (SigningError, PkiError, ConfigError) as exc:
        raise CommandError(getattr(exc, "code", "error"), str(exc)) from exc
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise CommandError("home_unusable", f"{where}{exc.strerror or exc}") from exc
    except subprocess.CalledProcessError as exc:  # softhsm2-util refusing the home's token store
        command = " ".join([Path(str(exc.cmd[0])).name, *map(str, exc.cmd[1:])])
        said = " ".join(str(exc.stderr or "").split()) or "no message"
        raise CommandError("hsm_init_failed", f"{command} failed (exit {exc.returncode}): {said}") from exc


@click.command("init")
@pass_context
def init_command(ctx: Context) -> None:
    """Set up the home: SoftHSM token, test PKI, demo keys, catalog, database, demo clients."""
    from gateway.bootstrap import init_home

    with _setup_refusals():
        demo = init_home(settings=ctx.settings)
    click.echo(f"home ready: {demo['home']}")
    for role, key in demo["keys"].items():
        click.echo(f"  key {key['label']:<22} {role:<14} DEA {key['dea_number']}  cert {key['certificate']}")
    click.echo(f"  clients: {', '.join(sorted(demo['clients']))} (tokens in {ctx.settings.demo_json})")
    click.echo(f"  trust bundle: {demo['trust_bundle']}")


@click.command("demo")
@click.option("--keep-going", is_flag=True, help="Run every step even after one misbehaves.")
@pass_context
def demo_command(ctx: Context, keep_going: bool) -> None:
    """Play the story end to end through the HTTP API and print what happened."""
    from gateway.demo import run_demo

    with _setup_refusals():
        ok = run_demo(ctx.settings, keep_going=keep_going)
    sys.exit(0 if ok else 1)


@click.group("catalog")
def catalog_group() -> None:
    """The supplier's product catalog."""


@catalog_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@pass_context
def catalog_import(ctx: Context, file: str) -> None:
    """Replace the product catalog with FILE (CSV: ndc,name,strength,schedule,family,units_per_package).

    Audited as `catalog.imported`, refused attempts too (21 CFR 1311.150): the catalog decides
    which products are controlled and in which schedule."""
    from gateway.catalog import CatalogError, import_catalog
    from gateway.cli.events import audited

    target = ctx.settings.catalog_path
    try:
        with audited(ctx.settings, "catalog.imported", str(target),
                     source=str(Path(file).absolute()), previous_sha256=_sha256_of(target)) as audit:
            try:
                catalog = import_catalog(file, target)
            except CatalogError as exc:
                raise CommandError(exc.code, str(exc)) from exc
            controlled = sum(1 for p in catalog.values() if p.controlled)
            audit.update(products=len(catalog), controlled=controlled, sha256=_sha256_of(target))
    except CommandError as exc:
        click.echo(json.dumps({"error": {"code": exc.code, "message": exc.message}}), err=True)
        sys.exit(2)
    click.echo(f"catalog replaced: {len(catalog)} products ({controlled} controlled) -> {target}")


def _sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def register(group: click.Group) -> None:
    group.add_command(init_command)
    group.add_command(demo_command)
    group.add_command(catalog_group)
