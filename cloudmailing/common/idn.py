"""Internationalized domain names (IDNA) in addresses, one conversion for envelope and headers."""

from __future__ import annotations

import idna


def ascii_domain_name(domain: str) -> str:
    """``domain`` as its IDNA A-label (UTS 46 mapping, as MX lookups use); left as it is when it
    is ASCII already or cannot be converted."""
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return domain


def ascii_domain(address: str) -> str:
    """``address`` with an internationalized domain in its A-label form when its local part is
    ASCII: so it needs no SMTPUTF8 (RFC 6531 wants SMTPUTF8 only for a non-ASCII local part),
    and most servers do not offer it. An address whose local part is not ASCII is left as it is:
    it is sent with SMTPUTF8, where the U-label is allowed (RFC 6532)."""
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii() or domain.isascii():
        return address
    return f"{local}@{ascii_domain_name(domain)}"
