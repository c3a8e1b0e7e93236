"""``cm-master``: run the master (the XML-RPC API on HTTPS, backed by MongoDB)."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping

from cloudmailing.cli.runtime import EXIT_FAILURE, EXIT_OK, start_daemon
from cloudmailing.common.gc_tuning import settle_after_start
from cloudmailing.config.settings import Settings

log = logging.getLogger("cloudmailing.master")


def api_key_command(config: str | None, settings: Settings, environ: Mapping[str, str] = os.environ) -> str:
    """The cm-admin command that creates an API key in this master's database, as it can be pasted
    from any directory: absolute paths, shell-quoted, the same data directory and, when given in
    the environment, the same CM_MONGODB_URL (a password in it shown as PASSWORD)."""
    admin = Path(sys.executable).absolute().with_name("cm-admin")
    words = [f"CM_DATA_DIR={shlex.quote(str(settings.paths.data_path.absolute()))}"]
    if environ.get("CM_MONGODB_URL"):
        words.append(f"CM_MONGODB_URL={shlex.quote(_without_password(environ['CM_MONGODB_URL']))}")
    words.append(shlex.quote(str(admin)) if admin.exists() else "cm-admin")
    if config:
        words += ["--config", shlex.quote(str(Path(config).absolute()))]
    return " ".join([*words, "api-key", "create", "--name", "NAME"])


def _without_password(url: str) -> str:
    scheme, separator, rest = url.partition("://")
    hosts_end = min(index for index in (rest.find("/"), rest.find("?"), len(rest)) if index >= 0)
    credentials, at, hosts = rest[:hosts_end].rpartition("@")
    if not at or ":" not in credentials:
        return url
    user = credentials.partition(":")[0]
    return f"{scheme}{separator}{user}:PASSWORD@{hosts}{rest[hosts_end:]}"


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 once stopped (SIGTERM), 1 when it fails to start, 2 on a usage or
    configuration error (runtime.py), 3 when another process took the database's writer's claim."""
    args, settings, reactor = start_daemon("CloudMailing master: the XML-RPC API and the recipients' queue.", argv)
    from cloudmailing.common.aio import as_deferred
    from cloudmailing.master.app import Master

    master = Master(settings, reactor)
    exit_code = [EXIT_OK]

    def started(_: Any) -> None:
        settle_after_start()
        api = settings.api
        assert master.tls is not None
        host = "127.0.0.1" if api.host in ("0.0.0.0", "::", "") else api.host
        print(f"CloudMailing master: API on https://{host}:{master.api_port}/CloudMailing "
              f"(listening on {api.host}:{master.api_port})", flush=True)
        print(f"Satellites connect on {settings.satellite_link.host}:{master.satellite_port}", flush=True)
        print(f"TLS certificate {master.tls.cert_path} SHA-256 {master.tls.fingerprint_sha256()}", flush=True)
        print(f"Create an API key with: {api_key_command(args.config, settings)}", flush=True)

    def failed(failure: Any) -> None:
        log.error("master failed to start: %s", failure.getErrorMessage())
        print(f"master failed to start: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        exit_code[0] = EXIT_FAILURE
        reactor.stop()

    def claim_lost() -> None:
        print("master stopped: another process has taken the database's writer's claim", file=sys.stderr, flush=True)
        exit_code[0] = 3
        reactor.stop()

    master.on_claim_lost = claim_lost
    reactor.callWhenRunning(lambda: as_deferred(master.start()).addCallbacks(started, failed))
    reactor.addSystemEventTrigger("before", "shutdown", lambda: as_deferred(master.stop()))
    reactor.run()
    return exit_code[0]


if __name__ == "__main__":
    sys.exit(main())
