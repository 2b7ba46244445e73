"""`grpo serve`: the pipeline on a cron schedule through Prefect's flow.serve (no work pool, no worker).

--dry-run validates and prints without blocking; the blocking call itself is checked with flow.serve stubbed.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import yaml

from grpo_steps.cli import main
from tests.conftest import ROOT


@pytest.fixture
def no_prefect_server(monkeypatch):
    """Settings without an API URL (Prefect reads its settings once per process, so not just the env)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def test_default_cron_matches_the_nightly_deployment():
    from flows.serve import DEFAULT_CRON, DEFAULT_TIMEZONE

    nightly = next(d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "nightly-retrain")
    (sched,) = nightly["schedules"]
    assert (DEFAULT_CRON, DEFAULT_TIMEZONE) == (sched["cron"], sched["timezone"]) == ("0 2 * * *", "UTC")


def test_plan_lists_next_runs_in_the_time_zone(workdir, no_prefect_server):
    from flows.serve import plan

    p = plan(cron="30 6 * * 1", timezone="Europe/Berlin", overrides=["grpo.steps=5"],
             now=datetime(2026, 1, 1, 12, tzinfo=UTC))
    # Monday 5 January 2026, 06:30 in Berlin (CET, UTC+1)
    assert [d.isoformat() for d in p.next_runs] == [
        "2026-01-05T06:30:00+01:00", "2026-01-12T06:30:00+01:00", "2026-01-19T06:30:00+01:00"]
    assert p.parameters == {"params_path": "params.yaml", "overrides": ["grpo.steps=5"]}
    assert p.api_url is None


def test_serve_dry_run_prints_the_schedule_and_exits(workdir, no_prefect_server, capsys):
    assert main(["serve", "--dry-run", "--set", "grpo.steps=5"]) == 0
    out = capsys.readouterr().out
    assert "cron '0 2 * * *' (UTC)" in out
    assert "next runs:   " in out and " 02:00 UTC" in out
    assert "'overrides': ['grpo.steps=5']" in out
    assert "dry run: nothing created" in out
    assert "not set (PREFECT_API_URL)" in out


@pytest.mark.parametrize("args, message", [
    (["--cron", "61 * * * *"], "invalid cron expression '61 * * * *'"),
    (["--cron", "every day"], "invalid cron expression"),
    (["--timezone", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
    (["--set", "grpo.num_generations=1"], "grpo.num_generations"),
])
def test_serve_rejects_bad_schedules_and_params(workdir, no_prefect_server, capsys, args, message):
    assert main(["serve", "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grpo serve: error:") and message in err


def test_serve_needs_a_prefect_server(workdir, no_prefect_server, capsys):
    assert main(["serve"]) == 2
    assert "needs a Prefect server" in capsys.readouterr().err


def test_serve_creates_a_cron_deployment_of_the_flow(workdir, no_prefect_server, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import pipeline

    seen = {}
    monkeypatch.setattr(type(pipeline.grpo_pipeline), "serve", lambda self, **kw: seen.update(kw, flow=self))
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # never contacted: stubbed
        assert main(["serve", "--cron", "15 3 * * *", "--timezone", "Europe/Paris", "--name", "nightly-local",
                     "--set", "grpo.steps=5"]) == 0
    assert seen["flow"] is pipeline.grpo_pipeline
    assert seen["name"] == "nightly-local" and seen["limit"] == 1
    (schedule,) = seen["schedules"]
    assert (schedule.cron, schedule.timezone) == ("15 3 * * *", "Europe/Paris")
    assert seen["parameters"] == {"params_path": "params.yaml", "overrides": ["grpo.steps=5"]}
