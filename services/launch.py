"""Start the whole manager under supervisord in the foreground (what `make run` runs).

Prepares the state folder and, when no database or Redis URL is configured,
the private servers; then replaces this process with
``supervisord -n -c conf/supervisord.conf``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from services.core import defaults
from services.core.embedded import EmbeddedServers
from services.core.program import run_program
from services.core.settings import Settings

logger = logging.getLogger("agentmgr.launch")

SERVICE = "launch"
SUPERVISORD_CONF = defaults.PROJECT_ROOT / "conf" / "supervisord.conf"


def prepare_home(settings: Settings) -> None:
    """Create the state folder and its log, run and program-file folders."""
    settings.home.mkdir(parents=True, exist_ok=True)
    # Other accounts (the private database's) must be able to enter it.
    settings.home.chmod(0o755)
    for folder in (settings.log_dir, settings.run_dir, settings.supervisor_include_dir):
        folder.mkdir(exist_ok=True)
    settings.run_dir.chmod(0o700)


def launch(settings: Settings) -> int:
    prepare_home(settings)
    include = EmbeddedServers(settings).prepare()
    supervisord = Path(sys.executable).with_name("supervisord")
    logger.info(
        "starting: supervisord",
        extra={
            "config": str(SUPERVISORD_CONF),
            "embedded_programs": str(include) if include else "",
            "embedded_database": settings.embedded_database,
            "embedded_redis": settings.embedded_redis,
        },
    )
    # supervisord.conf expands %(ENV_AGENTMGR_HOME)s, so the resolved value is exported.
    os.environ["AGENTMGR_HOME"] = str(settings.home)
    os.execv(supervisord, [str(supervisord), "-n", "-c", str(SUPERVISORD_CONF)])


def main() -> int:
    return run_program(SERVICE, launch)


if __name__ == "__main__":
    sys.exit(main())
