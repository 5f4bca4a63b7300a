"""Progress for the commands: re-exports the one helper, :mod:`profilers.progress` (it lives there so the
profilers and the search can use it too; see that module for the rich-on-a-TTY / plain-lines-otherwise rule)."""

from __future__ import annotations

from profilers.progress import Progress, fmt_duration, progress

__all__ = ["Progress", "fmt_duration", "progress"]
