"""How every process of the pipeline logs: the `grpo` command, each rank of a launched stage, a deployment's flow.

The terminal gets our lines, Prefect's and the libraries' warnings; the run's log file gets every record at the
same level, the libraries' INFO lines and the traceback behind a user error included (what an on-call engineer
reads after a failed nightly run). The ranks of a launched stage append to the log file of the command that
launched them. Lines printed with print() (tables, progress bars) are the terminal's alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

# Libraries whose INFO lines are noise on a terminal (MLflow's database set-up and system-metrics monitor, its
# migrations, accelerate's per-rank notes): WARNING and up there unless `verbose`; all of it in the log file.
QUIET_LIBRARIES = ("accelerate", "mlflow", "alembic")
LOG_DIR_ENV = "GRPO_LOG_DIR"  # where `grpo` writes its log files (default: logs/ in the working directory)
LOG_FILE_ENV = "GRPO_LOG_FILE"  # the log file of this run, passed on to the ranks it launches
KEEP_LOG_FILES = 50  # the newest log files kept in the log folder (those of live processes on this host always)
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


class RunFileHandler(logging.FileHandler):
    """The handler of the run's log file (one per process). A write that fails (a full disk, the folder gone)
    says so once on stderr and ends the file: the run goes on with the terminal alone."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        with contextlib.suppress(Exception):
            sys.stderr.write(f"log file {self.baseFilename}: cannot write ({error}); logging to the terminal only\n")
        _detach(self)


def _detach(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    _trace.removeHandler(handler)
    with contextlib.suppress(Exception):
        handler.close()


def setup_logging(verbose: bool = False, stream: TextIO | None = None, log_file: Path | str | None = None,
                  prefix: str = "") -> None:
    """One line per record, `HH:MM:SS LEVEL logger: message`, at INFO (DEBUG when `verbose`), on `stream`
    (default: stderr): httpx quiet, not one line per Prefect API request; the libraries of QUIET_LIBRARIES at
    WARNING unless `verbose`; Python's warnings as records. With `log_file`, every record also goes there
    (appended, `prefix` before each line, dated), the libraries' INFO lines included."""
    level = logging.DEBUG if verbose else logging.INFO
    # MLflow's own handler (configured on its import) would print its INFO lines; ours sorts them
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: a host that configured logging (pytest, Prefect) keeps its own
        terminal = logging.StreamHandler(stream)
        terminal.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(terminal)
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, _Quiet)]:
            handler.removeFilter(old)
        if not verbose and not isinstance(handler, RunFileHandler):
            handler.addFilter(_Quiet())
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    for name in QUIET_LIBRARIES:  # MLflow imported before us: its own handler and level give way to ours
        library = logging.getLogger(name)
        if not library.propagate:
            library.handlers, library.propagate = [], True
            library.setLevel(logging.NOTSET)
    end_log_file()
    if log_file is not None:
        to_file = RunFileHandler(log_file, mode="a", encoding="utf-8", errors="backslashreplace", delay=True)
        to_file.setFormatter(logging.Formatter(prefix + _FORMAT.replace("%(asctime)s", "%(asctime)s.%(msecs)03d"),
                                               datefmt="%Y-%m-%d %H:%M:%S"))
        root.addHandler(to_file)
        _trace.addHandler(to_file)


def end_log_file() -> None:
    """Closes the log file of this process, if any."""
    for handler in [h for h in logging.getLogger().handlers + _trace.handlers if isinstance(h, RunFileHandler)]:
        _detach(handler)


@contextlib.contextmanager
def run_log(command: str, verbose: bool = False, export: bool = True) -> Iterator[Path | None]:
    """Logging for one `grpo <command>` (or a deployment's flow run) and its new log file (None when none could be
    made); with `export`, the ranks it launches append to the file. Undone on exit (a command called in-process)."""
    previous = logging.getLogger().level
    log_file = new_log_file(command)
    setup_logging(verbose, log_file=log_file)
    if log_file is not None and export:
        os.environ[LOG_FILE_ENV] = str(log_file.resolve())
    try:
        yield log_file
    finally:
        end_log_file()
        if export:
            os.environ.pop(LOG_FILE_ENV, None)
        logging.getLogger().setLevel(previous)


def _alive_here(path: Path) -> bool:
    """Whether the log file `path` (grpo-<command>-<time>-<host>-<pid>.log) is a live process's of this host."""
    *_, host, pid = path.stem.rsplit("-", 2)
    if host != _host() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def _prune(folder: Path) -> None:
    """The oldest log files beyond KEEP_LOG_FILES - 1 removed, but never a live process's of this host."""
    dated = []
    for path in folder.glob("grpo-*.log"):
        with contextlib.suppress(OSError):  # another command pruned it meanwhile
            dated.append((path.stat().st_mtime, path))
    dated.sort()
    for _, path in dated[:max(0, len(dated) - KEEP_LOG_FILES + 1)]:
        if not _alive_here(path):
            with contextlib.suppress(OSError):
                path.unlink()


def new_log_file(command: str) -> Path | None:
    """A new log file for `grpo <command>` in GRPO_LOG_DIR (default logs/), named by time, host and pid; None (and
    no file) when GRPO_LOG_DIR is set empty or the folder cannot be written."""
    raw = os.environ.get(LOG_DIR_ENV)
    if raw == "":
        return None
    folder = Path(raw or "logs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    _prune(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(100):
        path = folder / f"grpo-{command}-{stamp}{'' if not attempt else f'.{attempt}'}-{_host()}-{os.getpid()}.log"
        try:
            path.open("x").close()
        except FileExistsError:
            continue
        except OSError:
            return None
        return path
    return None


def trace_to_file() -> None:
    """The traceback being handled, to the log file alone (the terminal shows the error's one line)."""
    _trace.error("traceback", exc_info=True)
