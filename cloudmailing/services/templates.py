"""Early checks of personalization templates, so a syntax error is a Fault, not N failed mails."""

from __future__ import annotations

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cloudmailing.services.errors import InvalidValue

_ENVIRONMENT = ImmutableSandboxedEnvironment()


def check_template(name: str, source: str) -> None:
    """Raise :class:`InvalidValue` (Fault 406) when ``source`` is not valid Jinja2."""
    if "{" not in source:
        return
    try:
        _ENVIRONMENT.parse(source)
    except TemplateSyntaxError as error:
        raise InvalidValue(f"{name}: template error line {error.lineno}: {error.message}") from None
