"""``cm-satellite``: run a sending satellite (connects to the master, delivers, reports)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from cloudmailing.cli.runtime import EXIT_FAILURE, EXIT_OK, start_daemon
from cloudmailing.common.gc_tuning import settle_after_start

log = logging.getLogger("cloudmailing.satellite")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 once stopped (SIGTERM), 1 when the daemon fails to start or stops on an
    error, 2 on a usage or configuration error (runtime.py)."""
    args, settings, reactor = start_daemon("CloudMailing satellite: delivers the master's mailings.", argv)
    from cloudmailing.common.aio import as_deferred
    from cloudmailing.satellite.daemon import SatelliteDaemon, SecretFileError

    try:  # its data directory (secret, outbox) may not be writable, its kept secret damaged
        daemon = SatelliteDaemon(settings.satellite, settings.paths.data_path / "satellite", reactor)
    except (OSError, SecretFileError) as error:
        log.error("satellite failed to start: %s", error)
        print(f"satellite failed to start: {error}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    exit_code = [EXIT_OK]
    config = settings.satellite
    print(f"CloudMailing satellite {daemon.serial}: master {config.master_host}:{config.master_port}; "
          f"approve it on the master with cloud_set_satellite_properties or cm-admin if asked", flush=True)

    def failed(failure: Any) -> None:
        log.error("satellite stopped: %s", failure.getErrorMessage())
        print(f"satellite stopped: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        exit_code[0] = EXIT_FAILURE  # systemd's Restart=on-failure restarts it
        if reactor.running:
            reactor.stop()

    reactor.callWhenRunning(settle_after_start)
    reactor.callWhenRunning(lambda: as_deferred(daemon.run()).addErrback(failed))
    reactor.addSystemEventTrigger("before", "shutdown", lambda: as_deferred(daemon.stop()))
    reactor.run()
    return exit_code[0]


if __name__ == "__main__":
    sys.exit(main())
