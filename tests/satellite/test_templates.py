"""Tests of the Jinja2 sandbox personalization (cloudmailing.satellite.templates)."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudmailing.satellite.templates import (
    TemplateLimits,
    TemplateRenderError,
    compile_template,
    cpu_budget,
    template_variables,
    unsubscribe_url,
)


def render(source: str, html: bool = False, **variables: object) -> str:
    return compile_template(source, html=html).render(variables)


def test_constant_template_is_fast_path_with_crlf() -> None:
    template = compile_template("Hello\nworld\r\nbye\r", html=True)
    assert template.is_constant
    assert template.render({}) == "Hello\r\nworld\r\nbye\r\n"


def test_jinja_template_renders_variables_with_crlf_lines() -> None:
    template = compile_template("Hi {{ firstname }}\n{{ email }}\n", html=False)
    assert not template.is_constant
    assert template.render({"firstname": "Zoé", "email": "z@x.org"}) == "Hi Zoé\r\nz@x.org\r\n"


def test_undefined_none_and_chained_undefined_render_empty() -> None:
    out = render("[{{ missing }}][{{ missing.deep.er }}][{{ nothing }}][{{ missing|upper }}]",
                 nothing=None)
    assert out == "[][][][]"


def test_html_autoescapes_but_plain_and_subject_do_not() -> None:
    value = "<b>Tom & Jerry</b>"
    assert render("{{ v }}", html=True, v=value) == "&lt;b&gt;Tom &amp; Jerry&lt;/b&gt;"
    assert render("{{ v }}", html=False, v=value) == value


@pytest.mark.parametrize("source", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ v.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ lst.append(1) }}",
    "{{ d.clear() }}",
])
def test_sandbox_blocks_internals_and_mutation(source: str) -> None:
    with pytest.raises(TemplateRenderError) as info:
        render(source, v="x", lst=[1], d={"a": 1})
    assert "not allowed" in info.value.reason or "unsafe" in info.value.reason


SMALL = TemplateLimits(cpu_seconds=0.3, max_output_chars=100_000, max_value_chars=100_000)


@pytest.mark.parametrize("source", [
    "{{ 'x' * 1000000000 }}",
    "{{ 1000000000 * [1] }}",
    "{{ 2 ** 100000000 }}",
    "{{ (10 ** 1000) ** 1000 }}",
    "{{ '%999999999s' % 'a' }}",
    "{{ '%*s' % (999999999, 'a') }}",
    "{{ '{:>999999999}'.format('a') }}",
    "{{ 'a'|center(999999999) }}",
    "{{ 'a\nb'|indent(999999999) }}",
    "{{ '%999999999s'|format('a') }}",
    "{{ ''.ljust(10**9) }}",
    "{% for i in range(10**6) %}{% endfor %}",
    "{{ 'a'.rjust(10**9) }}",
    "{{ '1'.zfill(10**9) }}",
    "{{ '\t\t'.expandtabs(10**9) }}",
    "{{ ('x' * 1000).replace('x', 'x' * 1000) }}",
    "{{ 'xxxx'.replace('x', 'xxxxxxxxxx').replace('x', 'xxxxxxxxxx').replace('x', 'xxxxxxxxxx')"
    ".replace('x', 'xxxxxxxxxx').replace('x', 'xxxxxxxxxx').replace('x', 'xxxxxxxxxx') }}",
    "{{ ('x' * 1000)|replace('x', 'x' * 1000) }}",
    "{{ ''.join([('x' * 50000)] * 100) }}",
    "{{ (([('x' * 50000)] * 100))|join }}",
    "{% set ns = namespace(s='x' * 1000) %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s=['x']) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s %}{{ ns.s }}{{ ns.s }}{% endset %}"
    "{% endfor %}",
])
def test_huge_allocations_are_refused_before_they_happen(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateRenderError) as info:
        compile_template(source, html=False, limits=SMALL).render({})
    assert "over its limits" in info.value.reason
    assert time.monotonic() - started < 2


def test_output_size_is_bounded_while_rendering() -> None:
    source = "{% for i in range(1000) %}{% for j in range(1000) %}0123456789{% endfor %}{% endfor %}"
    with pytest.raises(TemplateRenderError) as info:
        compile_template(source, html=False, limits=SMALL).render({})
    assert "output larger than 100000" in info.value.reason


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set l = range(100000)|list %}{% for a in l %}{% for b in l %}{% for c in l %}{% endfor %}{% endfor %}"
    "{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% if (i * j) % 7 == 9 %}x{% endif %}{% endfor %}"
    "{% endfor %}",
])
def test_cpu_time_is_bounded_even_without_output(source: str) -> None:
    started = time.thread_time()
    with pytest.raises(TemplateRenderError) as info:
        compile_template(source, html=False, limits=SMALL).render({})
    assert info.value.reason == "template over its limits: CPU time over 0.3 s"
    assert time.thread_time() - started < 1.0


def test_one_cpu_budget_covers_every_render_of_a_message() -> None:
    busy = compile_template("{% for i in range(100000) %}{{ i % 2 }}{% endfor %}", html=False,
                            limits=TemplateLimits(cpu_seconds=100, max_output_chars=10**6))
    with cpu_budget(0.05), pytest.raises(TemplateRenderError) as info:
        for _ in range(1000):
            busy.render({})
    assert info.value.reason == "template over its limits: CPU time over 0.05 s"


def test_small_repeat_and_format_still_work() -> None:
    assert render("{{ '-' * 3 }}{{ '%3s'|format('a') }}{{ '{:>3}'.format('b') }}") == "---  a  b"


def test_render_error_fails_one_recipient_only() -> None:
    template = compile_template("{{ 100 // n }} items", html=False)
    assert template.render({"n": 4}) == "25 items"
    with pytest.raises(TemplateRenderError) as info:
        template.render({"n": 0})
    assert "ZeroDivisionError" in info.value.reason
    assert template.render({"n": 5}) == "20 items"


def test_syntax_error_is_reported_at_every_render() -> None:
    template = compile_template("Hello {% if %}", html=True)
    assert template.error is not None and "syntax" in template.error
    for _ in range(2):
        with pytest.raises(TemplateRenderError) as info:
            template.render({})
        assert "line 1" in info.value.reason


def test_unsubscribe_url_quotes_recipient_id() -> None:
    assert unsubscribe_url("", "abc") == ""
    assert (unsubscribe_url("https://t.example.com/ct/", "a b/é?&")
            == "https://t.example.com/ct/unsubscribe/a%20b%2F%C3%A9%3F%26")


def test_builtins_override_contact_fields() -> None:
    variables = template_variables({"email": "spoof", "unsubscribe": "x", "name": "N"},
                                   "real@x.org", "https://u")
    assert variables == {"email": "real@x.org", "unsubscribe": "https://u", "name": "N"}


# Templates are written by clients: any mix of the costly operations must end, quickly, in text within
# the output limit or in a TemplateRenderError, never in another exception or a hang.
_LEAVES = st.sampled_from(["n", "s", "l", "7", "1000000", "'x'", "'\\t'", "''", "range(n)", "range(100000)"])
_EXPRESSIONS = st.recursive(_LEAVES, lambda inner: st.one_of(
    st.tuples(inner, st.sampled_from(["*", "**", "+", "~", "%", "//"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
    st.tuples(inner, st.sampled_from(["ljust", "rjust", "center", "zfill", "expandtabs"]), inner).map(
        lambda t: f"({t[0]}).{t[1]}({t[2]})"),
    st.tuples(inner, inner, inner).map(lambda t: f"({t[0]}).replace({t[1]}, {t[2]})"),
    st.tuples(inner, inner).map(lambda t: f"({t[0]}).join({t[1]})"),
    st.tuples(inner, st.sampled_from(["join", "list", "center(1000000)", "replace('x', s)", "indent(n)", "sum",
                                      "string", "batch(3)", "sort", "unique", "wordwrap"])).map(
        lambda t: f"({t[0]})|{t[1]}"),
), max_leaves=6)
_TEMPLATES = st.one_of(
    _EXPRESSIONS.map(lambda e: f"{{{{ {e} }}}}"),
    st.tuples(_EXPRESSIONS, _EXPRESSIONS, _EXPRESSIONS).map(
        lambda t: f"{{% for i in {t[0]} %}}{{% for j in {t[1]} %}}{{{{ {t[2]} }}}}{{% endfor %}}{{% endfor %}}"),
    st.tuples(_EXPRESSIONS, _EXPRESSIONS).map(
        lambda t: f"{{% set ns = namespace(v={t[0]}) %}}{{% for i in range(60) %}}"
                  f"{{% set ns.v = ns.v ~ {t[1]} ~ ns.v %}}{{% endfor %}}{{{{ ns.v }}}}"),
)
_FAST = TemplateLimits(cpu_seconds=0.1, max_output_chars=100_000, max_value_chars=100_000)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TEMPLATES)
def test_any_template_ends_within_its_limits(source: str) -> None:
    template = compile_template(source, html=False, limits=_FAST)
    started = time.thread_time()
    try:
        output = template.render({"n": 10**9, "s": "x" * 1000, "l": list(range(1000))})
    except TemplateRenderError:
        pass
    else:
        assert len(output) <= _FAST.max_output_chars
    assert time.thread_time() - started < 1.0, source


@pytest.mark.parametrize("source", [
    "{{ ['x' * 1000000] * 600 }}",
    "{{ ['x' * 1000000] * 1000000 }}",
    "{{ [[''] * 1000000] * 1000000 }}",
    "{{ {'a': 'x' * 600000, 'b': 'y' * 600000} }}",
    "{{ ('x' * 600000, ['y' * 600000]) }}",
    "{% set ns = namespace(x=['x' * 1000000] * 1000) %}{{ ns }}",
])
def test_a_value_whose_text_would_be_too_large_is_refused_before_it_is_made(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateRenderError) as info:
        render(source)
    assert info.value.reason == "template over its limits: value larger than 1000000 characters or items"
    assert time.monotonic() - started < 2


def test_small_lists_and_dicts_still_render() -> None:
    assert render("{{ [1, 'a', None] }} {{ {'k': (2, 3)} }}") == "[1, 'a', None] {'k': (2, 3)}"
    assert render("{{ ['x' * 400000] * 2 }}") == str(["x" * 400000] * 2)
