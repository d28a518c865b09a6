"""Default value of every ``AGENTMGR_`` setting, with its meaning and unit.

This module is the one place where defaults live. ``settings.py`` reads the
environment and falls back to these constants; docs and the README refer here.
"""

from pathlib import Path

# Root of the checkout (or of the install prefix), which holds conf/ and .venv/.
PROJECT_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_HOME = PROJECT_ROOT / "var"
"""AGENTMGR_HOME: state folder for data, logs, TLS files and the supervisord socket."""

DEFAULT_DATABASE_URL = ""
"""AGENTMGR_DATABASE_URL: PostgreSQL URL (postgresql://user:password@host:port/db).
Empty means the private cluster under $AGENTMGR_HOME/postgres, which `make run` supervises."""

DEFAULT_REDIS_URL = ""
"""AGENTMGR_REDIS_URL: Redis URL (redis://host:port/db or unix:///path?db=N).
Empty means the private server under $AGENTMGR_HOME/redis, which `make run` supervises."""

DEFAULT_GRPC_ADDRESS = "0.0.0.0:50051"
"""AGENTMGR_GRPC_ADDRESS: HOST:PORT the gateway listens on, for agents and operators."""

DEFAULT_GRPC_REUSE_PORT = False
"""AGENTMGR_GRPC_REUSE_PORT: let several gateway processes share the port (SO_REUSEPORT).
When false, a gateway whose port is taken exits with an error."""

DEFAULT_GRPC_SHUTDOWN_GRACE_SECONDS = 10.0
"""AGENTMGR_GRPC_SHUTDOWN_GRACE_SECONDS: time in-flight RPCs get to finish on shutdown."""

DEFAULT_GRPC_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""AGENTMGR_GRPC_MAX_MESSAGE_BYTES: largest message the gateway accepts or sends, in bytes."""

DEFAULT_TLS_CERT_FILE = ""
"""AGENTMGR_TLS_CERT_FILE: PEM server certificate chain. Empty means the one the gateway
creates under $AGENTMGR_HOME/tls/ on first start, signed by a private CA."""

DEFAULT_TLS_KEY_FILE = ""
"""AGENTMGR_TLS_KEY_FILE: PEM private key of the server certificate; set with the cert file."""

DEFAULT_TLS_CA_FILE = ""
"""AGENTMGR_TLS_CA_FILE: PEM CA certificate that agents pin; set with the cert file."""

DEFAULT_TLS_SERVER_NAMES = "localhost,127.0.0.1,::1"
"""AGENTMGR_TLS_SERVER_NAMES: comma-separated DNS names and IP addresses put in a generated
server certificate, besides this machine's hostname."""

DEFAULT_LOG_LEVEL = "INFO"
"""AGENTMGR_LOG_LEVEL: DEBUG, INFO, WARNING or ERROR."""

DEFAULT_DB_WAIT_SECONDS = 30.0
"""AGENTMGR_DB_WAIT_SECONDS: how long a service retries an unreachable database at start."""

DEFAULT_MIGRATE_LOCK_TIMEOUT_SECONDS = 120.0
"""AGENTMGR_MIGRATE_LOCK_TIMEOUT_SECONDS: how long a migrator waits for another one to finish."""

DEFAULT_UPDATER_JOB_TIMEOUT_SECONDS = 300.0
"""AGENTMGR_UPDATER_JOB_TIMEOUT_SECONDS: longest an update job may run before RQ kills it.
The updater's stopwaitsecs in conf/supervisord.conf must stay above this value."""

DEFAULT_EMBEDDED_USER = ""
"""AGENTMGR_EMBEDDED_USER: unprivileged account that runs the private PostgreSQL and Redis
when the manager runs as root. Empty means `postgres` where that account exists, else `nobody`."""

UPDATES_QUEUE = "updates"
"""Name of the RQ queue that holds update jobs; `rq info` shows it under this name."""

EMBEDDED_DATABASE_NAME = "agentmgr"
"""Database and role name inside the private PostgreSQL cluster."""

EMBEDDED_POSTGRES_PORT = 5432
"""Port number in the private cluster's socket file name; the cluster opens no TCP port."""

UNIX_SOCKET_PATH_MAX = 107
"""Longest Unix socket path Linux accepts (sun_path is 108 bytes with the NUL)."""
