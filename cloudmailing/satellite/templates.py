"""Jinja2 sandbox personalization of a mailing's subject and text parts.

Templates are compiled once per mailing (`compile_template`) and rendered once per
recipient (`CompiledTemplate.render`). Rendering runs in an immutable sandbox:

- no access to attributes starting with ``_`` (``{{ ''.__class__ }}`` fails) nor to
  mutating methods of lists/dicts;
- an undefined variable, or an attribute of one, renders empty; ``None`` renders empty;
- HTML templates autoescape variables, subject and plain templates do not;
- the output, and the obvious ways to allocate huge strings (``'x' * n``, ``**``,
  ``%``/``format`` width specs, ``center``/``indent``), are bounded.

A template that fails for a recipient raises `TemplateRenderError`: the caller marks that
recipient GENERAL_ERROR with ``error.reason``; the mailing goes on. A syntax error does not
raise at compile time either: every render of that template raises `TemplateRenderError`,
so callers have a single error path.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from jinja2 import ChainableUndefined, Template, TemplateSyntaxError
from jinja2.exceptions import SecurityError
from jinja2.filters import do_center, do_format, do_indent
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger("cloudmailing.satellite.templates")

DEFAULT_MAX_OUTPUT_CHARS = 2_000_000
"""Largest rendered template (characters); a larger one is a render error."""

_JINJA_MARKERS = ("{{", "{%", "{#")
_NEWLINES = re.compile(r"\r\n|\r|\n")
# Numbers in a format spec ('%9999s', '{:>9999}') and '*' widths of %-formats.
_FORMAT_NUMBER = re.compile(r"\d+")
_PERCENT_STAR = re.compile(r"%[-#0 +]*\*|%[-#0 +]*\d*\.\*")


class PersonalizationError(Exception):
    """A message could not be built for one recipient; `reason` is for ``reply_text``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TemplateRenderError(PersonalizationError):
    """A template failed to render for one recipient (syntax, sandbox, size, type...)."""


def normalize_newlines(text: str) -> str:
    """Return `text` with every line break as CRLF, as MIME text parts need."""
    return _NEWLINES.sub("\r\n", text)


def unsubscribe_url(tracking_url: str, recipient_id: str) -> str:
    """The recipient's one-click unsubscribe URL (RFC 8058), '' without tracking URL.

    Format: ``<tracking_url without trailing '/'>/unsubscribe/<percent-encoded id>``;
    the master serves GET (landing page) and POST (one-click) on it.
    """
    if not tracking_url:
        return ""
    return f"{tracking_url.rstrip('/')}/unsubscribe/{quote(recipient_id, safe='')}"


def template_variables(
    contact: Mapping[str, object], email: str, unsubscribe: str
) -> dict[str, object]:
    """Variables of one recipient: contact fields, then ``email`` and built-ins."""
    variables = dict(contact)
    variables["email"] = email
    variables["unsubscribe"] = unsubscribe
    return variables


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Immutable sandbox that refuses to build strings larger than `max_chars`."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, *, autoescape: bool, max_chars: int) -> None:
        super().__init__(
            autoescape=autoescape,
            undefined=ChainableUndefined,
            keep_trailing_newline=True,
            newline_sequence="\r\n",
            finalize=_none_is_empty,
        )
        self.max_chars = max_chars
        self.filters["center"] = self._center
        self.filters["indent"] = self._indent
        self.filters["format"] = self._format

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Fail loudly instead of rendering an empty string: the author must know.
        raise SecurityError(f"access to attribute {attribute!r} is not allowed")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            self._check_repeat(left, right)
            self._check_repeat(right, left)
        elif operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise SecurityError("exponent too large")
        elif operator == "%" and isinstance(left, str):
            self._check_format_spec(left)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Any:
        wrapper = super().wrap_str_format(value)
        if wrapper is not None:
            self._check_format_spec(value.__self__)  # the format string itself
        return wrapper

    def _check_repeat(self, seq: Any, count: Any) -> None:
        if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
            if len(seq) * count > self.max_chars:
                raise SecurityError("result of '*' too large")

    def _check_format_spec(self, fmt: str) -> None:
        if _PERCENT_STAR.search(fmt):
            raise SecurityError("'*' width in format not allowed")
        for number in _FORMAT_NUMBER.findall(fmt):
            if len(number) > 7 or int(number) > self.max_chars:
                raise SecurityError("format width too large")

    def _center(self, value: Any, width: int = 80) -> str:
        self._check_width(width)
        return do_center(value, width)

    def _indent(self, value: Any, width: int | str = 4, first: bool = False,
                blank: bool = False) -> Any:
        if isinstance(width, int):
            self._check_width(width)
        elif len(width) > self.max_chars:
            raise SecurityError("indent too large")
        return do_indent(value, width, first, blank)

    def _format(self, value: Any, *args: Any, **kwargs: Any) -> str:
        self._check_format_spec(str(value))
        return do_format(value, *args, **kwargs)

    def _check_width(self, width: int) -> None:
        if width > self.max_chars:
            raise SecurityError("width too large")


