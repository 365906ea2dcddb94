"""A PostgreSQL cluster in a folder of its own (``initdb``, ``pg_ctl``): the database of ``make cluster-up``
and of the tests marked ``postgres``, from the system's packages, no Docker.

PostgreSQL refuses to run as root, so as root its server commands run as the ``postgres`` user (``runuser``)
and the folder is handed to that user. Clients authenticate with a password (SCRAM), which is never put in a
URL: libpq, psycopg2 and asyncpg read it from ``PGPASSWORD`` or the ``PGPASSFILE`` that :meth:`write_pgpass` writes.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: The system user PostgreSQL's packages create; the server runs as it when we are root.
SYSTEM_USER = "postgres"


class PostgresError(RuntimeError):
    """The PostgreSQL binaries are missing or a server command failed; ``str()`` says which and why."""


def pg_bindir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on ``PATH``, else the newest ``/usr/lib/postgresql/*/bin``
    (Debian keeps them off ``PATH``); ``None`` when PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    if found and (Path(found).resolve().parent / "initdb").exists():
        return Path(found).resolve().parent
    def major(path: Path) -> int:
        return int(path.parts[-3]) if path.parts[-3].isdigit() else 0

    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=major)
    return versions[-1].parent if versions else None


@dataclass(frozen=True)
class LocalPostgres:
    """One cluster: data, socket and log under ``folder``, listening on ``host:port`` only."""

    folder: Path
    port: int
    host: str = "127.0.0.1"
    user: str = "pricelevel"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"

    @property
    def pgpass(self) -> Path:
        return self.folder / "pgpass"

    def url(self, database: str, driver: str = "psycopg2") -> str:
        """A SQLAlchemy URL without the password (``postgresql+psycopg2://user@host:port/db``)."""
        return f"postgresql+{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def init(self, password: str) -> None:
        """``initdb`` with ``user`` as superuser and SCRAM password authentication (a no-op when done before)."""
        if self.initialised():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            closed = [p for p in self.folder.resolve().parents if not p.stat().st_mode & 0o001]
            if closed:
                raise PostgresError(f"as root, PostgreSQL runs as user {SYSTEM_USER!r}, which cannot enter {closed[0]} "
                                    f"(mode {closed[0].stat().st_mode & 0o777:o}): use a folder it can reach")
        (self.folder / "socket").mkdir(exist_ok=True)
        pwfile = self.folder / "initdb.pw"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        self._hand_over(self.folder, self.folder / "socket", pwfile)
        try:
            self._run("initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                      "-E", "UTF8", "--locale=C", "--no-instructions")
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self, timeout_s: float = 60, settings: dict[str, str] | None = None) -> None:
        """``pg_ctl start`` and wait until it accepts connections; ``settings`` are extra ``-c`` options."""
        options = [f"-p {self.port}", f"-k {self.folder / 'socket'}", f"-c listen_addresses={self.host}",
                   *(f"-c {key}={value}" for key, value in (settings or {}).items())]
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(int(timeout_s)),
                  "-o", " ".join(options), "start", log_tail=True)

    def running(self) -> bool:
        if not self.initialised():
            return False
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def stop(self, timeout_s: float = 60) -> None:
        """``pg_ctl stop -m fast``: clients are disconnected, their transactions rolled back; a no-op if stopped."""
        if self.running():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", str(int(timeout_s)), "stop")

    def create_database(self, name: str, password: str) -> None:
        """Create ``name`` owned by ``user`` unless it exists."""
        env = {**os.environ, "PGPASSWORD": password}
        query = ["psql", "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", "postgres", "-tAc"]
        found = self._client(*query, f"SELECT 1 FROM pg_database WHERE datname = '{name}'", env=env)
        if found.stdout.strip() != "1":
            self._client("createdb", "-h", self.host, "-p", str(self.port), "-U", self.user, name, env=env)

    def write_pgpass(self, password: str) -> Path:
        """A libpq password file for this server (mode 600): ``PGPASSFILE`` points clients at it."""
        self.pgpass.write_text(f"{self.host}:{self.port}:*:{self.user}:{password}\n")
        self.pgpass.chmod(0o600)
        return self.pgpass

    # ------------------------------------------------------------------------------------------ helpers

    def _hand_over(self, *paths: Path) -> None:
        """As root, the server's files belong to the ``postgres`` user (it may not read root's)."""
        if os.geteuid() != 0:
            return
        account = pwd.getpwnam(SYSTEM_USER)
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid)

    def _run(self, program: str, *args: str, check: bool = True, log_tail: bool = False) -> subprocess.CompletedProcess:
        bindir = pg_bindir()
        if bindir is None:
            raise PostgresError("PostgreSQL is not installed (no pg_ctl/initdb): apt-get install postgresql")
        argv = [str(bindir / program), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", SYSTEM_USER, "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, cwd="/", check=False)
        if check and done.returncode != 0:
            tail = ""
            if log_tail:
                with contextlib.suppress(OSError):
                    tail = "\n" + "\n".join(self.log.read_text().splitlines()[-10:])
            raise PostgresError(f"{program} failed ({done.returncode}): {(done.stderr or done.stdout).strip()}{tail}")
        return done

    def _client(self, program: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        bindir = pg_bindir()
        binary = bindir / program if bindir and (bindir / program).exists() else shutil.which(program)
        if binary is None:
            raise PostgresError(f"{program} not found: apt-get install postgresql-client")
        done = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise PostgresError(f"{program} failed ({done.returncode}): {done.stderr.strip()}")
        return done
