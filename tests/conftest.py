"""Test fixtures: a real MongoDB-wire server (FerretDB on PostgreSQL, or CM_MONGODB_URL), a fresh
database per test, and an in-process master answering on a real HTTPS socket."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import ssl
import time
import uuid
import xmlrpc.client
from pathlib import Path
from typing import Any, Iterator

import pytest
import uvloop
from twisted.internet import task

from cloudmailing.config.settings import ApiConfig, DatabaseConfig, PathsConfig, SatelliteLinkConfig, Settings
from cloudmailing.services.api_keys import ApiKeyService
from cloudmailing.storage.database import Database, open_database
from tests.embedded_db import EmbeddedDatabase
from tests.helpers import run

ROOT = Path(__file__).resolve().parent.parent

# The programs run Twisted's asyncio reactor on a uvloop loop (cli/runtime.py): so do the tests.
# Set before pytest-twisted installs the reactor (this conftest is loaded before pytest_configure).
asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _reactor() -> Any:
    from twisted.internet import reactor  # installed by pytest-twisted (asyncio): import late

    return reactor


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """CM_MONGODB_URL when set, else FerretDB on a private PostgreSQL cluster started for this test session."""
    if os.environ.get("CM_MONGODB_URL"):
        yield os.environ["CM_MONGODB_URL"]
        return
    data = tmp_path_factory.mktemp("embedded-db")
    with EmbeddedDatabase(data, searchable_from=tmp_path_factory.getbasetemp().parent) as database:
        yield database.url


@pytest.fixture
def db_name() -> str:
    return f"cmtest_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def database(mongo_url: str, db_name: str) -> Iterator[Database]:
    """A fresh, empty database for one test, dropped afterwards."""
    opened = run(open_database(mongo_url, db_name))
    yield opened
    run(opened.client.drop_database(db_name))
    run(opened.close())


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every scrypt derivation (hash or check) made from now on."""
    from cloudmailing.common import keys

    calls: list[int] = []
    real = keys._scrypt

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(keys, "_scrypt", counting)
    return calls


@pytest.fixture
def clock() -> task.Clock:
    fake = task.Clock()
    fake.advance(1_800_000_000)  # 2027-01-15: a fixed, readable "now"
    return fake


@pytest.fixture
def settings(mongo_url: str, db_name: str, tmp_path: Path) -> Settings:
    return Settings(database=DatabaseConfig(url=mongo_url, name=db_name),
                    api=ApiConfig(host="127.0.0.1", port=0, key_cache_seconds=30.0),
                    satellite_link=SatelliteLinkConfig(host="127.0.0.1", port=0),
                    paths=PathsConfig(data_dir=str(tmp_path / "data")))


@dataclasses.dataclass
class RunningMaster:
    master: Any
    url_base: str
    key: str

    def proxy(self, key: str | None = None, path: str = "/CloudMailing", allow_none: bool = False) -> AsyncProxy:
        """``allow_none``: the proxy sends None as <nil/> (as PHP or Java clients may)."""
        url = self.url_base.replace("://", f"://admin:{key if key is not None else self.key}@") + path
        return AsyncProxy(url, allow_none)


class AsyncProxy:
    """A plain ``xmlrpc.client.ServerProxy``; each call runs in a thread and is awaited."""

    def __init__(self, url: str, allow_none: bool = False) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self._proxy = xmlrpc.client.ServerProxy(url, context=context, use_builtin_types=True, allow_none=allow_none)

    def __getattr__(self, name: str) -> _AsyncMethod:
        return _AsyncMethod(self._proxy, name)


class _AsyncMethod:
    def __init__(self, proxy: xmlrpc.client.ServerProxy, name: str) -> None:
        self._proxy, self._name = proxy, name

    def __getattr__(self, name: str) -> _AsyncMethod:  # system.listMethods and the like
        return _AsyncMethod(self._proxy, f"{self._name}.{name}")

    def __call__(self, *args: Any) -> Any:
        return asyncio.to_thread(lambda: getattr(self._proxy, self._name)(*args))


def create_key(database: Database, name: str = "tests") -> str:
    return run(ApiKeyService(database, _reactor()).create(name))


@pytest.fixture
def running_master(settings: Settings, database: Database) -> Iterator[RunningMaster]:
    from cloudmailing.master.app import Master

    master = Master(settings, _reactor())
    run(master.start())
    key = create_key(database)
    yield RunningMaster(master, f"https://127.0.0.1:{master.api_port}", key)
    run(master.stop())
