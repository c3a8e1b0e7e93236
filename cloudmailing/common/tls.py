"""TLS material: a configured certificate, or a self-signed one made on first start."""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloudmailing.common.private_files import make_private_dir, write_private


@dataclass(frozen=True)
class TlsFiles:
    cert_path: Path
    key_path: Path
    created: bool  # True when this call generated a new self-signed pair

    def fingerprint_sha256(self) -> str:
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        digest = cert.fingerprint(hashes.SHA256()).hex().upper()
        return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def ensure_certificate(cert: str, key: str, data_dir: Path, stem: str = "master") -> TlsFiles:
    """Use the configured pair if given; else reuse or create ``<data_dir>/tls/<stem>.{crt,key}``."""
    if cert or key:
        if not (cert and key):
            raise ValueError("tls_cert and tls_key must be configured together")
        return TlsFiles(Path(cert), Path(key), created=False)
    tls_dir = data_dir / "tls"
    cert_path, key_path = tls_dir / f"{stem}.crt", tls_dir / f"{stem}.key"
    if cert_path.exists() and key_path.exists():
        return TlsFiles(cert_path, key_path, created=False)
    make_private_dir(tls_dir)  # and the data directory, when this start makes it
    cert_pem, key_pem = make_self_signed(socket.getfqdn())
    write_private(key_path, key_pem)
    cert_path.write_bytes(cert_pem)
    return TlsFiles(cert_path, key_path, created=True)


def make_self_signed(hostname: str, days: int = 3650) -> tuple[bytes, bytes]:
    """A P-256 key and a self-signed certificate for ``hostname``, localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names = [x509.DNSName(hostname), x509.DNSName("localhost"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
