"""``cm-admin``: API keys, satellites, configuration and storage repairs, straight on the master's database."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from twisted.internet.interfaces import IReactorTime

from cloudmailing.cli.runtime import base_parser, install_reactor, run_once, settings_or_exit
from cloudmailing.common.clock import WallClock
from cloudmailing.config.settings import Settings
from cloudmailing.services.api_keys import ApiKeyService
from cloudmailing.services.errors import ServiceError
from cloudmailing.services.writer_claim import ClaimHeld, ClaimRenewal, WriterClaim, running_masters
from cloudmailing.storage.database import Database, LayoutError, WriteRefused, check_layout_version, open_database
from cloudmailing.storage.migration import migrate
from cloudmailing.storage.stores import open_stores
from cloudmailing.storage.writer_claims import MasterRegistry, WriterClaimStore


def _parser() -> argparse.ArgumentParser:
    parser = base_parser("CloudMailing administration.")
    groups = parser.add_subparsers(dest="command", required=True)  # not "group": satellite add --group
    keys = groups.add_parser("api-key", help="API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("--name", required=True)
    keys.add_parser("list", help="names and creation dates")
    revoke = keys.add_parser("revoke", help="revoke the keys of that name")
    revoke.add_argument("name")
    sats = groups.add_parser("satellite", help="satellites").add_subparsers(dest="action", required=True)
    add = sats.add_parser("add", help="register a satellite")
    add.add_argument("serial")
    add.add_argument("--group", default="")
    sats.add_parser("list", help="registered satellites")
    for action in ("enable", "disable", "delete"):
        sats.add_parser(action, help=f"{action} a satellite").add_argument("id", type=int)
    sats.add_parser("approve", help="pair (and enable) a satellite that asked to join").add_argument("id", type=int)
    config = groups.add_parser("config", help="configuration").add_subparsers(dest="action", required=True)
    config.add_parser("show", help="print the settings in force")
    storage = groups.add_parser("storage", help="the database's storage (run with the master stopped)")
    storage_actions = storage.add_subparsers(dest="action", required=True)
    storage_actions.add_parser("migrate", help="convert a database of earlier versions to the current storage layout")
    recount = storage_actions.add_parser("recount", help="repair mailings' totals from their recipients")
    recount.add_argument("mailing_id", type=int, nargs="*", help="mailings (default: every unfinished one)")
    return parser


async def _api_key(args: argparse.Namespace, database: Database) -> int:
    service = ApiKeyService(database, WallClock())
    if args.action == "create":
        try:
            print(await service.create(args.name))
        except ServiceError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    elif args.action == "list":
        for doc in await service.list():
            state = f"revoked {doc['revoked']:%Y-%m-%d %H:%M}" if doc.get("revoked") else "active"
            print(f"{doc['name']}\t{doc['created']:%Y-%m-%d %H:%M:%S} UTC\t{state}")
    elif args.action == "revoke":
        if not await service.revoke(args.name):
            print(f"no active key named {args.name!r}", file=sys.stderr)
            return 1
        print(f"revoked {args.name}")
    return 0


async def _satellite(args: argparse.Namespace, database: Database) -> int:
    from cloudmailing.services.company import writing_beside_the_masters
    from cloudmailing.services.satellites import SatelliteService

    async with writing_beside_the_masters(database, WallClock()):
        return await _satellite_action(args, SatelliteService(await open_stores(database), WallClock()))


async def _satellite_action(args: argparse.Namespace, service: Any) -> int:
    try:
        if args.action == "add":
            print(await service.add(args.serial, {"group": args.group}))
        elif args.action == "list":
            for sat in await service.list():
                print(f"{sat['id']}\t{sat['serial']}\tenabled={sat['enabled']}\tpaired={sat['paired']}"
                      f"\tgroup={sat['group']}")
        elif args.action in ("enable", "disable"):
            await service.set_properties(args.id, {"enabled": args.action == "enable"})
        elif args.action == "approve":
            await service.set_properties(args.id, {"paired": True, "enabled": True})
        elif args.action == "delete":
            await service.delete(args.id)
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


async def _storage(args: argparse.Namespace, database: Database, clock: IReactorTime | None = None) -> int:
    # No master may write meanwhile: take the claim (a master starting now refuses), then check
    # that none runs (a master that started before has its entry in by then). The claim is
    # renewed while the command runs (a migration may outlast a claim's life), and every write
    # is refused once it may have lapsed.
    clock = clock or install_reactor()
    claim = WriterClaim(WriterClaimStore(database), clock, f"cm-admin storage {args.action}")
    renewal = ClaimRenewal(claim.renew, clock, "the writer's claim")
    try:
        await claim.take()
        renewal.start()
        database.write_guard = claim.lapsed
        running = await running_masters(MasterRegistry(database), clock)
        if running:
            raise ClaimHeld(f"a master runs on this database ({', '.join(m.describe() for m in running)}): "
                            f"stop it first")
        return await _storage_action(args, database)
    except (ClaimHeld, WriteRefused) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        await renewal.stop()
        database.write_guard = None
        await claim.release()


async def _storage_action(args: argparse.Namespace, database: Database) -> int:
    if args.action == "migrate":
        if await migrate(database) is None:
            print("nothing to migrate: the database already has the current layout, or is empty")
        return 0
    await check_layout_version(database)
    from cloudmailing.services.lifecycle import MailingLifecycle

    stores = await open_stores(database)
    mailing_ids = args.mailing_id or [doc["_id"] async for doc in stores.mailings.unfinished()]
    await MailingLifecycle(stores, WallClock()).recount(mailing_ids)
    print(f"recounted {len(mailing_ids)} mailings")
    return 0


def _show_config(settings: Settings) -> int:
    for section, values in dataclasses.asdict(settings).items():
        print(f"[{section}]")
        for key, value in values.items():
            print(f"{key} = {value}")
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = settings_or_exit(args.config)
    if args.command == "config":
        return _show_config(settings)

    async def run() -> int:
        try:
            database = await open_database(settings.mongodb_url, settings.database.name, timeout_ms=5000,
                                           check_layout=args.command != "storage")
        except LayoutError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        try:
            handler: Any = {"api-key": _api_key, "satellite": _satellite, "storage": _storage}[args.command]
            return int(await handler(args, database))
        finally:
            await database.close()

    return run_once(run)


if __name__ == "__main__":
    sys.exit(main())
