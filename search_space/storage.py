"""Where the Optuna study lives, and what lets several workers share it.

* :func:`open_storage` opens an RDB URL (``sqlite:///…``, ``postgresql://…``, ``mysql://…``) as an
  ``optuna.storages.RDBStorage`` with heartbeats, so that a trial of a worker that died is marked failed by the
  others (and run once more by a live worker) instead of staying "running" forever. A bad URL, a missing driver
  or an unreachable server is a :class:`CompressError`; workers that open a fresh database at the same moment
  race to create Optuna's tables, so a failed first open is retried (SQLite: they take turns, under a file lock).
* :class:`PerTrialSeedSampler` seeds the sampler of every trial with ``seed + trial.number``: trial numbers are
  handed out by the database, so two workers never draw the same "random" trial, and a resumed study never
  replays an earlier session's draws.
* :func:`wait_for_running` lets a worker that has finished its own trials wait for the trials other workers are
  still running, so every worker chooses from the same completed trials and writes the same plan.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Callable

from plans.errors import CompressError

HEARTBEAT_S = 10  # a running trial's worker writes a heartbeat this often
GRACE_S = 60  # a running trial without a heartbeat for this long belongs to a dead worker: it is marked failed
OPEN_ATTEMPTS = 10
WORKER_ATTR = "worker"  # user attribute "host:pid" set when a trial starts (such trials are waited for)

_DRIVERS = {"postgresql": "psycopg[binary] (pip install 'attention-compressor[postgres]')",
            "mysql": "mysqlclient or PyMySQL"}


def redacted(url: str) -> str:
    """The URL without its password (for messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 -- a malformed URL is reported elsewhere; never echo a password
        return url.split("@")[-1] if "@" in url else url


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # wait for another process's write lock instead of failing at 5 s
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return {}


def open_storage(url: str, *, heartbeat: bool = True):
    """``url`` as an ``optuna.storages.RDBStorage`` (heartbeats on by default); CompressError when it can't be
    opened."""
    import optuna
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        backend = make_url(url).get_backend_name()
    except Exception as e:  # noqa: BLE001 -- sqlalchemy.exc.ArgumentError and friends
        raise CompressError(f"--storage {redacted(url)!r} is not a database URL ({e}); e.g. sqlite:///optuna.db or "
                            "postgresql://user@host/dbname") from None
    kw = dict(engine_kwargs=_engine_kwargs(url))
    last = None
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with _quiet(), _init_lock(url):
                if heartbeat:
                    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) \
                        or optuna.storages.RetryFailedTrialCallback
                    kw.update(heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=retry(max_retry=1))
                return optuna.storages.RDBStorage(url, **kw)
        except ImportError as e:
            need = _DRIVERS.get(backend.split("+")[0], "the database driver SQLAlchemy names")
            raise CompressError(f"optuna storage {redacted(url)}: no database driver for {backend!r} "
                                f"({e.__cause__ or e}); install {need}") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            last = e  # another worker is creating the same tables right now (PostgreSQL, MySQL)
            time.sleep(0.2 * (attempt + 1))
        except (sqlalchemy.exc.SQLAlchemyError, OSError, RuntimeError, ValueError) as e:
            raise CompressError(f"optuna storage {redacted(url)} cannot be opened: "
                                f"{str(e).strip().splitlines()[0]}") from None
    raise CompressError(f"optuna storage {redacted(url)} cannot be opened: {str(last).strip().splitlines()[0]}")


@contextlib.contextmanager
def _init_lock(url: str):
    """For a SQLite file: one process at a time creates or checks Optuna's tables (two processes doing it at once
    deadlock on SQLite's file lock until its timeout), through an flock on ``<file>.lock`` next to it."""
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    if not path or path.startswith(":memory:") or not Path(path).parent.is_dir():
        yield  # (a missing folder: SQLite's own error says so)
        return
    import fcntl

    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet():
    """Optuna marks heartbeats 'experimental' (since v2.8); say nothing about it."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _sampler_base():
    from optuna.samplers import BaseSampler

    return BaseSampler


class PerTrialSeedSampler(_sampler_base()):
    """A fresh ``make(seed + trial.number)`` sampler for every trial (see the module docstring)."""

    def __init__(self, make: Callable[[int], object], seed: int):
        self._make, self._seed = make, int(seed)
        self._inner = make(self._seed)

    def before_trial(self, study, trial) -> None:
        self._inner = self._make(self._seed + trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def others_running(study) -> list[int]:
    """Numbers of the running trials started by a worker of this tool (see :data:`WORKER_ATTR`), after failing
    the trials of dead workers (heartbeat older than :data:`GRACE_S`)."""
    import optuna

    with _quiet():
        optuna.storages.fail_stale_trials(study)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return [t.number for t in running if WORKER_ATTR in t.user_attrs and _alive(t.user_attrs[WORKER_ATTR])]


def _alive(worker: str) -> bool:
    """False only for a worker of this host whose process is gone (its trial will go stale: no need to wait)."""
    host, _, pid = str(worker).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def wait_for_running(study, *, poll_s: float = 1.0, on_wait: Callable[[list[int]], None] | None = None) -> None:
    """Return once no other worker's trial is running (``on_wait(numbers)`` is told once what we wait for)."""
    told = False
    while True:
        numbers = others_running(study)
        if not numbers:
            return
        if on_wait is not None and not told:
            on_wait(numbers)
            told = True
        time.sleep(poll_s)
