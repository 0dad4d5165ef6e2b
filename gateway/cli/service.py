"""`gateway serve`: run the HTTP gateway until SIGTERM/SIGINT, then drain in-flight work and exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import replace

import click

from gateway.cli import Context, pass_context
from gateway.config import Settings

log = logging.getLogger("gateway.serve")


async def serve(settings: Settings, *, ready_file: str | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (SIGTERM/SIGINT set it), then drain and clean up."""
    from aiohttp import web

    from gateway.http.app import create_app

    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=settings.server.drain_timeout_s)
    await runner.setup()  # opens storage, HSM, pool, trust store
    site = web.TCPSite(runner, settings.server.host, settings.server.port, backlog=1024,
                       reuse_address=True)
    try:
        await site.start()
    except BaseException:
        # The port is taken (or not ours to bind): close what setup opened, in order, before
        # saying so. Left to the interpreter's exit, the storage's executor was gone before the
        # last audit checkpoint could read the head, and that failure was logged as a traceback.
        await runner.cleanup()
        raise
    port = site._server.sockets[0].getsockname()[1] if site._server else settings.server.port  # noqa: SLF001
    log.info("serving", extra={"host": settings.server.host, "port": port,
                               "database": settings.effective_database_url.split("://")[0]})
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_file:  # for scripts and tests that start the server on port 0; written once a
        # SIGTERM drains (a signal sent on seeing the file found the default action: -15)
        with open(ready_file, "w") as fh:
            fh.write(f"{port}\n")
    await stop.wait()
    log.info("stopping: draining in-flight requests", extra={"timeout_s": settings.server.drain_timeout_s})
    # runner.cleanup(): stop accepting, on_shutdown (readiness 503), wait for in-flight handlers up
    # to the drain timeout, then close the pool, the HSM and storage (last commit lands).
    await runner.cleanup()
    # Drained and closed: from here on a repeated SIGTERM/SIGINT (an orchestrator insisting) must
    # not kill the process on its way out. Left registered, asyncio restores the default action
    # when the loop closes, and a signal in the moments before exit ended it with status -15.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    log.info("stopped")


def _non_empty_host(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An empty host makes aiohttp listen on every interface: refused, as gateway.toml refuses
    it. Every interface is asked for by name (0.0.0.0, ::)."""
    if value is not None and not value.strip():
        raise click.BadParameter("an empty host would listen on every interface; name one "
                                 "(0.0.0.0 for all)")
    return value


def register(group: click.Group) -> None:
    @group.command("serve")
    @click.option("--host", default=None, callback=_non_empty_host,
                  help="Address to listen on (default: [server] host).")
    @click.option("--port", type=click.IntRange(0, 65535), default=None,
                  help="Port (default: [server] port; 0 picks a free one).")
    @click.option("--ready-file", type=click.Path(dir_okay=False), default=None,
                  help="Write the bound port to this file once listening.")
    @click.option("--log-level", default="INFO", show_default=True,
                  type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
    @pass_context
    def serve_command(ctx: Context, host: str | None, port: int | None, ready_file: str | None,
                      log_level: str) -> None:
        """Run the HTTP gateway until SIGTERM/SIGINT, then drain in-flight requests."""
        from gateway.http.logs import configure_logging, stop_logging

        configure_logging(log_level.upper(), background=True)
        settings = ctx.settings
        server = settings.server
        settings = replace(settings, server=replace(
            server, host=host if host is not None else server.host,
            port=port if port is not None else server.port))
        try:
            asyncio.run(serve(settings, ready_file=ready_file))
        except OSError as exc:
            log.error("cannot serve: %s", exc, extra={"code": "listen_failed"})
            sys.exit(1)
        except Exception as exc:  # noqa: BLE001 - HSM or database unusable at start: say so, exit 1
            code = getattr(exc, "code", type(exc).__name__)
            log.error("cannot start: %s", exc, extra={"code": code})
            sys.exit(1)
        finally:
            stop_logging()
