"""A plain-text rendering of an HTML body, for mailings created without a plain part."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser

_BLOCKS = {"p", "div", "br", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "table", "ul", "ol",
           "blockquote", "pre", "hr", "section", "article", "header", "footer"}
_SKIPPED = {"script", "style", "head", "title"}
# Jinja syntax of a template (the default delimiters, as the satellites' sandbox uses them).
_JINJA_CLOSERS = {"{{": "}}", "{%": "%}", "{#": "#}"}
_JINJA_OPENER = re.compile(r"\{[{%#]")
# A protected span while the HTML is parsed: private-use characters and its index, which the
# parser takes for text wherever it stands and the whitespace clean-up leaves alone.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}s?(\\d+){_CLOSE}")  # "s": a statement or comment
_STATEMENT = re.compile(f"{_OPEN}s(\\d+){_CLOSE}")
# '{' that would start Jinja syntax in the text: one the HTML wrote as a character reference
# (&#123;&#123;), or one just before a span put back.
_TEXT_BRACE = re.compile(f"\\{{(?=[{{%#{_OPEN}])")


class _TextExtractor(HTMLParser):
    """Text of the HTML; with ``keep_statements``, the placeholders of Jinja statements found
    anywhere (in a tag, a comment, a script) are kept in the text, in order."""

    def __init__(self, keep_statements: bool = False) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0
        self._links: list[str | None] = []
        self._keep_statements = keep_statements

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:
            self._skip_depth += 1
        elif tag in _BLOCKS:
            self.parts.append("\n")
        href = dict(attrs).get("href") if tag == "a" else None
        # The statements of a link's target stay there (the text shows the target): not twice.
        self._keep(self.get_starttag_text() or "", besides=href or "")
        if tag == "a":
            self._links.append(href)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED and self._skip_depth:
            self._skip_depth -= 1
        elif tag in _BLOCKS:
            self.parts.append("\n")
        elif tag == "a" and self._links:
            href = self._links.pop()
            if href and not href.startswith(("#", "mailto:")):
                self.parts.append(f" ({href})")

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            self._keep(data)
        else:
            self.parts.append(re.sub(r"[ \t\r\n]+", " ", data))  # a &nbsp; stays non-breaking

    def handle_comment(self, data: str) -> None:
        self._keep(data)

    def handle_decl(self, decl: str) -> None:
        self._keep(decl)

    def handle_pi(self, data: str) -> None:
        self._keep(data)

    def unknown_decl(self, data: str) -> None:
        self._keep(data)

    def _keep(self, markup: str, besides: str = "") -> None:
        """The statements in markup that gives no text (but those also in ``besides``): an
        ``{% if %}`` in a tag or a comment must not lose its ``{% endif %}`` in the text."""
        if self._keep_statements and _OPEN in markup:
            shown = set(_STATEMENT.findall(besides))
            self.parts.extend(match.group() for match in _STATEMENT.finditer(markup)
                              if match.group(1) not in shown)


def html_to_text(html: str) -> str:
    """Readable text: block elements become line breaks, links keep their target."""
    return _text(html, _TextExtractor())


def _text(html: str, extractor: _TextExtractor) -> str:
    extractor.feed(html)
    extractor.close()
    lines = (line.strip() for line in "".join(extractor.parts).splitlines())
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def html_template_to_text(source: str) -> str:
    """The plain-text template of an HTML template: :func:`html_to_text` of its markup, its Jinja
    syntax (``{{ }}``, ``{% %}``, ``{# #}``) kept as it is.

    The HTML parser would take Jinja syntax for markup (``{% if stock<limit %}`` loses its
    ``<limit %}``): every span is put aside before, and back after. A statement inside a tag, a
    comment or a script is kept too (in the text, where it was), so the blocks of the template
    stay balanced; an expression there goes with the markup (an ``href``'s stays in the link)."""
    if not _JINJA_OPENER.search(source) or _OPEN in source or _CLOSE in source:
        return html_to_text(source)
    spans: list[str] = []
    protected = "".join(_put_aside(source, spans))
    text = _text(protected, _TextExtractor(keep_statements=True))
    text = _TEXT_BRACE.sub("{{ '{' }}", text)  # the text's own '{' stays text
    return _PLACEHOLDER.sub(lambda match: spans[int(match.group(1))], text)


def _put_aside(source: str, spans: list[str]) -> Iterator[str]:
    """``source`` in pieces, each Jinja span (from an opener to its first closer) replaced by its
    placeholder and added to ``spans``. Linear: once an opener has no closer, the later ones of
    its kind are not looked for again (a regex would rescan the rest of the text for each)."""
    position = 0
    unclosed: set[str] = set()
    search_from = 0
    while match := _JINJA_OPENER.search(source, search_from):
        opener = match.group()
        search_from = match.start() + 1
        if opener in unclosed:
            continue
        end = source.find(_JINJA_CLOSERS[opener], match.end())
        if end < 0:
            unclosed.add(opener)
            continue
        end += 2
        yield source[position:match.start()]
        spans.append(source[match.start():end])
        kind = "" if opener == "{{" else "s"
        yield f"{_OPEN}{kind}{len(spans) - 1}{_CLOSE}"
        position = search_from = end
    yield source[position:]
