"""Jinja2 sandbox personalization of a mailing's subject and text parts.

Templates are compiled once per mailing (`compile_template`) and rendered once per
recipient (`CompiledTemplate.render`). Rendering runs in an immutable sandbox:

- no access to attributes starting with ``_`` (``{{ ''.__class__ }}`` fails) nor to
  mutating methods of lists/dicts;
- an undefined variable, or an attribute of one, renders empty; ``None`` renders empty;
- HTML templates autoescape variables, subject and plain templates do not;
- bounded by `TemplateLimits`: CPU time per render, output size, size of any single value
  (string, list...) a call, filter, operator or ``~`` makes, integers from ``*``/``**``;
  the calls that would allocate a huge string (``ljust``, ``replace``, ``join``, ``'x' * n``,
  format widths...) are refused before they run, and ``range()`` has at most 100,000 items.

The CPU limit is cooperative: every call, operator, attribute, loop iteration and output
value counts, and the thread's CPU time is looked at every few hundred of them. One Python
operation cannot be interrupted this way: the satellite's compose workers add hard process
limits (``compose_pool``).

A template that fails for a recipient raises `TemplateRenderError`: the caller marks that
recipient GENERAL_ERROR with ``error.reason``; the mailing goes on. A syntax error does not
raise at compile time either: every render of that template raises `TemplateRenderError`,
so callers have a single error path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass
from itertools import islice
from typing import Any
from urllib.parse import quote

from jinja2 import ChainableUndefined, Template, TemplateSyntaxError, nodes, pass_eval_context
from jinja2.exceptions import SecurityError
from jinja2.filters import do_center, do_format, do_indent, do_join, do_replace, make_attrgetter
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

log = logging.getLogger("cloudmailing.satellite.templates")


@dataclass(frozen=True)
class TemplateLimits:
    """What one render may use (the satellite's ``template_*`` settings)."""

    cpu_seconds: float = 2.0            # CPU time of one render (one message, in compose workers)
    max_output_chars: int = 2_000_000   # a rendered template
    max_value_chars: int = 1_000_000    # any one string made while rendering; items of a list
    max_int_bits: int = 65_536          # an integer '*' or '**' makes


DEFAULT_LIMITS = TemplateLimits()
DEFAULT_MAX_OUTPUT_CHARS = DEFAULT_LIMITS.max_output_chars
_CHECK_EVERY = 256     # operations between two looks at the CPU clock

_JINJA_MARKERS = ("{{", "{%", "{#")
_NEWLINES = re.compile(r"\r\n|\r|\n")
# Numbers in a format spec ('%9999s', '{:>9999}') and '*' widths of %-formats.
_FORMAT_NUMBER = re.compile(r"\d+")
_PERCENT_STAR = re.compile(r"%[-#0 +]*\*|%[-#0 +]*\d*\.\*")
_WIDTH_METHODS = frozenset({"ljust", "rjust", "center", "zfill"})

_configured = DEFAULT_LIMITS


class _Budget(threading.local):
    """The CPU budget of the render under way in this thread (deadline None: no render)."""

    deadline: float | None = None
    seconds = 0.0
    ticks = 0


_budget = _Budget()


class PersonalizationError(Exception):
    """A message could not be built for one recipient; `reason` is for ``reply_text``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TemplateRenderError(PersonalizationError):
    """A template failed to render for one recipient (syntax, sandbox, size, type...)."""


class TemplateLimitError(SecurityError):
    """A render went over one of its `TemplateLimits`."""


def configure(limits: TemplateLimits) -> None:
    """Set the limits of templates compiled from now on in this process (compose workers)."""
    global _configured
    _configured = limits


def configured_limits() -> TemplateLimits:
    """The limits `configure` set (the defaults until then)."""
    return _configured


@contextlib.contextmanager
def cpu_budget(seconds: float) -> Iterator[None]:
    """Renders in this block share ``seconds`` of this thread's CPU time (one message)."""
    previous = (_budget.deadline, _budget.seconds, _budget.ticks)
    _budget.deadline, _budget.seconds, _budget.ticks = time.thread_time() + seconds, seconds, 0
    try:
        yield
    finally:
        _budget.deadline, _budget.seconds, _budget.ticks = previous


def _tick() -> None:
    """Count one operation of the render under way; over its CPU time, stop it."""
    budget = _budget
    if budget.deadline is None:  # compiling: constant folding, no render under way
        return
    budget.ticks += 1
    if budget.ticks % _CHECK_EVERY == 0 and time.thread_time() > budget.deadline:
        raise TemplateLimitError(f"CPU time over {_budget.seconds:g} s")


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


class _Guards(NodeTransformer):
    """Route every loop and every ``~`` through the environment, where they are counted."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _environment_call("cm_loop", node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _environment_call("cm_sized", node)


def _environment_call(name: str, argument: nodes.Node) -> nodes.Node:
    call = nodes.Call(nodes.EnvironmentAttribute(name), [argument], [], None, None)
    return call.set_lineno(argument.lineno)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Immutable sandbox that counts its operations and refuses values over `limits`."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, *, autoescape: bool, limits: TemplateLimits) -> None:
        super().__init__(
            autoescape=autoescape,
            undefined=ChainableUndefined,
            keep_trailing_newline=True,
            newline_sequence="\r\n",
            finalize=self._finalize,
        )
        self.limits = limits
        self.max_chars = limits.max_value_chars
        self.filters["center"] = self._center
        self.filters["indent"] = self._indent
        self.filters["format"] = self._format
        self.globals["range"] = _bounded_range
        self.filters["replace"] = _replace
        self.filters["join"] = _join
        self.filters = {name: self._counted(f) for name, f in self.filters.items()}

    # -- compiling: loops and '~' routed through cm_loop / cm_sized --------------------------
    def compile(self, source: Any, name: str | None = None, filename: str | None = None,
                raw: bool = False, defer_init: bool = False) -> Any:
        if isinstance(source, str):
            source = _Guards().visit(self.parse(source, name, filename))
        return super().compile(source, name, filename, raw, defer_init)  # type: ignore[call-overload]

    def cm_loop(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            _tick()
            yield item

    def cm_sized(self, value: Any) -> Any:
        return self._sized(value, "'~'")

    # -- the sandbox's hooks -----------------------------------------------------------------
    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Fail loudly instead of rendering an empty string: the author must know.
        raise SecurityError(f"access to attribute {attribute!r} is not allowed")

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            __self._check_str_method(owner, __obj.__name__, args, kwargs)
            if __obj.__name__ == "join" and args:
                args = (__self._joinable(args[0], owner),)
        result = super().call(__context, __obj, *args, **kwargs)
        return __self._sized(result, f"{getattr(__obj, '__name__', 'call')}()")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*":
            self._check_repeat(left, right)
            self._check_repeat(right, left)
            if _both_ints(left, right):
                self._check_int_bits(left.bit_length() + right.bit_length())
        elif operator == "**" and _both_ints(left, right) and right > 0 and abs(left) > 1:
            self._check_int_bits(left.bit_length() * right)
        elif operator == "%" and isinstance(left, str):
            self._check_format_spec(left)
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, type(left)):
            self._check_length(len(left) + len(right), "'+'")
        return self._sized(super().call_binop(context, operator, left, right), f"'{operator}'")

    def wrap_str_format(self, value: Any) -> Any:
        wrapper = super().wrap_str_format(value)
        if wrapper is not None:
            self._check_format_spec(value.__self__)  # the format string itself
        return wrapper

    def _finalize(self, value: Any) -> Any:
        _tick()
        if value is None:
            return ""
        if isinstance(value, _CONTAINERS):  # its text is made next: refused before, when too large
            self._check_length(_text_size(value, self.max_chars), "value")
        return self._sized(value, "value")

    def _counted(self, function: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            _tick()
            return self._sized(function(*args, **kwargs), "filter result")

        return functools.update_wrapper(counted, function)

    # -- size checks -------------------------------------------------------------------------
    def _sized(self, value: Any, what: str) -> Any:
        if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
            self._check_length(len(value), what)
        return value

    def _check_length(self, length: int, what: str) -> None:
        if length > self.max_chars:
            raise TemplateLimitError(f"{what} larger than {self.max_chars} characters or items")

    def _check_str_method(self, text: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if name in _WIDTH_METHODS and args and isinstance(args[0], int):
            self._check_length(args[0], f"{name}()")
        elif name == "expandtabs":
            size = args[0] if args else kwargs.get("tabsize", 8)
            if isinstance(size, int):
                self._check_length(len(text) + text.count("\t") * size, "expandtabs()")
        elif name == "replace" and len(args) >= 2:
            self._check_replace(text, args[0], args[1], args[2] if len(args) > 2 else -1)

    def _check_replace(self, text: Any, old: Any, new: Any, count: Any) -> None:
        if not all(isinstance(v, str) for v in (text, old, new)):
            return
        hits = text.count(old) if old else len(text) + 1
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        self._check_length(len(text) + hits * (len(new) - len(old)), "replace()")

    def _joinable(self, iterable: Any, separator: str) -> list[Any]:
        """The items to join, refused when the joined string would be too large."""
        items = list(islice(iterable, self.max_chars + 1))
        self._check_length(len(items), "join()")
        total = len(separator) * max(len(items) - 1, 0)
        for item in items:
            total += len(item) if isinstance(item, str) else len(str(item))
            self._check_length(total, "join()")
        return items

    def _check_repeat(self, seq: Any, count: Any) -> None:
        if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
            if len(seq) * count > self.max_chars:
                raise TemplateLimitError(f"result of '*' larger than {self.max_chars} characters or items")

    def _check_int_bits(self, bits: int) -> None:
        if bits > self.limits.max_int_bits:
            raise TemplateLimitError(f"integer result of '*' or '**' over {self.limits.max_int_bits} bits")

    def _check_format_spec(self, fmt: str) -> None:
        if _PERCENT_STAR.search(fmt):
            raise TemplateLimitError("'*' width in a format")
        for number in _FORMAT_NUMBER.findall(fmt):
            if len(number) > 7 or int(number) > self.max_chars:
                raise TemplateLimitError(f"format width over {self.max_chars}")

    # -- filters that would allocate before a size check ------------------------------------
    def _center(self, value: Any, width: int = 80) -> str:
        self._check_width(width)
        return do_center(value, width)

    def _indent(self, value: Any, width: int | str = 4, first: bool = False,
                blank: bool = False) -> Any:
        if isinstance(width, int):
            self._check_width(width)
        elif len(width) > self.max_chars:
            raise TemplateLimitError(f"indent over {self.max_chars} characters")
        return do_indent(value, width, first, blank)

    def _format(self, value: Any, *args: Any, **kwargs: Any) -> str:
        self._check_format_spec(str(value))
        return do_format(value, *args, **kwargs)

    def _check_width(self, width: int) -> None:
        if width > self.max_chars:
            raise TemplateLimitError(f"width over {self.max_chars}")


def _bounded_range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise TemplateLimitError(f"range() over {MAX_RANGE} items")
    return numbers


@pass_eval_context
def _replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> Any:
    eval_ctx.environment._check_replace(str(s), str(old), str(new), -1 if count is None else count)
    return do_replace(eval_ctx, s, old, new, count)


@pass_eval_context
def _join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> Any:
    environment = eval_ctx.environment
    if attribute is not None:
        value = map(make_attrgetter(environment, attribute), value)
    return do_join(eval_ctx, environment._joinable(value, d), d)


_CONTAINERS = (list, tuple, dict, set, frozenset, Namespace, KeysView, ValuesView, ItemsView)


def _text_size(value: Any, limit: int) -> int:
    """At least the length of ``str(value)`` for a container: its items' sizes summed (with two
    characters each for separators), nested containers included; counting stops past ``limit``.

    A list's length is bounded by the value limit, not the strings it refers to: ``['x' * 10**6] *
    10**6`` is a small list whose text would be 10**12 characters. Without calling ``repr``,
    which would make that text: an item neither string, integer nor container counts one.
    """
    total = 2
    pending = [value]
    while pending:
        current = pending.pop()
        if isinstance(current, Namespace):  # its repr is that of its attributes
            current = current._Namespace__attrs  # type: ignore[attr-defined]
        items = current.items() if isinstance(current, Mapping) else current
        for item in items:
            total += 2
            if isinstance(item, (str, bytes)):
                total += len(item)
            elif isinstance(item, int):
                total += item.bit_length() // 3 + 1  # at least its decimal digits
            elif isinstance(item, _CONTAINERS):
                total += 2
                pending.append(item)
            else:
                total += 1
            if total > limit:
                return total
    return total


def _both_ints(left: Any, right: Any) -> bool:
    return isinstance(left, int) and isinstance(right, int)


@functools.lru_cache(maxsize=8)
def _environment(html: bool, limits: TemplateLimits) -> _BoundedSandbox:
    return _BoundedSandbox(autoescape=html, limits=limits)


class CompiledTemplate:
    """One compiled template of a mailing; `render` it once per recipient."""

    __slots__ = ("_constant", "_template", "_globals", "_error", "_limits")

    def __init__(self, constant: str | None, template: Template | None,
                 error: str | None, limits: TemplateLimits) -> None:
        self._constant = constant
        self._template = template
        # A plain dict of the template's globals (range, cycler...): Jinja would merge
        # its ChainMap into a new dict at each render, a third of the render time.
        self._globals: dict[str, Any] = dict(template.globals) if template else {}
        self._error = error
        self._limits = limits

    @property
    def is_constant(self) -> bool:
        """True when the source has no Jinja syntax: every recipient gets the same text."""
        return self._constant is not None

    @property
    def error(self) -> str | None:
        """The syntax error that makes every render fail, or None."""
        return self._error

    def render(self, variables: Mapping[str, object]) -> str:
        """Render for one recipient; raises `TemplateRenderError` with a human reason.

        Within a `cpu_budget` block the render uses that budget, else its own
        ``cpu_seconds``.
        """
        if self._constant is not None:
            return self._constant
        if self._template is None:
            raise TemplateRenderError(self._error or "invalid template")
        if _budget.deadline is not None:
            return self._render(self._template, variables)
        with cpu_budget(self._limits.cpu_seconds):
            return self._render(self._template, variables)

    def _render(self, template: Template, variables: Mapping[str, object]) -> str:
        limit = self._limits.max_output_chars
        chunks: list[str] = []
        size = 0
        try:
            context = template.new_context({**self._globals, **variables}, shared=True)
            for chunk in template.root_render_func(context):
                size += len(chunk)
                if size > limit:
                    raise TemplateRenderError(
                        f"template over its limits: output larger than {limit} characters")
                chunks.append(chunk)
        except TemplateRenderError:
            raise
        except TemplateLimitError as exc:
            raise TemplateRenderError(f"template over its limits: {exc}") from None
        except SecurityError as exc:
            raise TemplateRenderError(f"template not allowed: {exc}") from None
        except MemoryError:
            raise  # a process limit (compose workers): not the template's own error
        except Exception as exc:  # any failure of the author's template code
            raise TemplateRenderError(
                f"template error: {type(exc).__name__}: {exc}") from None
        return "".join(chunks)


def compile_template(source: str, *, html: bool,
                     limits: TemplateLimits | None = None) -> CompiledTemplate:
    """Compile `source` once per mailing. Never raises: see `CompiledTemplate.error`.

    Line breaks of the source become CRLF. `html` turns autoescaping on. `limits`
    defaults to those `configure` set.
    """
    limits = limits or _configured
    if not any(marker in source for marker in _JINJA_MARKERS):
        return CompiledTemplate(normalize_newlines(source), None, None, limits)
    try:
        template = _environment(html, limits).from_string(source)
    except TemplateSyntaxError as exc:
        reason = f"template syntax error line {exc.lineno}: {exc.message}"
        log.warning("invalid template: %s", reason)
        return CompiledTemplate(None, None, reason, limits)
    return CompiledTemplate(None, template, None, limits)