def _none_is_empty(value: Any) -> Any:
    return "" if value is None else value


@functools.lru_cache(maxsize=8)
def _environment(html: bool, max_chars: int) -> _BoundedSandbox:
    return _BoundedSandbox(autoescape=html, max_chars=max_chars)


class CompiledTemplate:
    """One compiled template of a mailing; `render` it once per recipient."""

    __slots__ = ("_constant", "_template", "_globals", "_error", "_max_chars")

    def __init__(self, constant: str | None, template: Template | None,
                 error: str | None, max_chars: int) -> None:
        self._constant = constant
        self._template = template
        # A plain dict of the template's globals (range, cycler...): Jinja would merge
        # its ChainMap into a new dict at each render, a third of the render time.
        self._globals: dict[str, Any] = dict(template.globals) if template else {}
        self._error = error
        self._max_chars = max_chars

    @property
    def is_constant(self) -> bool:
        """True when the source has no Jinja syntax: every recipient gets the same text."""
        return self._constant is not None

    @property
    def error(self) -> str | None:
        """The syntax error that makes every render fail, or None."""
        return self._error

    def render(self, variables: Mapping[str, object]) -> str:
        """Render for one recipient; raises `TemplateRenderError` with a human reason."""
        if self._constant is not None:
            return self._constant
        if self._template is None:
            raise TemplateRenderError(self._error or "invalid template")
        chunks: list[str] = []
        size = 0
        try:
            context = self._template.new_context({**self._globals, **variables}, shared=True)
            for chunk in self._template.root_render_func(context):
                size += len(chunk)
                if size > self._max_chars:
                    raise TemplateRenderError(
                        f"template output larger than {self._max_chars} characters")
                chunks.append(chunk)
        except TemplateRenderError:
            raise
        except SecurityError as exc:
            raise TemplateRenderError(f"template not allowed: {exc}") from None
        except Exception as exc:  # any failure of the author's template code
            raise TemplateRenderError(
                f"template error: {type(exc).__name__}: {exc}") from None
        return "".join(chunks)


def compile_template(source: str, *, html: bool,
                     max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS) -> CompiledTemplate:
    """Compile `source` once per mailing. Never raises: see `CompiledTemplate.error`.

    Line breaks of the source become CRLF. `html` turns autoescaping on.
    """
    if not any(marker in source for marker in _JINJA_MARKERS):
        return CompiledTemplate(normalize_newlines(source), None, None, max_output_chars)
    try:
        template = _environment(html, max_output_chars).from_string(source)
    except TemplateSyntaxError as exc:
        reason = f"template syntax error line {exc.lineno}: {exc.message}"
        log.warning("invalid template: %s", reason)
        return CompiledTemplate(None, None, reason, max_output_chars)
    return CompiledTemplate(None, template, None, max_output_chars)
