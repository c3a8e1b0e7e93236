"""Which master a satellite trusts: its certificate's SHA-256 fingerprint, pinned.

The master's certificate is usually self-signed, so a CA cannot vouch for it. The fingerprint is
the configured ``master_fingerprint`` (the master prints it at start), or else the one seen on
the first connection, kept in the data directory and required from then on (as SSH does).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl

from cloudmailing.common.private_files import write_private

log = logging.getLogger(__name__)


def normalize(fingerprint: str) -> str:
    return fingerprint.replace(":", "").strip().upper()


class PinnedMasterOptions(ssl.CertificateOptions):
    """TLS client options that accept only a master certificate with the pinned fingerprint."""

    def __init__(self, pinned: str, remember: Path) -> None:
        super().__init__(verify=False)
        self._pinned = normalize(pinned)
        self._remember = remember
        self.seen = ""

    def getContext(self) -> SSL.Context:
        context = super().getContext()
        context.set_verify(SSL.VERIFY_PEER, self._check)
        return context

    def _check(self, _connection: Any, certificate: crypto.X509, _errno: int, depth: int, _ok: int) -> bool:
        if depth != 0:
            return True  # only the master's own certificate is pinned
        self.seen = certificate.digest("sha256").decode().replace(":", "").upper()
        if not self._pinned:
            write_private(self._remember, (self.seen + "\n").encode("ascii"))
            self._pinned = self.seen
            log.warning("trusting the master's certificate on first use: SHA-256 %s", self.seen)
        if self.seen != self._pinned:
            log.error("the master's certificate is not the pinned one (SHA-256 %s); refusing", self.seen)
            return False
        return True


def master_options(configured: str, data_dir: Path) -> PinnedMasterOptions:
    remembered = data_dir / "master.fingerprint"
    pinned = configured or (remembered.read_text().strip() if remembered.exists() else "")
    return PinnedMasterOptions(pinned, remembered)
