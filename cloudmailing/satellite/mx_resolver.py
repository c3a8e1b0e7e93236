"""Find the mail hosts of a recipient domain: MX lookup with a TTL cache (RFC 5321 §5.1).

``MxResolver.resolve(domain)`` returns the addresses to try, best first:

- MX hosts in preference order, in random order among equal preferences (the injected rng,
  reshuffled at each call, so the load spreads even while the answer is cached);
- each MX host's A then AAAA addresses, both asked in parallel; an address is listed once;
- no MX record at all: the domain's own A/AAAA addresses (the implicit MX);
- bounded, as RFC 5321 §5.1 allows and Postfix's ``smtp_mx_address_limit`` does: at most
  ``_MAX_MX_HOSTS`` (20) MX hosts, the first ``_MAX_ADDRESSES_PER_HOST`` (5) addresses of each
  (A before AAAA, in the answers' order), and ``_MAX_ADDRESSES`` (20) addresses in all, cut
  after the ordering above. A hostile domain listing thousands of addresses would otherwise
  have delivery try them one after another (a connect timeout each).

Hard failures (``PermanentDnsError``: NXDOMAIN, null MX of RFC 7505, nothing to deliver to) are
cached for ``negative_ttl``; answers for the smallest TTL they contain; soft failures
(``TemporaryDnsError``: SERVFAIL, REFUSED, timeout) are never cached. Concurrent calls for one
domain share a single lookup. Time comes from the injected clock, so tests drive expiry.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import idna

from cloudmailing.common.clock import SecondsClock
from cloudmailing.common.recent import keep_recent

logger = logging.getLogger("cloudmailing.satellite.mx_resolver")

# A domain listing hundreds of MX hosts must not make us send hundreds of queries.
_MAX_MX_HOSTS = 20
# Nor one listing thousands of addresses make delivery try each (see the module docstring).
_MAX_ADDRESSES_PER_HOST = 5
_MAX_ADDRESSES = 20
# A partial answer (some address lookups failed) is kept this long at most, so a domain whose
# AAAA server is broken costs one timeout per minute rather than one per message.
_PARTIAL_ANSWER_TTL = 60.0


@dataclass(frozen=True)
class MailHost:
    """One address to deliver to."""

    name: str  # MX host name (or the domain itself for the A/AAAA fallback)
    address: str  # one IP address of that host
    preference: int


class DnsError(Exception):
    """The mail hosts of ``domain`` could not be found; ``reason`` suits an SMTP reply text."""

    def __init__(self, domain: str, reason: str) -> None:
        super().__init__(reason)
        self.domain = domain
        self.reason = reason


class PermanentDnsError(DnsError):
    """The domain cannot receive mail: NXDOMAIN, null MX, no MX and no A/AAAA, invalid name."""


class TemporaryDnsError(DnsError):
    """DNS did not answer usefully (SERVFAIL, REFUSED, timeout): retry later."""


@dataclass(frozen=True)
class _Exchange:
    """One MX host and its addresses (A first, then AAAA)."""

    preference: int
    name: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class _Resolution:
    """What a lookup found, before the per-call shuffle."""

    exchanges: tuple[_Exchange, ...]
    ttl: float


@dataclass(frozen=True)
class _CacheEntry:
    expires: float
    value: _Resolution | PermanentDnsError


class MxResolver:
    """Asynchronous, caching MX resolver (see the module docstring)."""

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] | None = None,
        *,
        clock: SecondsClock,
        rng: random.Random,
        timeout: float = 5.0,
        max_cache_entries: int = 10000,
        negative_ttl: float = 300.0,
    ) -> None:
        """``nameservers``: (host, port) pairs, or None for the system's resolver configuration.

        ``timeout`` bounds each DNS query (all its retries included).
        """
        self._resolver = _make_resolver(nameservers, timeout)
        self._clock = clock
        self._rng = rng
        self._timeout = timeout
        self._max_cache_entries = max_cache_entries
        self._negative_ttl = negative_ttl
        self._cache: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._in_flight: dict[str, asyncio.Future[_Resolution]] = {}

    async def resolve(self, domain: str) -> list[MailHost]:
        """Return the addresses to try for ``domain``, best first.

        Raises PermanentDnsError or TemporaryDnsError.
        """
        name = _to_a_label(domain)
        resolution = self._cached(name)
        if resolution is None:
            resolution = await self._shared_lookup(name)
        return self._ordered(resolution)

    # -- cache ------------------------------------------------------------------------------

    def _cached(self, name: str) -> _Resolution | None:
        """The cached answer for ``name``; raises a copy of a cached permanent failure."""
        entry = self._cache.get(name)
        if entry is None:
            return None
        if entry.expires <= self._clock.seconds():
            del self._cache[name]
            return None
        logger.debug("MX cache hit for %s", name, extra={"domain": name})
        if isinstance(entry.value, PermanentDnsError):
            raise PermanentDnsError(name, entry.value.reason)
        return entry.value

    def _store(
        self, name: str, value: _Resolution | PermanentDnsError, ttl: float
    ) -> None:
        """Cache ``value`` for ``ttl`` seconds, evicting the oldest entries beyond the bound."""
        if ttl <= 0 or self._max_cache_entries <= 0:
            return
        keep_recent(self._cache, name, _CacheEntry(self._clock.seconds() + ttl, value), self._max_cache_entries)

    # -- single flight ------------------------------------------------------------------------

    async def _shared_lookup(self, name: str) -> _Resolution:
        """Run one lookup per domain at a time; every concurrent caller awaits the same one."""
        future = self._in_flight.get(name)
        if future is None:
            future = asyncio.ensure_future(self._lookup_and_cache(name))
            self._in_flight[name] = future
            future.add_done_callback(lambda done: self._lookup_done(name, done))
        # shield: one caller being cancelled must not cancel the lookup the others wait for.
        return await asyncio.shield(future)

    def _lookup_done(self, name: str, future: asyncio.Future[_Resolution]) -> None:
        self._in_flight.pop(name, None)
        if not future.cancelled():
            future.exception()  # mark retrieved: every awaiter may have been cancelled

    async def _lookup_and_cache(self, name: str) -> _Resolution:
        try:
            resolution = await self._lookup(name)
        except PermanentDnsError as exc:
            logger.info(
                "MX lookup failed for %s: %s", name, exc.reason, extra={"domain": name}
            )
            self._store(name, exc, self._negative_ttl)
            raise
        except TemporaryDnsError as exc:
            logger.warning(
                "MX lookup deferred for %s: %s",
                name,
                exc.reason,
                extra={"domain": name},
            )
            raise
        self._store(name, resolution, resolution.ttl)
        logger.info(
            "MX for %s: %s (ttl %.0f s)",
            name,
            ", ".join(
                f"{x.preference} {x.name} {'/'.join(x.addresses)}"
                for x in resolution.exchanges
            ),
            resolution.ttl,
            extra={"domain": name},
        )
        return resolution

    # -- DNS ------------------------------------------------------------------------------------

    async def _lookup(self, name: str) -> _Resolution:
        """Resolve ``name``'s MX records, then every MX host's addresses."""
        qname = dns.name.from_text(name + ".")
        try:
            answer = await self._query(name, qname, dns.rdatatype.MX)
        except dns.resolver.NXDOMAIN:
            raise PermanentDnsError(
                name, f"domain {name} does not exist (NXDOMAIN)"
            ) from None
        if answer is None:
            return await self._implicit_mx(name, qname)
        records = sorted(
            (int(rdata.preference), rdata.exchange)
            for rdata in answer
            if rdata.exchange != dns.name.root
        )
        if not records:
            raise PermanentDnsError(
                name, f"domain {name} accepts no mail (null MX, RFC 7505)"
            )
        hosts = _unique_hosts(records)[:_MAX_MX_HOSTS]
        results = await asyncio.gather(
            *(self._addresses(name, host) for _, host in hosts)
        )
        exchanges = [
            _Exchange(preference, host.to_text(omit_final_dot=True).lower(), addresses)
            for (preference, host), (addresses, _, _) in zip(
                hosts, results, strict=True
            )
            if addresses
        ]
        ttls = [answer.chaining_result.minimum_ttl] + [
            ttl for _, ttl, _ in results if ttl is not None
        ]
        complete = all(ok for _, _, ok in results)
        if not exchanges:
            names = ", ".join(host.to_text(omit_final_dot=True) for _, host in hosts)
            if not complete:
                raise TemporaryDnsError(
                    name, f"cannot resolve the MX hosts of {name} ({names}) now"
                )
            raise PermanentDnsError(
                name, f"no address for any MX host of {name} ({names})"
            )
        return _Resolution(tuple(exchanges), _ttl(ttls, complete))

    async def _implicit_mx(self, name: str, qname: dns.name.Name) -> _Resolution:
        """No MX record: the domain itself is the mail host (RFC 5321 §5.1)."""
        addresses, ttl, complete = await self._addresses(name, qname)
        if not addresses:
            if not complete:
                raise TemporaryDnsError(
                    name, f"cannot resolve the address of {name} now"
                )
            raise PermanentDnsError(
                name, f"domain {name} has no MX and no A/AAAA record"
            )
        return _Resolution(
            (_Exchange(0, name, addresses),),
            _ttl([ttl] if ttl is not None else [], complete),
        )

    async def _addresses(
        self, domain: str, host: dns.name.Name
    ) -> tuple[tuple[str, ...], float | None, bool]:
        """A and AAAA of ``host``, asked in parallel: (addresses, min TTL or None, complete).

        ``complete`` is False when a query failed temporarily; the other one may still help.
        """
        outcomes = await asyncio.gather(
            self._query(domain, host, dns.rdatatype.A),
            self._query(domain, host, dns.rdatatype.AAAA),
            return_exceptions=True,
        )
        addresses: list[str] = []
        ttls: list[float] = []
        complete = True
        for outcome in outcomes:
            if isinstance(outcome, TemporaryDnsError):
                complete = False
            elif isinstance(outcome, dns.resolver.NXDOMAIN) or outcome is None:
                continue
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                addresses.extend(rdata.address for rdata in outcome)
                ttls.append(outcome.chaining_result.minimum_ttl)
        kept = tuple(dict.fromkeys(addresses))[:_MAX_ADDRESSES_PER_HOST]  # once each, the first ones
        return kept, min(ttls, default=None), complete

    async def _query(
        self, domain: str, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> dns.resolver.Answer | None:
        """One DNS query: the answer, None for NODATA; NXDOMAIN propagates.

        Failures to get an answer become TemporaryDnsError (for ``domain``).
        """
        what = f"{rdtype.name} {qname.to_text(omit_final_dot=True)}"
        try:
            return await self._resolver.resolve(
                qname, rdtype, search=False, lifetime=self._timeout
            )
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NXDOMAIN:
            raise
        except dns.exception.Timeout:
            raise TemporaryDnsError(domain, f"DNS timeout looking up {what}") from None
        except dns.resolver.NoNameservers:
            raise TemporaryDnsError(
                domain, f"DNS servers failed (SERVFAIL/REFUSED) on {what}"
            ) from None
        except dns.exception.DNSException as exc:
            raise TemporaryDnsError(
                domain, f"DNS error looking up {what}: {exc}"
            ) from None

    # -- ordering ---------------------------------------------------------------------------------

    def _ordered(self, resolution: _Resolution) -> list[MailHost]:
        """Flatten to addresses: preference order, shuffled among equal preferences; the first
        ``_MAX_ADDRESSES``."""
        by_preference: dict[int, list[_Exchange]] = {}
        for exchange in resolution.exchanges:
            by_preference.setdefault(exchange.preference, []).append(exchange)
        hosts: list[MailHost] = []
        seen: set[str] = set()
        for preference in sorted(by_preference):
            group = by_preference[preference]
            self._rng.shuffle(group)
            for exchange in group:
                for address in exchange.addresses:
                    if address not in seen:
                        seen.add(address)
                        hosts.append(MailHost(exchange.name, address, preference))
                        if len(hosts) == _MAX_ADDRESSES:
                            return hosts
        return hosts


def _make_resolver(
    nameservers: Sequence[tuple[str, int]] | None, timeout: float
) -> dns.asyncresolver.Resolver:
    """A dnspython resolver without its own cache (we cache on the injected clock)."""
    if nameservers is None:
        resolver = dns.asyncresolver.Resolver(configure=True)
    else:
        if not nameservers:
            raise ValueError(
                "nameservers must not be empty (use None for the system resolver)"
            )
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
        ]
    # ``timeout`` bounds the whole query; each server gets its share of it, so a dead first
    # server leaves time to ask the next one.
    resolver.lifetime = timeout
    resolver.timeout = timeout / max(1, len(resolver.nameservers))
    resolver.cache = None
    return resolver


def _to_a_label(domain: str) -> str:
    """The lower-case ASCII (IDNA 2008 A-label) form of ``domain``, without the final dot."""
    text = domain.strip().rstrip(".")
    try:
        ascii_name = (
            text.lower()
            if text.isascii()
            else idna.encode(text, uts46=True).decode("ascii")
        )
        if not ascii_name:
            raise ValueError("empty name")
        dns.name.from_text(ascii_name + ".")  # checks label and name lengths
    except (
        idna.IDNAError,
        UnicodeError,
        ValueError,
        dns.exception.DNSException,
    ) as exc:
        raise PermanentDnsError(
            domain, f"invalid domain name {domain!r}: {exc}"
        ) from None
    return ascii_name


def _unique_hosts(
    records: list[tuple[int, dns.name.Name]],
) -> list[tuple[int, dns.name.Name]]:
    """Keep each MX host once, at its best (lowest) preference; ``records`` are sorted."""
    seen: set[dns.name.Name] = set()
    unique = []
    for preference, host in records:
        if host not in seen:
            seen.add(host)
            unique.append((preference, host))
    return unique


def _ttl(ttls: list[float], complete: bool) -> float:
    """How long to cache an answer: its smallest TTL, capped for partial answers."""
    ttl = min(ttls, default=0.0)
    return ttl if complete else min(ttl, _PARTIAL_ANSWER_TTL)
