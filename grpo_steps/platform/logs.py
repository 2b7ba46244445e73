"""How every process of the pipeline logs: the `grpo` command and each rank of a launched stage alike."""

from __future__ import annotations

import logging
from typing import TextIO


def setup_logging(verbose: bool = False, stream: TextIO | None = None) -> None:
    """One line per record, `HH:MM:SS LEVEL logger: message`, at INFO (DEBUG when `verbose`), on `stream`
    (default: stderr); httpx quiet, not one line per Prefect API request."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=stream)
    logging.getLogger("httpx").setLevel(logging.WARNING)
