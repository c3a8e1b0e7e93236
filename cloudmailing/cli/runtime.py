"""What every CloudMailing program does first: the asyncio reactor, arguments, settings."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, Callable, Coroutine, NoReturn

import uvloop

from cloudmailing.config.settings import ConfigError, Settings, load_settings


def install_reactor() -> Any:
    """Install Twisted's asyncio reactor (once), on a uvloop event loop, and return it.

    uvloop runs the loop and the asyncio transports (the SMTP client's, PyMongo's) in C: the
    delivery benchmark's satellite process spent 6% less CPU per message on it (four pairs of
    runs), the rest of the code unchanged."""
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)  # start-up callbacks run before the loop does: they must find it
        asyncioreactor.install(loop)
    from twisted.internet import reactor

    return reactor


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", metavar="FILE", help="INI configuration file (optional)")
    return parser


# Exit statuses of every program (the systemd units' restart policy relies on them):
EXIT_OK = 0
EXIT_FAILURE = 1       # stopped on an error: restarting may help (database or master away, disk...)
EXIT_CONFIG_ERROR = 2  # bad usage or configuration (as argparse's usage errors): restarting will not help
# cm-master also exits 3 when another process took the database's writer's claim (master.py).


def config_error_exit(message: str) -> NoReturn:
    print(f"configuration error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG_ERROR)


def settings_or_exit(path: str | None) -> Settings:
    """The validated settings, or exit with :data:`EXIT_CONFIG_ERROR` naming what is wrong."""
    try:
        return load_settings(path)
    except (ConfigError, OSError) as error:
        config_error_exit(str(error))


def logging_or_exit(settings: Settings) -> None:
    """Set up logging as configured, or exit with :data:`EXIT_CONFIG_ERROR` (a log file that cannot be opened)."""
    from cloudmailing.common.logs import setup_logging

    try:
        setup_logging(settings.logging.level, settings.logging.file)
    except OSError as error:
        config_error_exit(f"[logging] file: cannot open {settings.logging.file!r}: {error.strerror or error}")


def start_daemon(description: str, argv: list[str] | None) -> tuple[argparse.Namespace, Settings, Any]:
    """A long-running program's start: its command line, its checked settings, logging as they
    say, and the reactor (exits with :data:`EXIT_CONFIG_ERROR` on a usage or configuration error)."""
    args = base_parser(description).parse_args(argv)
    settings = settings_or_exit(args.config)
    logging_or_exit(settings)
    return args, settings, install_reactor()


def run_once(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run one coroutine to completion on the reactor and return its exit code."""
    reactor = install_reactor()
    from cloudmailing.common.aio import as_deferred

    outcome: dict[str, int] = {}

    def done(code: Any) -> None:
        outcome["code"] = code if isinstance(code, int) else 1
        reactor.stop()

    def failed(failure: Any) -> None:
        print(f"error: {failure.getErrorMessage()}", file=sys.stderr)
        outcome["code"] = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: as_deferred(main()).addCallbacks(done, failed))
    reactor.run()
    return outcome.get("code", 1)
