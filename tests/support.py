"""Real servers and programs for the tests: PostgreSQL clusters, Redis, supervisord.

Nothing here is a double: each helper starts the real binary or program and
talks to it over its real socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from services.core.embedded import find_postgres_binary, find_redis_server

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SUPERVISORD_CONF = PROJECT_ROOT / "conf" / "supervisord.conf"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns a true value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def make_shared_dir(prefix: str) -> Path:
    """Create a temporary folder that an unprivileged server account can enter."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def server_account() -> pwd.struct_passwd | None:
    """Return the account that test servers run as: an unprivileged one when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root, but neither a postgres nor a nobody account exists")


def _as_account(account: pwd.struct_passwd | None) -> dict[str, Any]:
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _chown(path: Path, account: pwd.struct_passwd | None) -> None:
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)


class PostgresCluster:
    """A private PostgreSQL cluster on a TCP port of 127.0.0.1, with trust authentication."""

    def __init__(self, base: Path) -> None:
        self.account = server_account()
        self.base = base
        self.data = base / "data"
        self.socket_dir = base / "run"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        self.socket_dir.mkdir(exist_ok=True)
        _chown(self.socket_dir, self.account)
        self._initdb()

    def _initdb(self) -> None:
        self.data.mkdir()
        _chown(self.data, self.account)
        subprocess.run(
            [
                str(find_postgres_binary("initdb")), "-D", str(self.data), "-U", "postgres",
                "--auth", "trust", "-E", "UTF8", "--locale", "C", "--no-instructions",
            ],
            check=True, capture_output=True, cwd="/", **_as_account(self.account),
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 400\n")

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        log = open(self.base / "postgres.log", "ab")
        self.process = subprocess.Popen(
            [
                str(find_postgres_binary("postgres")), "-D", str(self.data), "-p", str(self.port),
                "-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1",
            ],
            stdout=log, stderr=log, cwd="/", **_as_account(self.account),
        )
        wait_until(self._accepts_connections, timeout=30, what=f"PostgreSQL on port {self.port}")

    def _accepts_connections(self) -> bool:
        if self.process and self.process.poll() is not None:
            raise RuntimeError(f"postgres exited with {self.process.returncode}; see {self.base / 'postgres.log'}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        import psycopg2

        try:
            psycopg2.connect(self.url, connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=60)
        self.process = None

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def execute(self, sql: str) -> None:
        import psycopg2

        connection = psycopg2.connect(self.url, connect_timeout=5)
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql)
        finally:
            connection.close()


class RedisServer:
    """A private Redis on a TCP port of 127.0.0.1, keeping nothing on disk."""

    DATABASES = 1000

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.base / "redis.log", "ab")
        self.process = subprocess.Popen(
            [
                str(find_redis_server()), "--bind", "127.0.0.1", "--port", str(self.port),
                "--save", "", "--appendonly", "no", "--databases", str(self.DATABASES),
                "--dir", str(self.base),
            ],
            stdout=log, stderr=log, cwd=str(self.base),
        )
        wait_until(self._answers, timeout=20, what=f"Redis on port {self.port}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def url_for(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


class SupervisedStack:
    """The real ``conf/supervisord.conf`` under a real supervisord, in a private state folder."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = {**os.environ, **env, "AGENTMGR_HOME": str(home)}
        self.process: subprocess.Popen | None = None
        self.output = home / "launch.out"

    @property
    def socket_path(self) -> Path:
        return self.home / "run" / "supervisor.sock"

    def start(self, *, via_launcher: bool = True) -> None:
        """Start as `make run` does (``services.launch``), or plain supervisord."""
        self.home.mkdir(parents=True, exist_ok=True)
        for folder in ("log", "run", "supervisor.d"):
            (self.home / folder).mkdir(exist_ok=True)
        if via_launcher:
            argv = [sys.executable, "-m", "services.launch"]
        else:
            argv = [str(VENV_BIN / "supervisord"), "-n", "-c", str(SUPERVISORD_CONF)]
        self.process = subprocess.Popen(
            argv, env=self.env, cwd=PROJECT_ROOT, stdout=open(self.output, "ab"), stderr=subprocess.STDOUT
        )
        wait_until(self._rpc_ready, timeout=60, what="supervisord's control socket")

    def _rpc_ready(self) -> bool:
        if self.process and self.process.poll() is not None:
            raise RuntimeError(f"supervisord exited with {self.process.returncode}: {self.output.read_text()[-3000:]}")
        if not self.socket_path.exists():
            return False
        try:
            self.rpc().supervisor.getState()
        except OSError:
            return False
        return True

    def rpc(self) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport)

    def info(self, program: str) -> dict[str, Any]:
        return self.rpc().supervisor.getProcessInfo(program)

    def wait_state(self, program: str, state: str, *, timeout: float = 60) -> dict[str, Any]:
        """Wait until ``program`` is in ``state`` (RUNNING, EXITED, FATAL, …) and return its info."""
        return wait_until(
            lambda: (info := self.info(program))["statename"] == state and info,
            timeout=timeout,
            interval=0.2,
            what=f"{program} to be {state} (now {self.info(program)['statename']})",
        )

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        """Run the real supervisorctl from the checkout's root, as the README shows."""
        return subprocess.run(
            [str(VENV_BIN / "supervisorctl"), "-c", "conf/supervisord.conf", *args],
            env=self.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
        )

    def log_lines(self, program: str) -> list[str]:
        path = self.home / "log" / f"{program}.log"
        return path.read_text().splitlines() if path.exists() else []

    def log_records(self, program: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_lines(program)]

    def stop(self, *, timeout: float = 120) -> float:
        """Send SIGTERM to supervisord and return the seconds it took to exit."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        return time.monotonic() - started


@contextlib.contextmanager
def supervised(home: Path, env: dict[str, str], **start: Any) -> Iterator[SupervisedStack]:
    stack = SupervisedStack(home, env)
    try:
        stack.start(**start)
        yield stack
    finally:
        stack.stop()


def run_program(module: str, env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m module`` with ``env`` added to ours and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, **env}, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    """Parse every line of ``text`` as JSON; fails on the first line that is not."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def start_updater(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start ``python -m services.updater`` with ``env`` and wait until it works its queue."""
    process = subprocess.Popen(
        [sys.executable, "-m", "services.updater"], env={**os.environ, **env}, cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"),
    )
    wait_until(
        lambda: process.poll() is None and b"listening: queue updates" in log_path.read_bytes(),
        timeout=60, what=f"the updater to listen (log: {log_path})",
    )
    return process


def stop_process(process: subprocess.Popen, *, timeout: float = 60) -> int:
    """Send SIGTERM and wait for the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(timeout=timeout)
