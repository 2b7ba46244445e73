"""The run's log file: the terminal keeps our lines and the libraries' warnings, the file gets everything, the
traceback behind a user error's one line included, and the ranks of a launched stage append to it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

from tests.conftest import ROOT

SCRIPT = textwrap.dedent("""
    import logging, sys
    from grpo_steps.platform.logs import setup_logging
    setup_logging(log_file=sys.argv[1], prefix=sys.argv[2])
    import mlflow  # after setup_logging, as in `grpo`: its INFO lines reach our handlers
    logging.getLogger("grpo.stage").info("stage line")
    logging.getLogger("mlflow.store.db.utils").info("creating initial MLflow database tables")
    logging.getLogger("alembic.runtime.migration").info("running upgrade")
    logging.getLogger("accelerate.state").warning("an accelerate warning")
""")


def test_library_info_lines_go_to_the_file_alone(tmp_path):
    log_file = tmp_path / "run.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log_file), "[rank 1] "], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "stage line" in proc.stderr and "an accelerate warning" in proc.stderr
    assert "database tables" not in proc.stderr and "running upgrade" not in proc.stderr
    lines = log_file.read_text().splitlines()
    assert len(lines) == 4 and all(line.startswith("[rank 1] 20") for line in lines), lines
    assert "INFO mlflow.store.db.utils: creating initial MLflow database tables" in lines[1]


def test_a_user_error_is_one_line_and_its_traceback_is_in_the_log_file(workdir, capsys, monkeypatch):
    from grpo_steps.cli import main

    monkeypatch.delenv("GRPO_LOG_DIR", raising=False)

    before = logging.getLogger().level
    assert main(["grpo"]) == 2
    err = capsys.readouterr().err.strip()
    (log_file,) = (workdir / "logs").glob("grpo-grpo-*.log")
    assert err.startswith("grpo grpo: error:") and err.endswith(f"(details: {log_file.relative_to(workdir)})")
    assert "Traceback" not in err
    text = log_file.read_text()
    assert "Traceback (most recent call last)" in text and "models/sft" in text
    assert "GRPO_LOG_FILE" not in os.environ and logging.getLogger().level == before  # undone on return


def test_the_log_folder_keeps_the_newest_files(tmp_path, monkeypatch):
    from grpo_steps.platform import logs

    monkeypatch.setenv(logs.LOG_DIR_ENV, str(tmp_path))
    for i in range(logs.KEEP_LOG_FILES + 5):
        old = tmp_path / f"grpo-run-{i:03d}.log"
        old.touch()
        os.utime(old, (i, i))
    new = logs.new_log_file("run")
    kept = sorted(p.name for p in tmp_path.glob("grpo-*.log"))
    assert len(kept) == logs.KEEP_LOG_FILES and new.name in kept and "grpo-run-005.log" not in kept
    assert "grpo-run-006.log" in kept
    mine = tmp_path / f"grpo-serve-20000101-000000-{logs._host()}-{os.getpid()}.log"  # the oldest, but live
    mine.touch()
    os.utime(mine, (0, 0))
    logs.new_log_file("run")
    assert mine.exists() and "grpo-run-006.log" not in {p.name for p in tmp_path.glob("grpo-*.log")}
    monkeypatch.setenv(logs.LOG_DIR_ENV, "")
    assert logs.new_log_file("run") is None


def test_a_log_file_that_cannot_be_written_says_so_once_and_the_run_goes_on(tmp_path):
    script = ("import logging; from grpo_steps.platform.logs import setup_logging; "
              "setup_logging(log_file='/dev/full'); [logging.getLogger('grpo').info('line %d', i) for i in range(3)]")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("log file /dev/full: cannot write") == 1 and "Traceback" not in proc.stderr
    assert all(f"line {i}" in proc.stderr for i in range(3)), proc.stderr
