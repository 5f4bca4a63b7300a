"""The one progress helper of every long command (stderr, so stdout stays clean for ``--json``).

    with progress("profile", total=12, unit="samples") as tick:
        for ...:
            ...
            tick()                              # one more done
            tick(0, stage="profile N=2048")     # rename the stage without advancing
            tick(1, loss=0.12)                  # extra fields are shown after the counts (they stay)
            tick(1, work=n)                     # with work_total=...: the ETA weighs steps by their work

On a terminal it draws a rich bar. Anywhere else (CI, ``nohup``, a log file) it writes plain lines such as
``[profile] 3/12 samples  elapsed 1m05s  eta 3m15s``: at the first tick, when the stage text changes (the next
method, length or phase), whenever at least ``interval`` seconds have passed since the last line, and at the end.
A daemon heartbeat thread also writes a line when ``interval`` seconds pass without one (a single step that takes
minutes), and stops when the block exits.

Nesting is allowed (``compress run`` wraps its stages): on a terminal the inner bars join the outer rich display;
in plain mode only the innermost active writer's heartbeat speaks.

Settings, passed as ``progress(..., output=ProgressOutput(interval=0, mode="plain"))``: ``interval`` (seconds;
default ``$COMPRESS_PROGRESS_INTERVAL``, else 30; 0 writes a line on every tick and turns the heartbeat off),
``mode`` (``auto``, ``rich``, ``plain``, ``off``; default
``$COMPRESS_PROGRESS``, else ``auto``: rich when stderr is a TTY, plain otherwise), ``stream``, ``clock`` and
``heartbeat`` (:class:`ProgressOutput`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from profilers.terminal import LiteralConsole, literal

DEFAULT_INTERVAL = 30.0
MODES = ("auto", "rich", "plain", "off")
_MIN_HEARTBEAT = 0.01  # seconds; the smallest heartbeat period

_lock = threading.RLock()
_plain_stack: list["Progress"] = []  # active plain writers, innermost last
_rich = None  # the shared rich Progress while any rich bar is active
_rich_users = 0


def default_interval() -> float:
    raw = os.environ.get("COMPRESS_PROGRESS_INTERVAL", "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        return max(0.0, float(raw))
    except ValueError:
        return DEFAULT_INTERVAL


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # closed or odd streams
        return False


def fmt_duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@dataclass(frozen=True)
class ProgressOutput:
    """Where and how often a :class:`Progress` writes (see the module docstring).

    ``interval``: seconds between plain lines and heartbeats (None: :func:`default_interval`; 0: a line on every
    tick, no heartbeat). ``mode``: ``auto``, ``rich``, ``plain`` or ``off`` (None: ``$COMPRESS_PROGRESS``, else
    ``auto``). ``stream``: the text stream written to (None: ``sys.stderr``, looked up at each write).
    ``clock``: the time source in seconds (tests pass a fake). ``heartbeat``: run the heartbeat thread.
    """

    interval: float | None = None
    mode: str | None = None
    stream: Any = None
    clock: Callable[[], float] = time.monotonic
    heartbeat: bool = True


class Progress:
    """Context manager; ``__enter__`` returns the object itself, which is the ``tick`` callable."""

    def __init__(self, stage: str, total: int | None = None, *, unit: str = "", done: int = 0,
                 work_total: float | None = None, work_done: float = 0.0, enabled: bool = True,
                 output: ProgressOutput = ProgressOutput()):
        interval, mode, stream, clock, heartbeat = (
            output.interval, output.mode, output.stream, output.clock, output.heartbeat)
        self.stage = str(stage)
        self.total = None if total is None else int(total)
        self.unit = unit
        self.done = int(done)
        self.work_total = None if work_total is None else float(work_total)
        self.work = float(work_done)
        self.info: dict = {}
        self.interval = default_interval() if interval is None else max(0.0, float(interval))
        mode = (mode or os.environ.get("COMPRESS_PROGRESS", "") or "auto").strip().lower()
        if mode not in MODES:
            mode = "auto"
        if not enabled:
            mode = "off"
        self._mode_setting = mode
        self.mode = "off"
        self._stream = stream
        self._clock = clock
        self._want_heartbeat = heartbeat
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._t0 = self._t_tick = self._last_line = 0.0
        self._done0, self._work0 = self.done, self.work
        self._lines = 0
        self._ticks = 0
        self._task = None

    # ---- helpers
    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stderr  # looked up late: tests swap sys.stderr

    def _count_text(self) -> str:
        c = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        return f"{c} {self.unit}".rstrip()

    def _info_text(self) -> str:
        return "  ".join(f"{k} {_fmt_value(v)}" for k, v in self.info.items())

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left, from the rate so far (work-weighted when ``work_total`` is given); None when unknown."""
        now = self._clock() if now is None else now
        if self.work_total is not None:
            did, left = self.work - self._work0, self.work_total - self.work
        elif self.total is not None:
            did, left = self.done - self._done0, self.total - self.done
        else:
            return None
        if left <= 0:
            return 0.0
        spent = self._t_tick - self._t0
        if did <= 0 or spent <= 0:
            return None
        return max(0.0, left * spent / did - (now - self._t_tick))  # counts down during a long step

    def line(self, now: float | None = None, end: str | None = None) -> str:
        now = self._clock() if now is None else now
        parts = [f"[{self.stage}] {self._count_text()}", f"elapsed {fmt_duration(now - self._t0)}"]
        if end is not None:
            parts.append(end)
        else:
            e = self.eta(now)
            parts.append(f"eta {'--' if e is None else fmt_duration(e)}")
        info = self._info_text()
        if info:
            parts.append(info)
        return "  ".join(parts)

    def _emit(self, end: str | None = None) -> None:
        with _lock:
            now = self._clock()
            try:
                self.stream.write(literal(self.line(now, end)) + "\n")  # stage names may hold user text
                self.stream.flush()
            except (OSError, ValueError):  # a closed stream must not kill the work
                pass
            self._last_line = now
            self._lines += 1

    # ---- heartbeat
    def _heartbeat(self) -> None:
        while True:
            with _lock:
                wait = self._last_line + self.interval - self._clock()
            if self._stop.wait(max(_MIN_HEARTBEAT, wait)):
                return
            with _lock:
                if self._stop.is_set():
                    return
                innermost = bool(_plain_stack) and _plain_stack[-1] is self
                if innermost and self._clock() - self._last_line >= self.interval:
                    self._emit()
                elif not innermost:
                    self._last_line = self._clock()  # an inner writer speaks for now

    # ---- context manager
    def __enter__(self) -> "Progress":
        global _rich, _rich_users
        mode = self._mode_setting
        if mode == "auto":
            mode = "rich" if _is_tty(self.stream) else "plain"
        self.mode = mode
        self._t0 = self._t_tick = self._last_line = self._clock()
        if mode == "rich":
            with _lock:
                if _rich is None:
                    from rich.progress import (BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn,
                                               TimeRemainingColumn)

                    _rich = RichProgress(  # stage names and info may hold user text: no markup, literal
                        TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                        TextColumn("{task.fields[count]}", markup=False), TextColumn("{task.fields[info]}", markup=False),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=(LiteralConsole(file=self._stream) if self._stream is not None
                                 else LiteralConsole(stderr=True)))
                    _rich.start()
                _rich_users += 1
                self._task = _rich.add_task(literal(self.stage), total=self._rich_total(), completed=self._rich_completed(),
                                            count=self._count_text(), info="")
        elif mode == "plain":
            with _lock:
                _plain_stack.append(self)
            if self._want_heartbeat and self.interval > 0:
                self._thread = threading.Thread(target=self._heartbeat, name=f"progress[{self.stage}]", daemon=True)
                self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        global _rich, _rich_users
        if self.mode == "plain":
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            with _lock:
                if self in _plain_stack:
                    _plain_stack.remove(self)
            if exc_type is None:
                self._emit("done")
            else:
                stopped = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else f"stopped ({exc_type.__name__})"
                self._emit(stopped)
        elif self.mode == "rich":
            with _lock:
                _rich_users -= 1
                if _rich_users <= 0 and _rich is not None:
                    _rich.stop()
                    _rich, _rich_users = None, 0
        self.mode = "off"
        return None

    # ---- the tick
    def _rich_total(self):
        return self.work_total if self.work_total is not None else self.total

    def _rich_completed(self):
        return self.work if self.work_total is not None else self.done

    def __call__(self, advance: int = 1, *, work: float | None = None, stage: str | None = None, **info) -> None:
        if self.mode == "off":
            return
        with _lock:
            renamed = stage is not None and str(stage) != self.stage
            if stage is not None:
                self.stage = str(stage)
            if info:
                self.info.update(info)
            if advance:
                self.done += int(advance)
                self.work += float(advance if work is None else work)
                self._t_tick = self._clock()
                self._ticks += 1
            elif work:
                self.work += float(work)
            if self.mode == "rich":
                if _rich is not None and self._task is not None:
                    _rich.update(self._task, description=literal(self.stage), completed=self._rich_completed(),
                                 count=self._count_text(), info=self._info_text())
                return
            if renamed:  # a new stage (the next method, length, phase) is worth a line
                self._emit()
            elif advance and (self._ticks == 1 or self.interval <= 0
                              or self._clock() - self._last_line >= self.interval):
                self._emit()


def progress(stage: str, total: int | None = None, **kw) -> Progress:
    """``with progress("profile", total=n, unit="samples") as tick: ... tick()`` (see the module docstring)."""
    return Progress(stage, total, **kw)
