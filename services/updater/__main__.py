import os
import shutil
import sys

from services.core.errors import SettingsError
from services.core.settings import Settings


def _prepare_metrics_folder() -> None:
    """Give this updater a folder for prometheus_client's multiprocess mode.

    RQ runs each job in a forked work horse, so job metrics are written to
    per-process files that the worker's endpoint adds up. The folder must be
    set before prometheus_client is imported. Folders of updaters that no
    longer run are removed.
    """
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    try:
        root = Settings.from_env().home / "metrics"
    except SettingsError:
        return  # run_program reports the invalid setting
    for old in root.glob("updater-*"):
        pid = old.name.removeprefix("updater-")
        if not pid.isdigit() or not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(old, ignore_errors=True)
    folder = root / f"updater-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


_prepare_metrics_folder()

from services.updater.main import main  # noqa: E402 - after the metrics folder is set

sys.exit(main())
