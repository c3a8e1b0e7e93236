"""Early checks of personalization templates, so that a template that cannot render is a Fault,
not N failed mails.

A template is compiled by the same sandbox the satellites render with, then rendered once with
no recipient data (every variable undefined, so empty) under the same limits (the built-in
defaults of the satellites' ``template_*`` settings). Refused (Fault 406): a syntax error, and
what that render shows every recipient would meet: a limit gone over (CPU time, output or value
size, integer size) or an operation the sandbox forbids. Other errors of that render (a division
by an undefined field...) may not happen with real data: they are left to each recipient.
"""

from __future__ import annotations

import asyncio

from cloudmailing.satellite.templates import DEFAULT_LIMITS, TemplateLimits, TemplateRenderError, compile_template
from cloudmailing.services.errors import InvalidValue

_REFUSED = ("template over its limits", "template not allowed")


async def check_template(name: str, source: str, *, html: bool = False,
                         limits: TemplateLimits = DEFAULT_LIMITS) -> None:
    """Raise :class:`InvalidValue` (Fault 406) when ``source`` cannot render for any recipient."""
    if "{" not in source:
        return
    # In a thread: the render may take its whole CPU time limit, the API goes on meanwhile.
    reason = await asyncio.to_thread(_refusal, source, html, limits)
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
            return f"{error.reason} (rendered with no recipient data)"
    return None
