"""Entry-point wrapper shared by the manager's programs.

``run_program`` configures JSON logging, loads settings, runs the program and
maps the typed errors of ``errors.py`` to exit codes. It is the only place
that turns an exception into an exit status, and it flushes the log before the
process exits so the final error line is never lost.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from services.core import defaults
from services.core.errors import AgentManagerError, ExitCode, exit_code_for
from services.core.logs import configure_logging, flush_logs
from services.core.settings import LOG_LEVELS, Settings

logger = logging.getLogger("agentmgr.program")

INTERRUPTED_EXIT_CODE = 130
"""Exit status after SIGINT, as shells report it (128 + 2)."""


def run_program(service: str, main: Callable[[Settings], int | None]) -> int:
    """Run ``main(settings)`` as the program ``service`` and return its exit status."""
    level = os.environ.get("AGENTMGR_LOG_LEVEL", defaults.DEFAULT_LOG_LEVEL).strip().upper()
    configure_logging(service, level if level in LOG_LEVELS else defaults.DEFAULT_LOG_LEVEL)
    try:
        settings = Settings.from_env()
        logging.getLogger().setLevel(settings.log_level)
        logger.info("starting: %s", service, extra={"home": str(settings.home)})
        status = main(settings)
        status = int(ExitCode.OK) if status is None else status
        logger.info("exiting: %s (status %d)", service, status, extra={"exit_code": status})
        return status
    except AgentManagerError as error:
        status = exit_code_for(error)
        fields = {"exit_code": status, "error": str(error), "error_type": type(error).__name__}
        for name in ("cause", "migration_id", "variable", "missing"):
            if hasattr(error, name):
                fields[name] = getattr(error, name)
        logger.error("failed: %s (%s)", service, error, extra=fields)
        return status
    except KeyboardInterrupt:
        logger.warning("stopped: %s (interrupted)", service, extra={"exit_code": INTERRUPTED_EXIT_CODE})
        return INTERRUPTED_EXIT_CODE
    except Exception as error:
        logger.exception(
            "failed: %s (unexpected error)", service, extra={"exit_code": int(ExitCode.FAILURE), "error": str(error)}
        )
        return int(ExitCode.FAILURE)
    finally:
        flush_logs()
