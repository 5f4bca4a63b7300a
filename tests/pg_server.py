"""A throw-away PostgreSQL server on loopback for the tests (``pg_server`` fixture in conftest).

The cluster lives in a fresh temp folder, owned by a non-root user (postgres refuses to run as root: as root we
use the ``postgres`` system user, or create ``compress-pg`` with ``useradd --system``, and run initdb / pg_ctl
through ``runuser``), listens on 127.0.0.1 on a free port with trust authentication and ``fsync=off``, and is
stopped and deleted when the test session ends.

Without a server binary (or without the ``psycopg`` driver, SQLAlchemy's default for ``postgresql://``)
:func:`unavailable` names what is missing, and the tests skip with that reason, unless
``COMPRESS_REQUIRE_POSTGRES=1`` (set by ``.ci/run``): then they fail.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "compress"  # the database role initdb creates (trust auth on loopback only)
FALLBACK_OS_USER = "compress-pg"


def pg_bin_dir() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                    if Path(p).parent.name.isdigit() else 0, reverse=True):
        if os.access(Path(d) / "initdb", os.X_OK) and os.access(Path(d) / "pg_ctl", os.X_OK):
            return Path(d)
    return None


def unavailable() -> str | None:
    """Why no test server can be started here, or None."""
    if pg_bin_dir() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "no psycopg driver: pip install 'psycopg[binary]' (the project's [postgres] extra)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser to start postgres as another user"
    return None


def _os_user() -> str | None:
    """The non-root user that runs the server (None: the current user, who is not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", FALLBACK_OS_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_OS_USER],
                   check=True, capture_output=True)
    return FALLBACK_OS_USER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    root: Path
    port: int
    user: str | None
    bindir: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and r.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{tail}")
        return r

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def start() -> PgServer:
    """initdb + pg_ctl start in a new temp folder; the caller stops it (:meth:`PgServer.stop`)."""
    bindir = pg_bin_dir()
    if bindir is None:
        raise RuntimeError(unavailable())
    user = _os_user()
    root = Path(tempfile.mkdtemp(prefix="compress-pg-"))  # /tmp, not pytest's 0700 root-owned folders
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    server = PgServer(root=root, port=_free_port(), user=user, bindir=bindir)
    try:
        server._run("initdb", "-D", str(root / "data"), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                    "--no-sync", "--no-instructions")
        opts = (f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        server._run("pg_ctl", "-D", str(root / "data"), "-l", str(root / "server.log"), "-o", opts, "-w",
                    "-t", "60", "start")
    except BaseException:
        server.stop()
        raise
    return server
