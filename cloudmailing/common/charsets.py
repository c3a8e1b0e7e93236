"""Charset labels as MIME readers know them.

Python's codecs accept many aliases (``latin-1``, ``utf_8``, ``u8``, ``iso8859_15``) that are not
names of the IANA charset registry, which MIME readers go by (RFC 2046 4.1.2, RFC 2978): a reader
shows a part labelled ``latin-1`` in its default charset. :func:`mime_charset` gives the preferred
MIME name of a charset Python knows, itself a name Python accepts for the same codec, so the text
can still be encoded with the label written in Content-Type.
"""

from __future__ import annotations

import codecs
import functools
import re

# Python codec name (codecs.lookup(label).name) -> IANA preferred MIME name, when they differ.
_MIME_NAMES = {
    "ascii": "us-ascii",
    "utf-8-sig": "utf-8",  # the same text; a BOM has no place in a MIME part
    "euc_jp": "euc-jp",
    "euc_kr": "euc-kr",
    "iso2022_jp": "iso-2022-jp",
    "iso2022_jp_2": "iso-2022-jp-2",
    "iso2022_kr": "iso-2022-kr",
    "big5hkscs": "big5-hkscs",
    "hz": "hz-gb-2312",
    "mac-roman": "macintosh",
    "shift_jis": "shift_jis",  # IANA's Shift_JIS, underscore included
    **{f"cp{n}": f"ibm{n}" for n in (437, 775, 850, 852, 855, 857, 860, 861, 862, 863, 864, 865, 866, 869)},
    **{f"cp{n}": f"windows-{n}" for n in range(1250, 1259)},
}
_ISO_8859 = re.compile(r"iso8859-(\d+)")


@functools.lru_cache(maxsize=64)
def mime_charset(label: str) -> str:
    """The preferred MIME name (lower case) of the charset ``label`` names; LookupError if Python
    does not know it. The answer names the same codec in Python (``codecs.lookup``)."""
    name = codecs.lookup(label).name
    match = _ISO_8859.fullmatch(name)
    candidates = [f"iso-8859-{match.group(1)}"] if match else []
    candidates += [_MIME_NAMES.get(name, name.replace("_", "-")), name]
    for candidate in candidates:
        if _same_codec(candidate, name):
            return candidate
    return name


def _same_codec(candidate: str, name: str) -> bool:
    try:
        return codecs.lookup(candidate).name == name or (name == "utf-8-sig" and candidate == "utf-8")
    except LookupError:
        return False
