"""Read every ``AGENTMGR_`` setting from the environment into one typed object.

Each setting's default and meaning live in ``defaults.py``. ``Settings.from_env``
validates every value and raises ``SettingsError`` naming the variable and the
expected form, so a program stops at start instead of failing later.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pwd
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit

from services.core import defaults
from services.core.errors import SettingsError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Validated settings shared by all programs of the manager."""

    home: Path
    """State folder: data, logs, TLS files and the supervisord socket."""
    database_url_setting: str
    """AGENTMGR_DATABASE_URL as given; empty selects the private cluster."""
    redis_url_setting: str
    """AGENTMGR_REDIS_URL as given; empty selects the private server."""
    grpc_address: str
    grpc_host: str
    grpc_port: int
    grpc_reuse_port: bool
    grpc_shutdown_grace_seconds: float
    grpc_max_message_bytes: int
    tls_cert_file: Path | None
    tls_key_file: Path | None
    tls_ca_file: Path | None
    tls_server_names: tuple[str, ...]
    log_level: str
    db_wait_seconds: float
    migrate_lock_timeout_seconds: float
    updater_job_timeout_seconds: float
    embedded_user: str
    offline_after_seconds: float
    """Seconds without a sign of life after which an agent is shown offline."""
    command_output_max_bytes: int
    """Maximum bytes of a command's stdout, and separately of its stderr, that are stored."""
    heartbeat_interval_seconds: float
    liveness_flush_seconds: float
    grpc_keepalive_time_seconds: float
    grpc_keepalive_timeout_seconds: float
    agent_auth_cache_seconds: float
    agent_auth_cache_size: int
    register_failure_limit: int
    register_failure_window_seconds: float
    command_wait_max_seconds: float
    command_expires_seconds: float
    gateway_db_connections: int
    gateway_max_downloads: int
    gateway_metrics_address: str
    updater_metrics_address: str
    updates_upstream: str
    """Folder path or https:// URL of the release index; empty when there is none."""
    updates_fetch_interval_seconds: float
    updates_trusted_keys_file: Path | None
    """AGENTMGR_UPDATES_TRUSTED_KEYS_FILE as given; None selects the file under the state folder."""
    updates_free_space_margin_bytes: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``).

        Raises:
            SettingsError: a variable has a value of the wrong form.
        """
        env = _Reader(os.environ if environ is None else environ)
        host, port = env.address("AGENTMGR_GRPC_ADDRESS", defaults.DEFAULT_GRPC_ADDRESS)
        tls_files = [
            env.optional_path("AGENTMGR_TLS_CERT_FILE"),
            env.optional_path("AGENTMGR_TLS_KEY_FILE"),
            env.optional_path("AGENTMGR_TLS_CA_FILE"),
        ]
        if any(tls_files) and not all(tls_files):
            raise SettingsError(
                "AGENTMGR_TLS_CERT_FILE",
                str(tls_files[0] or ""),
                "AGENTMGR_TLS_CERT_FILE, AGENTMGR_TLS_KEY_FILE and AGENTMGR_TLS_CA_FILE "
                "set together, or none of them",
            )
        return cls(
            home=env.path("AGENTMGR_HOME", defaults.DEFAULT_HOME),
            database_url_setting=env.url(
                "AGENTMGR_DATABASE_URL", ("postgresql", "postgres"), "postgresql://USER@HOST:PORT/DB"
            ),
            redis_url_setting=env.url(
                "AGENTMGR_REDIS_URL", ("redis", "rediss", "unix"), "redis://HOST:PORT/DB"
            ),
            grpc_address=f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
            grpc_host=host,
            grpc_port=port,
            grpc_reuse_port=env.boolean("AGENTMGR_GRPC_REUSE_PORT", defaults.DEFAULT_GRPC_REUSE_PORT),
            grpc_shutdown_grace_seconds=env.number(
                "AGENTMGR_GRPC_SHUTDOWN_GRACE_SECONDS", defaults.DEFAULT_GRPC_SHUTDOWN_GRACE_SECONDS
            ),
            grpc_max_message_bytes=int(
                env.number("AGENTMGR_GRPC_MAX_MESSAGE_BYTES", defaults.DEFAULT_GRPC_MAX_MESSAGE_BYTES, minimum=1024)
            ),
            tls_cert_file=tls_files[0],
            tls_key_file=tls_files[1],
            tls_ca_file=tls_files[2],
            tls_server_names=env.names("AGENTMGR_TLS_SERVER_NAMES", defaults.DEFAULT_TLS_SERVER_NAMES),
            log_level=env.choice("AGENTMGR_LOG_LEVEL", defaults.DEFAULT_LOG_LEVEL, LOG_LEVELS),
            db_wait_seconds=env.number("AGENTMGR_DB_WAIT_SECONDS", defaults.DEFAULT_DB_WAIT_SECONDS),
            migrate_lock_timeout_seconds=env.number(
                "AGENTMGR_MIGRATE_LOCK_TIMEOUT_SECONDS", defaults.DEFAULT_MIGRATE_LOCK_TIMEOUT_SECONDS
            ),
            updater_job_timeout_seconds=env.number(
                "AGENTMGR_UPDATER_JOB_TIMEOUT_SECONDS", defaults.DEFAULT_UPDATER_JOB_TIMEOUT_SECONDS, minimum=1
            ),
            embedded_user=env.user("AGENTMGR_EMBEDDED_USER"),
            offline_after_seconds=env.number(
                "AGENTMGR_OFFLINE_AFTER_SECONDS", defaults.DEFAULT_OFFLINE_AFTER_SECONDS, minimum=1
            ),
            command_output_max_bytes=int(
                env.number(
                    "AGENTMGR_COMMAND_OUTPUT_MAX_BYTES", defaults.DEFAULT_COMMAND_OUTPUT_MAX_BYTES, minimum=1
                )
            ),
            heartbeat_interval_seconds=env.number(
                "AGENTMGR_HEARTBEAT_INTERVAL_SECONDS", defaults.DEFAULT_HEARTBEAT_INTERVAL_SECONDS, minimum=0.1
            ),
            liveness_flush_seconds=env.number(
                "AGENTMGR_LIVENESS_FLUSH_SECONDS", defaults.DEFAULT_LIVENESS_FLUSH_SECONDS, minimum=0.1
            ),
            grpc_keepalive_time_seconds=env.number(
                "AGENTMGR_GRPC_KEEPALIVE_TIME_SECONDS", defaults.DEFAULT_GRPC_KEEPALIVE_TIME_SECONDS, minimum=1
            ),
            grpc_keepalive_timeout_seconds=env.number(
                "AGENTMGR_GRPC_KEEPALIVE_TIMEOUT_SECONDS", defaults.DEFAULT_GRPC_KEEPALIVE_TIMEOUT_SECONDS, minimum=1
            ),
            agent_auth_cache_seconds=env.number(
                "AGENTMGR_AGENT_AUTH_CACHE_SECONDS", defaults.DEFAULT_AGENT_AUTH_CACHE_SECONDS
            ),
            agent_auth_cache_size=int(
                env.number("AGENTMGR_AGENT_AUTH_CACHE_SIZE", defaults.DEFAULT_AGENT_AUTH_CACHE_SIZE, minimum=1)
            ),
            register_failure_limit=int(
                env.number("AGENTMGR_REGISTER_FAILURE_LIMIT", defaults.DEFAULT_REGISTER_FAILURE_LIMIT, minimum=1)
            ),
            register_failure_window_seconds=env.number(
                "AGENTMGR_REGISTER_FAILURE_WINDOW_SECONDS", defaults.DEFAULT_REGISTER_FAILURE_WINDOW_SECONDS, minimum=1
            ),
            command_wait_max_seconds=env.number(
                "AGENTMGR_COMMAND_WAIT_MAX_SECONDS", defaults.DEFAULT_COMMAND_WAIT_MAX_SECONDS
            ),
            command_expires_seconds=env.number(
                "AGENTMGR_COMMAND_EXPIRES_SECONDS", defaults.DEFAULT_COMMAND_EXPIRES_SECONDS, minimum=1
            ),
            gateway_db_connections=int(
                env.number("AGENTMGR_GATEWAY_DB_CONNECTIONS", defaults.DEFAULT_GATEWAY_DB_CONNECTIONS, minimum=1)
            ),
            gateway_max_downloads=int(
                env.number("AGENTMGR_GATEWAY_MAX_DOWNLOADS", defaults.DEFAULT_GATEWAY_MAX_DOWNLOADS, minimum=1)
            ),
            gateway_metrics_address=env.optional_address(
                "AGENTMGR_GATEWAY_METRICS_ADDRESS", defaults.DEFAULT_GATEWAY_METRICS_ADDRESS
            ),
            updater_metrics_address=env.optional_address(
                "AGENTMGR_UPDATER_METRICS_ADDRESS", defaults.DEFAULT_UPDATER_METRICS_ADDRESS
            ),
            updates_upstream=env.upstream("AGENTMGR_UPDATES_UPSTREAM"),
            updates_fetch_interval_seconds=env.number(
                "AGENTMGR_UPDATES_FETCH_INTERVAL_SECONDS", defaults.DEFAULT_UPDATES_FETCH_INTERVAL_SECONDS, minimum=10
            ),
            updates_trusted_keys_file=env.optional_path("AGENTMGR_UPDATES_TRUSTED_KEYS_FILE"),
            updates_free_space_margin_bytes=int(
                env.number("AGENTMGR_UPDATES_FREE_SPACE_MARGIN_BYTES", defaults.DEFAULT_UPDATES_FREE_SPACE_MARGIN_BYTES)
            ),
        )

    # Paths under the state folder.

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    @property
    def run_dir(self) -> Path:
        """Sockets and pid files."""
        return self.home / "run"

    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"

    @property
    def supervisor_include_dir(self) -> Path:
        """Extra supervisord program files, such as the private database servers."""
        return self.home / "supervisor.d"

    @property
    def postgres_data_dir(self) -> Path:
        return self.home / "postgres" / "data"

    @property
    def postgres_socket_dir(self) -> Path:
        return self.home / "postgres" / "run"

    @property
    def redis_dir(self) -> Path:
        return self.home / "redis"

    @property
    def redis_socket_path(self) -> Path:
        return self.redis_dir / "redis.sock"

    @property
    def release_store_dir(self) -> Path:
        """Content-addressed release artifacts, one file per SHA-256."""
        return self.home / "releases"

    @property
    def trusted_keys_file(self) -> Path:
        """File of the publisher public keys whose signatures the manager accepts."""
        return self.updates_trusted_keys_file or self.home / "updates" / "trusted_publishers.pub"

    # Where the data lives.

    @property
    def embedded_database(self) -> bool:
        """True when the services use the private PostgreSQL cluster."""
        return not self.database_url_setting

    @property
    def embedded_redis(self) -> bool:
        """True when the services use the private Redis server."""
        return not self.redis_url_setting

    @property
    def database_url(self) -> str:
        """URL of the PostgreSQL database that the services use."""
        if self.database_url_setting:
            return self.database_url_setting
        name = defaults.EMBEDDED_DATABASE_NAME
        socket_dir = quote(str(self.postgres_socket_dir), safe="")
        return (
            f"postgresql://{name}@/{name}?host={socket_dir}"
            f"&port={defaults.EMBEDDED_POSTGRES_PORT}"
        )

    @property
    def redis_url(self) -> str:
        """URL of the Redis server that the services use."""
        if self.redis_url_setting:
            return self.redis_url_setting
        return f"unix://{self.redis_socket_path}?db=0"


class _Reader:
    """Parse environment values; each method raises ``SettingsError`` on a bad value."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def raw(self, name: str, default: str = "") -> str:
        return self.environ.get(name, default).strip()

    def path(self, name: str, default: Path) -> Path:
        value = self.raw(name)
        if not value:
            return default
        path = Path(value)
        if not path.is_absolute():
            raise SettingsError(name, value, "an absolute path")
        return path

    def optional_path(self, name: str) -> Path | None:
        value = self.raw(name)
        if not value:
            return None
        return self.path(name, Path(value))

    def number(self, name: str, default: float, *, minimum: float = 0) -> float:
        value = self.raw(name)
        if not value:
            return float(default)
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(name, value, f"a number >= {minimum:g}") from None
        if number < minimum or number != number or number == float("inf"):
            raise SettingsError(name, value, f"a number >= {minimum:g}")
        return number

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name).lower()
        if not value:
            return default
        if value in TRUE_WORDS:
            return True
        if value in FALSE_WORDS:
            return False
        raise SettingsError(name, value, f"one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name, default).upper()
        if value not in choices:
            raise SettingsError(name, value, f"one of {', '.join(choices)}")
        return value

    def url(self, name: str, schemes: tuple[str, ...], example: str) -> str:
        value = self.raw(name)
        if not value:
            return ""
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise SettingsError(name, "<unparsable URL>", f"a URL like {example}") from None
        if parts.scheme not in schemes:
            # The URL may carry a password, so only its scheme is echoed.
            raise SettingsError(name, f"{parts.scheme}://…", f"a URL like {example}")
        return value

    def address(self, name: str, default: str) -> tuple[str, int]:
        value = self.raw(name, default)
        expected = "HOST:PORT with a port from 1 to 65535, e.g. 0.0.0.0:50051 or [::]:50051"
        host, separator, port_text = value.rpartition(":")
        if not separator or not host or not port_text.isdigit():
            raise SettingsError(name, value, expected)
        port = int(port_text)
        if not 0 < port < 65536:
            raise SettingsError(name, value, expected)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise SettingsError(name, value, expected) from None
        elif ":" in host:
            raise SettingsError(name, value, expected + " (IPv6 addresses go in brackets)")
        return host, port

    def optional_address(self, name: str, default: str) -> str:
        """Return HOST:PORT, or "" when the variable is set to an empty value (turned off)."""
        if name in self.environ and not self.environ[name].strip():
            return ""
        host, port = self.address(name, default)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def upstream(self, name: str) -> str:
        value = self.raw(name)
        if not value:
            return ""
        if value.startswith("https://") or value.startswith("/"):
            return value.rstrip("/")
        raise SettingsError(name, value, "an absolute folder path or an https:// URL")

    def names(self, name: str, default: str) -> tuple[str, ...]:
        value = self.raw(name, default)
        names = tuple(part.strip() for part in value.split(",") if part.strip())
        for part in names:
            if not all(c.isalnum() or c in ".-:*" for c in part):
                raise SettingsError(name, value, "comma-separated DNS names or IP addresses")
        return names

    def user(self, name: str) -> str:
        value = self.raw(name)
        if value:
            try:
                pwd.getpwnam(value)
            except KeyError:
                raise SettingsError(name, value, "an existing user account") from None
            return value
        for candidate in ("postgres", "nobody"):
            try:
                pwd.getpwnam(candidate)
                return candidate
            except KeyError:
                continue
        return ""

