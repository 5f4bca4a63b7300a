"""Consoles that print text literally: what a user's file or path holds reaches the terminal as it is written.

Paths, plan fields, corpus names and error messages may hold rich markup (``[red]``, ``[/]``) or terminal control
characters (ESC sequences that recolour, move the cursor or clear the screen). :class:`LiteralConsole` is a rich
``Console`` with markup and highlighting off and every string it renders (printed text, table cells, titles) passed
through :func:`literal`, which shows control characters as ``\\xNN`` escapes. Styling is given with ``rich.text.Text``
objects, never with markup inside strings.

    >>> literal("a\\x1b[2Jb [red]c")
    'a\\\\x1b[2Jb [red]c'
"""

from __future__ import annotations

import re

from rich.console import Console

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 (but tab, newline), DEL, C1


def literal(text: str) -> str:
    """``text`` with every control character but tab and newline written as a ``\\xNN`` escape."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class LiteralConsole(Console):
    """A rich Console that renders every string literally (no markup, no highlighting, control characters
    escaped by :func:`literal`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("markup", False)
        kwargs.setdefault("highlight", False)
        super().__init__(*args, **kwargs)

    def render_str(self, text: str, **kwargs):
        kwargs["markup"], kwargs["highlight"] = False, False
        return super().render_str(literal(text), **kwargs)


__all__ = ["literal", "LiteralConsole"]
