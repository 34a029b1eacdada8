"""Where a key is in a TOML file: a line locator for error messages (not a TOML parser).

``tomllib`` gives values but no positions. This scans the raw text for table headers
(``[a.b]``, ``[[a]]``) and ``key =`` lines (dotted and quoted keys, and the keys of an inline
table on the same line), and maps each (table path + key path) to its 1-based line. Lines
inside multi-line strings are skipped. A path that is not found falls back to its nearest
enclosing table's header, so every message can still point somewhere useful.
"""

from __future__ import annotations

import re

__all__ = ["Locator", "split_dotted"]

_BARE = r"[A-Za-z0-9_-]+"
_KEY = rf'(?:{_BARE}|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_HEADER = re.compile(rf"^\s*\[(\[?)\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_KEYLINE = re.compile(rf"^\s*({_DOTTED})\s*=(.*)$")
_INLINE_KEY = re.compile(rf"[{{,]\s*({_DOTTED})\s*=")
_PART = re.compile(rf"\s*({_KEY})\s*(?:\.|$)")


def split_dotted(text: str) -> tuple[str, ...]:
    """``a."b.c".d`` -> ("a", "b.c", "d")."""
    out = []
    for m in _PART.finditer(text):
        part = m.group(1)
        if part[0] in "\"'":
            part = part[1:-1]
            if m.group(1)[0] == '"':
                part = part.encode().decode("unicode_escape") if "\\" in part else part
        out.append(part)
    return tuple(out)


class Locator:
    """``line(path)``: the line where ``path`` (a tuple of keys from the root) is set."""

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        in_string: str | None = None
        for lineno, raw in enumerate(text.splitlines(), start=1):
            if in_string is not None:
                if raw.count(in_string) % 2 == 1:
                    in_string = None
                continue
            header = _HEADER.match(raw)
            if header:
                table = split_dotted(header.group(2))
                self._lines.setdefault(table, lineno)
                continue
            keyline = _KEYLINE.match(raw)
            if not keyline:
                continue
            path = table + split_dotted(keyline.group(1))
            self._lines.setdefault(path, lineno)
            rest = keyline.group(2)
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_string = quote
            if "{" in rest:
                self._inline(path, rest, lineno)

    def _inline(self, path: tuple[str, ...], rest: str, lineno: int) -> None:
        # Keys of an inline table: `backoff = { initial = 1, cap = 30 }` (one level deep).
        for m in _INLINE_KEY.finditer(rest):
            self._lines.setdefault(path + split_dotted(m.group(1)), lineno)

    def line(self, path: tuple[str, ...]) -> int | None:
        for end in range(len(path), 0, -1):
            found = self._lines.get(path[:end])
            if found is not None:
                return found
        return None
