"""One rich progress bar helper shared by the commands (stderr, so stdout stays clean for --json)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(total: int, what: str):
    """(Progress context manager, tick callable)."""
    prog = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True))
    task = prog.add_task(what, total=total)
    return prog, (lambda: prog.advance(task))
