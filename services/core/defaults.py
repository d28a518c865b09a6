"""Default value of every ``AGENTMGR_`` setting, with its meaning and unit.

This module is the one place where defaults live. ``settings.py`` reads the
environment and falls back to these constants; docs and the README refer here.
"""

from pathlib import Path

# Root of the checkout (or of the install prefix), which contains conf/ and .venv/.
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

DEFAULT_OFFLINE_AFTER_SECONDS = 90.0
"""AGENTMGR_OFFLINE_AFTER_SECONDS: an agent not seen for longer than this, in seconds,
is shown offline."""

DEFAULT_COMMAND_OUTPUT_MAX_BYTES = 1024 * 1024
"""AGENTMGR_COMMAND_OUTPUT_MAX_BYTES: maximum bytes of a command's stdout, and separately of its
stderr, that are stored; longer output is cut and flagged as truncated."""

DEFAULT_HEARTBEAT_INTERVAL_SECONDS = 15.0
"""AGENTMGR_HEARTBEAT_INTERVAL_SECONDS: time between two heartbeats of an agent, in seconds.
The gateway announces it at the start of each session; keep it well under the offline threshold."""

DEFAULT_LIVENESS_FLUSH_SECONDS = 5.0
"""AGENTMGR_LIVENESS_FLUSH_SECONDS: interval, in seconds, at which each gateway writes the
last-seen times collected in Redis to PostgreSQL in one batch."""

DEFAULT_GRPC_KEEPALIVE_TIME_SECONDS = 20.0
"""AGENTMGR_GRPC_KEEPALIVE_TIME_SECONDS: idle time, in seconds, after which the gateway pings
a connection to check that the peer is still there."""

DEFAULT_GRPC_KEEPALIVE_TIMEOUT_SECONDS = 10.0
"""AGENTMGR_GRPC_KEEPALIVE_TIMEOUT_SECONDS: time, in seconds, the gateway waits for a ping
acknowledgement before it closes the connection."""

DEFAULT_AGENT_AUTH_CACHE_SECONDS = 10.0
"""AGENTMGR_AGENT_AUTH_CACHE_SECONDS: time, in seconds, a gateway process reuses a verified
agent key without asking PostgreSQL again; 0 disables the cache. Revocations clear it at once."""

DEFAULT_AGENT_AUTH_CACHE_SIZE = 10000
"""AGENTMGR_AGENT_AUTH_CACHE_SIZE: maximum number of verified agent keys cached per gateway process."""

DEFAULT_REGISTER_FAILURE_LIMIT = 10
"""AGENTMGR_REGISTER_FAILURE_LIMIT: failed Register calls from one peer address within the
window after which further calls get RESOURCE_EXHAUSTED until the window ends."""

DEFAULT_REGISTER_FAILURE_WINDOW_SECONDS = 60.0
"""AGENTMGR_REGISTER_FAILURE_WINDOW_SECONDS: length of the Register failure window, in seconds."""

DEFAULT_COMMAND_WAIT_MAX_SECONDS = 60.0
"""AGENTMGR_COMMAND_WAIT_MAX_SECONDS: maximum time, in seconds, a RunCommand call waits for the
result before it returns the command as it is."""

DEFAULT_COMMAND_EXPIRES_SECONDS = 24 * 3600
"""AGENTMGR_COMMAND_EXPIRES_SECONDS: time, in seconds, after which an undelivered command
expires when the request does not set one."""

DEFAULT_GATEWAY_DB_CONNECTIONS = 10
"""AGENTMGR_GATEWAY_DB_CONNECTIONS: maximum PostgreSQL connections per gateway process."""

DEFAULT_GATEWAY_MAX_DOWNLOADS = 32
"""AGENTMGR_GATEWAY_MAX_DOWNLOADS: artifact downloads one gateway process serves at once; more
wait up to 10 s for a slot, then get RESOURCE_EXHAUSTED."""

DEFAULT_GATEWAY_METRICS_ADDRESS = "127.0.0.1:9151"
"""AGENTMGR_GATEWAY_METRICS_ADDRESS: HOST:PORT of the gateway's Prometheus endpoint; empty turns
it off. Several gateway processes each need their own port."""

DEFAULT_UPDATER_METRICS_ADDRESS = "127.0.0.1:9152"
"""AGENTMGR_UPDATER_METRICS_ADDRESS: HOST:PORT of the updater's Prometheus endpoint; empty turns it off."""

DEFAULT_UPDATES_UPSTREAM = ""
"""AGENTMGR_UPDATES_UPSTREAM: where the updater fetches releases: an absolute folder path or an
https:// URL, either holding index.json. Empty means no upstream (publish releases by hand)."""

DEFAULT_UPDATES_FETCH_INTERVAL_SECONDS = 3600.0
"""AGENTMGR_UPDATES_FETCH_INTERVAL_SECONDS: time between two scheduled upstream checks."""

DEFAULT_UPDATES_TRUSTED_KEYS_FILE = ""
"""AGENTMGR_UPDATES_TRUSTED_KEYS_FILE: file of trusted publisher public keys, one
`ed25519 BASE64` line each. Empty means $AGENTMGR_HOME/updates/trusted_publishers.pub."""

DEFAULT_UPDATES_FREE_SPACE_MARGIN_BYTES = 256 * 1024 * 1024
"""AGENTMGR_UPDATES_FREE_SPACE_MARGIN_BYTES: free disk space, in bytes, that must remain after
a release is stored; a release that would leave less is rejected."""

UPDATES_QUEUE = "updates"
"""Name of the RQ queue of update jobs; `rq info` shows it under this name."""

EMBEDDED_DATABASE_NAME = "agentmgr"
"""Database and role name inside the private PostgreSQL cluster."""

EMBEDDED_POSTGRES_PORT = 5432
"""Port number in the private cluster's socket file name; the cluster opens no TCP port."""

UNIX_SOCKET_PATH_MAX = 107
"""Longest Unix socket path Linux accepts (sun_path is 108 bytes with the NUL)."""
