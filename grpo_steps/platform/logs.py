"""How every process of the pipeline logs: the `grpo` command and each rank of a launched stage alike."""

from __future__ import annotations

import logging
import os
from typing import TextIO

# Libraries whose INFO lines are noise on a terminal (MLflow's database set-up and system-metrics monitor,
# accelerate's per-rank notes): WARNING and up, unless `verbose`.
QUIET_LIBRARIES = ("accelerate", "mlflow")


def setup_logging(verbose: bool = False, stream: TextIO | None = None) -> None:
    """One line per record, `HH:MM:SS LEVEL logger: message`, at INFO (DEBUG when `verbose`), on `stream`
    (default: stderr); httpx quiet, not one line per Prefect API request; the libraries of QUIET_LIBRARIES at
    WARNING unless `verbose`."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=stream)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its loggers' level on import
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(logging.WARNING)
