"""Time is injected everywhere: no module but the program entry point reaches for the global reactor,
and nothing that reads or schedules time has a default clock."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from cloudmailing.api.resource import request_factory
from cloudmailing.common.link import LinkProtocol
from cloudmailing.master.link_server import SatelliteLinkFactory
from cloudmailing.satellite.daemon import SatelliteDaemon
from cloudmailing.satellite.delivery import DeliveryScheduler
from cloudmailing.satellite.message_builder import MailingMessageTemplate
from cloudmailing.satellite.mx_resolver import MxResolver
from cloudmailing.satellite.smtp_client import SmtpConnection

PACKAGE = Path(__file__).resolve().parents[2] / "cloudmailing"
ENTRY_POINT = PACKAGE / "cli" / "runtime.py"  # installs and runs the reactor: it alone may import it


def _imports_the_reactor(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet":
            if any(alias.name == "reactor" for alias in node.names):
                return True
        if isinstance(node, ast.Import) and any(a.name == "twisted.internet.reactor" for a in node.names):
            return True
    return False


def test_only_the_entry_point_imports_the_global_reactor():
    importing = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                       if path != ENTRY_POINT and _imports_the_reactor(path))
    assert importing == []


def test_clocks_and_reactors_are_required_arguments():
    for built in (LinkProtocol, SatelliteLinkFactory, DeliveryScheduler, MailingMessageTemplate, MxResolver,
                  SmtpConnection, SatelliteDaemon, request_factory):
        parameters = inspect.signature(built).parameters
        timed = [p for name, p in parameters.items() if name in ("clock", "reactor")]
        assert timed, built
        assert all(p.default is inspect.Parameter.empty for p in timed), built
