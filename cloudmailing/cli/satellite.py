"""``cm-satellite``: run a sending satellite (connects to the master, delivers, reports)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from cloudmailing.cli.runtime import base_parser, install_reactor, settings_or_exit
from cloudmailing.common.gc_tuning import settle_after_start
from cloudmailing.common.logs import setup_logging

log = logging.getLogger("cloudmailing.satellite")


def main(argv: list[str] | None = None) -> int:
    args = base_parser("CloudMailing satellite: delivers the master's mailings.").parse_args(argv)
    settings = settings_or_exit(args.config)
    setup_logging(settings.logging.level, settings.logging.file)
    reactor = install_reactor()
    from cloudmailing.common.aio import as_deferred
    from cloudmailing.satellite.daemon import SatelliteDaemon

    daemon = SatelliteDaemon(settings.satellite, settings.paths.data_path / "satellite", reactor)
    config = settings.satellite
    print(f"CloudMailing satellite {daemon.serial}: master {config.master_host}:{config.master_port}; "
          f"approve it on the master with cloud_set_satellite_properties or cm-admin if asked", flush=True)

    def failed(failure: Any) -> None:
        log.error("satellite stopped: %s", failure.getErrorMessage())
        reactor.stop()

    reactor.callWhenRunning(settle_after_start)
    reactor.callWhenRunning(lambda: as_deferred(daemon.run()).addErrback(failed))
    reactor.addSystemEventTrigger("before", "shutdown", lambda: as_deferred(daemon.stop()))
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
