"""Keys, secrets, the outbox and the pinned master identity are private from their creation,
in private data directories, even under a permissive umask."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from OpenSSL import crypto

from cloudmailing.common.link_protocol import Outcome
from cloudmailing.common.private_files import write_private
from cloudmailing.common.tls import ensure_certificate, make_self_signed
from cloudmailing.config.settings import SatelliteConfig
from cloudmailing.satellite.daemon import load_or_create_secret
from cloudmailing.satellite.master_identity import master_options
from cloudmailing.satellite.outbox import Outbox


@pytest.fixture(autouse=True)
def permissive_umask(tmp_path: Path) -> Iterator[None]:
    """umask 000: anything not created private would be world-readable."""
    previous = os.umask(0)
    yield
    os.umask(previous)


@pytest.fixture(autouse=True)
def no_late_chmod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Making a file private after it was written leaves a window: none may need it."""
    real_chmod = os.chmod

    def checked_chmod(path, mode, *args, **kwargs):  # type: ignore[no-untyped-def]
        assert os.stat(path).st_mode & 0o077 == 0, f"{path} was readable by others before this chmod"
        real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", checked_chmod)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_satellite_secret_outbox_and_master_identity(tmp_path: Path) -> None:
    data_dir = tmp_path / "data" / "satellite"
    secret = load_or_create_secret(SatelliteConfig(), data_dir)
    assert load_or_create_secret(SatelliteConfig(), data_dir) == secret  # kept
    outbox = Outbox(data_dir / "outbox.jsonl")
    outbox.add(Outcome("r1", "FINISHED", 250, "2.0.0", "ok"))
    outbox.sync()
    options = master_options("", data_dir)
    certificate = crypto.load_certificate(crypto.FILETYPE_PEM, make_self_signed("master.test")[0])
    assert options._check(None, certificate, 0, 0, 1)  # trusted on first use, and remembered
    assert {path.name: _mode(path) for path in data_dir.iterdir()} == {
        "satellite.secret": 0o600, "outbox.jsonl": 0o600, "master.fingerprint": 0o600}
    assert _mode(data_dir) == _mode(data_dir.parent) == 0o700


def test_an_outbox_of_an_earlier_version_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644), "w") as old:
        old.write('{"outcome": {"recipient_id": "r1", "status": "FINISHED"}}\n')
    assert len(Outbox(path)) == 1 and _mode(path) == 0o600


def test_the_master_key_and_data_dir(tmp_path: Path) -> None:
    files = ensure_certificate("", "", tmp_path / "master-data")
    assert _mode(files.key_path) == 0o600
    assert _mode(tmp_path / "master-data") == _mode(files.key_path.parent) == 0o700


def test_write_private_replaces_whole_and_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    write_private(path, b"one")
    write_private(path, b"two")
    assert path.read_bytes() == b"two" and _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]
