"""Private PostgreSQL and Redis servers under the state folder, for a machine with none.

When ``AGENTMGR_DATABASE_URL`` or ``AGENTMGR_REDIS_URL`` is empty, ``make run``
prepares the matching server here and writes a supervisord program file for it
into ``$AGENTMGR_HOME/supervisor.d/``. Both servers listen only on a Unix socket
under the state folder and open no TCP port.

PostgreSQL refuses to run as root, so when the manager runs as root both
servers run as an unprivileged account (``AGENTMGR_EMBEDDED_USER``).
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from services.core import defaults
from services.core.errors import AgentManagerError, ExitCode
from services.core.settings import Settings

logger = logging.getLogger(__name__)

INCLUDE_FILE = "embedded.conf"
POSTGRES_PROGRAM_PRIORITY = 10
"""supervisord starts lower priorities first and stops them last."""


class EmbeddedServerError(AgentManagerError):
    """A private server cannot be prepared (binary missing, folder not reachable)."""

    exit_code = ExitCode.CONFIG


def find_postgres_binary(name: str) -> Path:
    """Return the path of PostgreSQL's ``name`` (initdb, postgres), newest version first.

    Raises:
        EmbeddedServerError: PostgreSQL's server binaries are not installed.
    """
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0,
        reverse=True,
    )
    found = shutil.which(name)
    for candidate in [*candidates, found]:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise EmbeddedServerError(
        f"PostgreSQL's {name} was not found: install the server (Debian: apt-get install "
        "postgresql) or set AGENTMGR_DATABASE_URL to an existing database"
    )


def find_redis_server() -> Path:
    """Return the path of ``redis-server``.

    Raises:
        EmbeddedServerError: Redis is not installed.
    """
    found = shutil.which("redis-server")
    if not found:
        raise EmbeddedServerError(
            "redis-server was not found: install it (Debian: apt-get install redis-server) "
            "or set AGENTMGR_REDIS_URL to an existing server"
        )
    return Path(found)


class EmbeddedServers:
    """Prepare the private servers that ``settings`` selects and describe them to supervisord."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_as_other_user = os.geteuid() == 0
        self.user = settings.embedded_user if self.run_as_other_user else pwd.getpwuid(os.geteuid()).pw_name
        if self.run_as_other_user and not self.user:
            raise EmbeddedServerError(
                "no unprivileged account to run the private PostgreSQL as root: "
                "set AGENTMGR_EMBEDDED_USER to an existing user"
            )

    def prepare(self) -> Path | None:
        """Create what the selected servers need and return the supervisord file written.

        Returns ``None``, and removes an old file, when both servers are external.

        Raises:
            EmbeddedServerError: a binary is missing or a path is unusable.
        """
        include = self.settings.supervisor_include_dir / INCLUDE_FILE
        sections = []
        if self.settings.embedded_database:
            self.prepare_postgres()
            sections.append(self.postgres_program())
        if self.settings.embedded_redis:
            self.prepare_redis()
            sections.append(self.redis_program())
        if not sections:
            include.unlink(missing_ok=True)
            return None
        include.parent.mkdir(parents=True, exist_ok=True)
        header = "; Written by services.launch at each start; edits are overwritten.\n"
        include.write_text(header + "\n".join(sections))
        return include

    # PostgreSQL.

    def prepare_postgres(self) -> None:
        """Create the cluster and its database once; later starts reuse them."""
        data = self.settings.postgres_data_dir
        socket_dir = self.settings.postgres_socket_dir
        self._check_socket_path(socket_dir / f".s.PGSQL.{defaults.EMBEDDED_POSTGRES_PORT}.lock")
        self._make_owned_dir(socket_dir, mode=0o750)
        if (data / "PG_VERSION").exists():
            return

        # initdb into a scratch folder and rename it at the end, so an
        # interrupted first start leaves nothing half-made behind.
        scratch = data.with_name("data.initializing")
        shutil.rmtree(scratch, ignore_errors=True)
        self._make_owned_dir(scratch.parent, mode=0o755)
        self._check_reachable(scratch.parent)
        logger.info("creating: private PostgreSQL cluster in %s", data, extra={"user": self.user})
        self._run(
            [
                str(find_postgres_binary("initdb")),
                "--pgdata", str(scratch),
                "--username", defaults.EMBEDDED_DATABASE_NAME,
                "--auth-local", "trust",
                "--auth-host", "reject",
                "--encoding", "UTF8",
                "--locale", "C",
                "--no-instructions",
            ],
            what="initdb",
        )
        with open(scratch / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# Added by the Agent Manager: Unix socket only, sized for a fleet.\n"
                "listen_addresses = ''\n"
                "max_connections = 300\n"
            )
        self._run(
            [str(find_postgres_binary("postgres")), "--single", "-D", str(scratch), "postgres"],
            what="create database",
            stdin=f"CREATE DATABASE {defaults.EMBEDDED_DATABASE_NAME};\n",
        )
        scratch.rename(data)

    def postgres_program(self) -> str:
        """Return the supervisord section that runs the private cluster."""
        command = (
            f"{find_postgres_binary('postgres')} -D {self.settings.postgres_data_dir} "
            f"-k {self.settings.postgres_socket_dir} -p {defaults.EMBEDDED_POSTGRES_PORT}"
        )
        # SIGINT is PostgreSQL's fast shutdown: it ends sessions and checkpoints.
        return self._program("postgres", command, stopsignal="INT", stopwaitsecs=60)

    # Redis.

    def prepare_redis(self) -> None:
        self._check_socket_path(self.settings.redis_socket_path)
        self._make_owned_dir(self.settings.redis_dir, mode=0o750)
        self._check_reachable(self.settings.redis_dir)

    def redis_program(self) -> str:
        """Return the supervisord section that runs the private Redis."""
        command = (
            f"{find_redis_server()} --port 0 --unixsocket {self.settings.redis_socket_path} "
            f"--unixsocketperm 770 --dir {self.settings.redis_dir} "
            "--appendonly yes --appendfsync everysec --save \"\" --databases 16"
        )
        return self._program("redis", command, stopsignal="TERM", stopwaitsecs=30)

    # Helpers.

    def _program(self, name: str, command: str, *, stopsignal: str, stopwaitsecs: int) -> str:
        lines = [
            f"[program:{name}]",
            f"command = {command}",
            f"priority = {POSTGRES_PROGRAM_PRIORITY}",
            "autostart = true",
            "autorestart = true",
            "startsecs = 1",
            f"stopsignal = {stopsignal}",
            f"stopwaitsecs = {stopwaitsecs}",
            f"stdout_logfile = {self.settings.log_dir / (name + '.log')}",
            "stdout_logfile_maxbytes = 20MB",
            "stdout_logfile_backups = 5",
            "redirect_stderr = true",
        ]
        if self.run_as_other_user:
            lines.append(f"user = {self.user}")
        return "\n".join(lines) + "\n"

    def _make_owned_dir(self, path: Path, *, mode: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        if self.run_as_other_user:
            account = pwd.getpwnam(self.user)
            os.chown(path, account.pw_uid, account.pw_gid)

    def _check_reachable(self, path: Path) -> None:
        """Raise unless the server's account can enter every folder above ``path``."""
        if not self.run_as_other_user:
            return
        for parent in path.resolve().parents:
            if not parent.stat().st_mode & 0o001:
                raise EmbeddedServerError(
                    f"the account {self.user!r} that runs the private servers cannot enter {parent}: "
                    f"run `chmod o+x {parent}` or set AGENTMGR_HOME to a folder it can reach"
                )

    def _check_socket_path(self, path: Path) -> None:
        if len(str(path)) > defaults.UNIX_SOCKET_PATH_MAX:
            raise EmbeddedServerError(
                f"socket path {path} is longer than {defaults.UNIX_SOCKET_PATH_MAX} bytes: "
                "set AGENTMGR_HOME to a shorter folder"
            )

    def _run(self, argv: list[str], *, what: str, stdin: str | None = None) -> None:
        account = pwd.getpwnam(self.user) if self.run_as_other_user else None
        result = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": "/"},
            cwd="/",
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"{what} failed with exit status {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
