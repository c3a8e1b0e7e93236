"""Tests of the Jinja2 sandbox personalization (cloudmailing.satellite.templates)."""

from __future__ import annotations

import time

import pytest

from cloudmailing.satellite.templates import (
    TemplateRenderError,
    compile_template,
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


@pytest.mark.parametrize("source", [
    "{{ 'x' * 1000000000 }}",
    "{{ 1000000000 * [1] }}",
    "{{ 2 ** 100000000 }}",
    "{{ '%999999999s' % 'a' }}",
    "{{ '%*s' % (999999999, 'a') }}",
    "{{ '{:>999999999}'.format('a') }}",
    "{{ 'a'|center(999999999) }}",
    "{{ 'a\nb'|indent(999999999) }}",
    "{{ '%999999999s'|format('a') }}",
])
def test_huge_allocations_are_refused_before_they_happen(source: str) -> None:
    with pytest.raises(TemplateRenderError) as info:
        compile_template(source, html=False, max_output_chars=100_000).render({})
    assert "not allowed" in info.value.reason


def test_output_size_is_bounded_while_rendering() -> None:
    source = "{% for i in range(100000) %}{% for j in range(100000) %}0123456789{% endfor %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(TemplateRenderError) as info:
        compile_template(source, html=False, max_output_chars=100_000).render({})
    assert "larger than 100000" in info.value.reason
    assert time.monotonic() - started < 2


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
