"""What the benchmark scripts share: the machine line of their results, the command / date stamps and the
json + markdown write.

The scripts run as ``python benchmarks/<script>.py`` (the commands in their docstrings and in
``benchmarks/results/*.md``); Python puts the script's folder first on ``sys.path``, so they import this module as
``from common import machine``. The project's packages (``compressor``, ``plans``, ...) are installed (editable) and
need no ``sys.path`` edit. This module imports torch only inside :func:`machine`, and only for the styles that name
it (``milp_bench.py`` runs without torch)::

    >>> from common import machine
    >>> machine("no-torch").count(", Python ") == 1
    True
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

MACHINE_STYLES = ("system", "threads", "no-torch")


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else ``platform.processor()`` or ``platform.machine()``)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def machine(style: str = "system") -> str:
    """The ``machine`` line of a results file, in one of the formats the committed results use:

    * ``"system"`` (fidelity, dense_models, fidelity_levers):
      ``AMD EPYC, 2 CPUs, torch 2.13.0+cpu (2 threads), Linux 6.1, Python 3.11.7``
    * ``"threads"`` (kernels_cpu, decode_cpu): ``AMD EPYC, 2 logical CPUs, torch 2.13.0+cpu, 1 thread(s)``
    * ``"no-torch"`` (milp_bench): ``AMD EPYC, 2 CPUs, Linux 6.1, Python 3.11.7``
    """
    if style not in MACHINE_STYLES:
        raise ValueError(f"machine style {style!r}: one of {MACHINE_STYLES}")
    cpu, system = cpu_name(), f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    if style == "no-torch":
        return f"{cpu}, {os.cpu_count()} CPUs, {system}"
    import torch

    if style == "threads":
        return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), {system}"


def command_line() -> str:
    """``python <script, relative to the cwd> <args>``: the command that produced a results file."""
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def utc_minute() -> str:
    """Now in UTC to the minute, as the results' ``date`` fields write it: ``2025-01-31 12:34 UTC``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_results(json_path: str | os.PathLike, data, markdown: str, indent: int = 1) -> Path:
    """Write ``data`` as JSON (``indent``, trailing newline) to ``json_path`` and ``markdown`` as given to the same
    path with the suffix ``.md``, each atomically (:func:`plans.atomic.write_text_atomic`). Returns the json path."""
    from plans.atomic import write_text_atomic

    json_path = Path(json_path)
    write_text_atomic(json_path, json.dumps(data, indent=indent) + "\n")
    write_text_atomic(json_path.with_suffix(".md"), markdown)
    return json_path
