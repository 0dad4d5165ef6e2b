"""The `gateway` command line. Each area registers its own commands from its own module."""

from __future__ import annotations

import importlib

import click

from gateway.config import ConfigError, Settings, load_settings

# Modules that add commands to the group; each defines `register(group)`.
_COMMAND_MODULES = (
    "gateway.cli.demo",  # init, demo
    "gateway.cli.signing",  # sign, verify
    "gateway.cli.pki",  # pki ..., keys ...
    "gateway.cli.admin",  # clients ..., audit ...
    "gateway.cli.service",  # serve
    "gateway.cli.som",  # som ...
)


class CommandError(click.ClickException):
    """A refusal with a stable code: printed as `error [code] message`, exit 1."""

    exit_code = 1

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def format_message(self) -> str:
        return f"[{self.code}] {self.message}"

    def show(self, file=None) -> None:  # noqa: ANN001 - click's signature
        click.echo(f"error {self.format_message()}", err=True, file=file)


class Context:
    """Carried in click's context: the home, and settings read on first use."""

    def __init__(self, home: str | None) -> None:
        self._home = home
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self._home)
            except ConfigError as exc:
                # Printed as the other refusals are, `error [config_invalid] ...`, exit 1.
                raise CommandError(exc.code, str(exc)) from exc
        return self._settings


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="Home directory (default: $GATEWAY_HOME, else ./.gateway).")
@click.version_option(package_name="csos-gateway")
@click.pass_context
def cli(ctx: click.Context, home: str | None) -> None:
    """Controlled-substance signing gateway."""
    ctx.obj = Context(home)


for _name in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # an area not built yet
        if exc.name != _name:
            raise
        continue
    _module.register(cli)


def main() -> None:
    cli(prog_name="gateway")
