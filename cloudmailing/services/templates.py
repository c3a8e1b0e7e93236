"""Early checks of personalization templates, so that a template that cannot render is a Fault,
not N failed mails.

A template is compiled by the same sandbox the satellites render with, then rendered once with
no recipient data (every variable undefined, so empty) under the same limits (the built-in
defaults of the satellites' ``template_*`` settings). Refused (Fault 406): a syntax error, and
what that render shows every recipient would meet: a limit gone over (CPU time, output or value
size, integer size) or an operation the sandbox forbids. Other errors of that render (a division
by an undefined field...) may not happen with real data: they are left to each recipient.

The render runs in a long-lived child process under hard limits, as the satellites' compose
workers do (:mod:`cloudmailing.services.limited_process`): one operation the sandbox cannot
interrupt, or memory it does not count, must not stall or exhaust the master. Over the child's
memory (``CHECK_MEMORY_MB``), its CPU timer or the wall-clock time, the template is refused
too (``template over its limits: ...``). The event loop only awaits the answer.
"""

from __future__ import annotations

import asyncio

from cloudmailing.config.settings import SatelliteConfig
from cloudmailing.satellite.templates import DEFAULT_LIMITS, TemplateLimits, TemplateRenderError, compile_template
from cloudmailing.services.errors import InvalidValue
from cloudmailing.services.limited_process import LimitedProcesses, OverLimits

_REFUSED = ("template over its limits", "template not allowed")
_NO_DATA = " (rendered with no recipient data)"
CHECK_MEMORY_MB = SatelliteConfig.compose_memory_mb  # as a compose worker's default
CHECK_PROCESSES = 2  # checks at once (the others wait their turn)

_checkers = LimitedProcesses(CHECK_PROCESSES, CHECK_MEMORY_MB, preload=(__name__,))


async def stop_unused_checkers() -> None:
    """Stop the checking processes no check used since the last call (the master calls it
    every few minutes: an idle master does not keep their memory)."""
    await asyncio.to_thread(_checkers.stop_unused)


async def check_template(name: str, source: str, *, html: bool = False,
                         limits: TemplateLimits = DEFAULT_LIMITS) -> None:
    """Raise :class:`InvalidValue` (Fault 406) when ``source`` cannot render for any recipient."""
    if "{" not in source:
        return
    # In a child process, awaited: the render may take its whole CPU time limit or more memory
    # than the master should give; the API goes on meanwhile.
    try:
        reason = await _checkers.call(_refusal, source, html, limits, cpu_seconds=limits.cpu_seconds,
                                      wall_seconds=max(10.0, 5 * limits.cpu_seconds))
    except OverLimits as over:
        reason = over.reason + _NO_DATA
    if reason:
        raise InvalidValue(f"{name}: {reason}")


def _refusal(source: str, html: bool, limits: TemplateLimits) -> str | None:
    template = compile_template(source, html=html, limits=limits)
    if template.error:
        return template.error
    try:
        template.render({})
    except TemplateRenderError as error:
        if error.reason.startswith(_REFUSED):
            return error.reason + _NO_DATA
    return None
