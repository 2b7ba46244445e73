"""How every process of the pipeline logs: the `grpo` command and each rank of a launched stage alike.

The terminal gets our lines, Prefect's and the libraries' warnings; the run's log file gets everything at the same
level, the libraries' INFO lines and the traceback behind a user error included (what an on-call engineer reads
after a failed nightly run). The ranks of a launched stage append to the log file of the command that launched them.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TextIO

# Libraries whose INFO lines are noise on a terminal (MLflow's database set-up and system-metrics monitor, its
# migrations, accelerate's per-rank notes): WARNING and up there unless `verbose`; all of it in the log file.
QUIET_LIBRARIES = ("accelerate", "mlflow", "alembic")
LOG_DIR_ENV = "GRPO_LOG_DIR"  # where `grpo` writes its log files (default: logs/ in the working directory)
LOG_FILE_ENV = "GRPO_LOG_FILE"  # the log file of this run, passed on to the processes it launches
KEEP_LOG_FILES = 50  # the newest log files kept in the log folder
TRACE_LOGGER = "grpo.trace"  # the file alone: tracebacks behind the one-line errors of the terminal
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_trace = logging.getLogger(TRACE_LOGGER)
_trace.propagate = False  # never the terminal
_trace.addHandler(logging.NullHandler())  # nor, without a log file, Python's last-resort handler


class _Quiet(logging.Filter):
    """Drops the QUIET_LIBRARIES' records below WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        top = record.name.split(".", 1)[0]
        return record.levelno >= logging.WARNING or top not in QUIET_LIBRARIES


class _RunFile(logging.FileHandler):
    """The handler of the run's log file (one per process)."""


def setup_logging(verbose: bool = False, stream: TextIO | None = None, log_file: Path | str | None = None,
                  prefix: str = "") -> None:
    """One line per record, `HH:MM:SS LEVEL logger: message`, at INFO (DEBUG when `verbose`), on `stream`
    (default: stderr): httpx quiet, not one line per Prefect API request; the libraries of QUIET_LIBRARIES at
    WARNING unless `verbose`. With `log_file`, every record also goes there (appended, `prefix` before each line,
    dated), the libraries' INFO lines included."""
    level = logging.DEBUG if verbose else logging.INFO
    # MLflow's own handler (configured on its import) would print its INFO lines; ours sorts them
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: a host that configured logging (pytest) keeps its handlers
        terminal = logging.StreamHandler(stream)
        terminal.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(terminal)
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, _Quiet)]:
            handler.removeFilter(old)
        if not verbose and not isinstance(handler, _RunFile):
            handler.addFilter(_Quiet())
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in QUIET_LIBRARIES:  # MLflow imported before us: its own handler and level give way to ours
        library = logging.getLogger(name)
        if not library.propagate:
            library.handlers, library.propagate = [], True
            library.setLevel(logging.NOTSET)
    end_log_file()
    if log_file is not None:
        to_file = _RunFile(log_file, mode="a", encoding="utf-8", delay=True)
        to_file.setFormatter(logging.Formatter(prefix + _FORMAT.replace("%(asctime)s", "%(asctime)s.%(msecs)03d"),
                                               datefmt="%Y-%m-%d %H:%M:%S"))
        root.addHandler(to_file)
        _trace.addHandler(to_file)


def end_log_file() -> None:
    """Closes the log file of this process, if any (a `grpo` command called in-process returns)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers + _trace.handlers if isinstance(h, _RunFile)]:
        handler.close()
        root.removeHandler(handler)
        _trace.removeHandler(handler)


def new_log_file(command: str) -> Path | None:
    """A new log file for `grpo <command>` in GRPO_LOG_DIR (default logs/), the oldest beyond KEEP_LOG_FILES
    removed; None (and no file) when GRPO_LOG_DIR is set empty or the folder cannot be written."""
    raw = os.environ.get(LOG_DIR_ENV)
    if raw == "":
        return None
    folder = Path(raw or "logs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        older = sorted(folder.glob("grpo-*.log"), key=lambda p: p.stat().st_mtime)
        for old in older[:max(0, len(older) - KEEP_LOG_FILES + 1)]:
            old.unlink(missing_ok=True)
        path = folder / f"grpo-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.touch()
    except OSError:
        return None
    return path


def trace_to_file() -> None:
    """The traceback being handled, to the log file alone (the terminal shows the error's one line)."""
    _trace.error("traceback", exc_info=True)
