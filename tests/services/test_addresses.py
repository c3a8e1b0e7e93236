"""Recipient addresses: internationalized ones accepted as given, quoted local parts refused."""

from __future__ import annotations

import pytest

from cloudmailing.services.addresses import InvalidAddress, parse_address


@pytest.mark.parametrize(("raw", "domain"), [
    ("Rcpt@Example.COM", "example.com"),
    ("rcpt@bücher.example", "xn--bcher-kva.example"),
    ("jürgen@example.org", "example.org"),
])
def test_valid_addresses_are_accepted_as_given(raw: str, domain: str) -> None:
    address = parse_address(raw)
    assert (address.email, address.domain) == (raw, domain)


@pytest.mark.parametrize("raw", ['"unterminated@example.com', "two@@example.com", "a b@example.com", "",
                                 '"john doe"@example.com'])  # quoted local parts: refused (docs/api.md)
def test_invalid_addresses_are_refused(raw: str) -> None:
    with pytest.raises(InvalidAddress):
        parse_address(raw)
