"""E-mail address checks: RFC 5321/5322 syntax, internationalized domains via IDNA.

Plain ASCII addresses, the overwhelming majority, are checked by one compiled pattern; anything
else (internationalized, quoted local parts, or simply wrong) goes to ``email-validator``, which
also writes the error a client sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
_TLD = r"(?:[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
_PLAIN = re.compile(rf"({_ATOM}(?:\.{_ATOM})*)@((?:{_LABEL}\.)+{_TLD})")


class InvalidAddress(ValueError):
    """The address is not a deliverable mailbox syntax; ``str()`` says why."""


@dataclass(frozen=True)
class Address:
    email: str        # as the client gave it, trimmed
    domain: str       # ASCII (A-label) lower-case domain, for MX lookups


def parse_address(raw: str) -> Address:
    """Validate ``raw`` and return it with its ASCII domain, or raise :class:`InvalidAddress`."""
    email = raw.strip()
    match = _PLAIN.fullmatch(email)
    if match and len(email) <= 254 and len(match.group(1)) <= 64:
        return Address(email=email, domain=match.group(2).lower())
    if not email:
        raise InvalidAddress("empty e-mail address")
    try:
        checked = validate_email(email, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as error:
        raise InvalidAddress(str(error)) from None
    return Address(email=email, domain=checked.ascii_domain.lower())
