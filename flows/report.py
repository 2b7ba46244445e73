"""What a pipeline run shows in the Prefect UI: the stages' reports and the run's markdown summary.

`publish_reports` turns the reports a stage returns (grpo_steps/platform/results.py; e.g. validate's data-validation
report and failure table) into Prefect artifacts; the tracking wrapper calls it for every stage of a flow.
The summary, published by flows/pipeline.py:

Stages (ran / cached / failed / not run, with durations), the held-out evaluation (start vs grpo, and the
registry's champion when evaluated), the two gates (reward model, registry alias) and the MLflow run.
Everything is optional: a run that stopped early still gets a summary of what it did.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from grpo_steps.platform.config import Config
from grpo_steps.platform.results import Report
from grpo_steps.platform.tracking import LOCAL_UI, ui_run_link

log = logging.getLogger(__name__)


def publish_reports(reports: list[Report]) -> None:
    """Each report as a Prefect markdown or table artifact of the current task run; a report that cannot be
    published is logged, never fails the stage."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    for r in reports:
        try:
            if r.markdown is not None:
                create_markdown_artifact(markdown=r.markdown, key=r.key, description=r.description)
            if r.table is not None:
                create_table_artifact(table=r.table, key=r.key, description=r.description)
        except Exception as e:  # noqa: BLE001 - an artifact must never fail the stage
            log.warning("could not publish the %s report to Prefect: %s", r.key, e)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _mlflow_section(run_id: str | None) -> list[str]:
    if run_id is None:
        return ["## MLflow", "", "No MLflow run was started (the run failed before it)."]
    import mlflow

    uri = mlflow.get_tracking_uri()
    try:
        experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - the store may be unreachable: still report the run id
        experiment_id = None
    lines = ["## MLflow", "", f"- parent run: `{run_id}` (experiment id {experiment_id or 'unknown'})",
             f"- tracking URI: `{uri}`"]
    link = ui_run_link(uri, experiment_id, run_id) if experiment_id else None
    if link:
        lines.append(f"- [open the run in the MLflow UI]({link})")
    elif experiment_id:
        lines.append(f"- view it with `mlflow ui --backend-store-uri {uri}` (`make mlflow-ui`), then open "
                     f"{ui_run_link(LOCAL_UI, experiment_id, run_id)}")
    else:
        lines.append(f"- view it with `mlflow ui --backend-store-uri {uri}` (`make mlflow-ui`)")
    return lines


def _evaluation_section(ev: dict[str, Any] | None) -> list[str]:
    if not ev:
        return ["## Held-out evaluation", "", "Not evaluated in this run."]
    cols = [c for c in ("start", "grpo", "champion") if isinstance(ev.get(c), dict)]
    head = {"start": "start (SFT)", "grpo": "grpo", "champion": f"champion v{ev.get('champion_version')}"}
    keys = [k for k in ev["grpo"] if any(k in ev[c] for c in cols)]
    lines = [f"## Held-out evaluation ({ev.get('n_test', '?')} test prompts)", "",
             "| metric | " + " | ".join(head[c] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(ev[c].get(k, "")) for c in cols) + " |")
    gain = f"Accuracy gain (grpo - start): **{ev.get('accuracy_gain', float('nan')):+.4f}**"
    if "accuracy_gain_over_champion" in ev:
        gain += f"; over the champion: **{ev['accuracy_gain_over_champion']:+.4f}**"
    elif ev.get("champion_note"):
        gain += f" (champion not compared: {ev['champion_note']})"
    lines += ["", gain]
    if ev.get("reward_hacking_warning"):
        lines += ["", f"> warning: {ev['reward_hacking_warning']}"]
    return lines


def _gates_section(cfg: Config, results: dict[str, Any], status: dict[str, str]) -> list[str]:
    lines = ["## Gates", "", "| gate | decision | details |", "|---|---|---|"]
    rm = results.get("train_reward") or _read_json(cfg.paths.reward_report())
    if rm and "pairwise_accuracy" in rm:
        threshold = rm.get("min_pairwise_accuracy", cfg.reward_model.min_pairwise_accuracy)
        passed = rm.get("gate_passed", rm["pairwise_accuracy"] >= threshold)
        verdict = "passed" if passed else "**failed**: stopped before GRPO"
        lines.append(f"| reward model | {verdict} | held-out pairwise accuracy {rm['pairwise_accuracy']:.4f}, "
                     f"required {threshold} |")
    else:
        lines.append(f"| reward model | not reached | stage {status.get('train_reward', 'not run')} |")
    reg = results.get("register")
    if reg:
        note = " (already registered: same weights)" if reg.get("already_registered") else ""
        before = reg.get("champion_version_before")
        champion = "none" if before is None else f"v{before} ({_fmt(reg.get('champion_accuracy_before'))})"
        margin = reg.get("promotion_margin", cfg.registry.promotion_margin)
        details = (f"{reg['model_name']} v{reg['version']}{note}, accuracy {_fmt(reg.get('accuracy'))}; "
                   f"champion before: {champion}, margin {margin}")
        lines.append(f"| registry alias | `{reg.get('alias')}` | {details} |")
    else:
        lines.append(f"| registry alias | not reached | stage {status.get('register', 'not run')} |")
    return lines


def summary_markdown(cfg: Config, run_id: str | None, records: dict[str, dict[str, Any]], status: dict[str, str],
                     error: BaseException | None, duration_s: float) -> str:
    results = {name: rec.get("result") for name, rec in records.items()}
    outcome = "failed" if error is not None else "completed"
    lines = [f"# GRPO pipeline run: {outcome}", ""]
    if error is not None:
        lines += [f"**Error:** `{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}`", ""]
    lines += [f"Wall time {duration_s:.1f} s. Stages skipped as unchanged are marked `cached`.", "",
              "| stage | status | duration (s) |", "|---|---|---:|"]
    for name, st in status.items():
        rec = records.get(name)
        took = f"{rec['duration_s']:.1f}" if rec else ""
        if st == "cached" and rec:
            took += f" (cached run of {rec.get('finished_at', '?')})"
        lines.append(f"| {name} | {st} | {took} |")
    lines += [""] + _evaluation_section(results.get("evaluate"))
    lines += [""] + _gates_section(cfg, results, status)
    lines += [""] + _mlflow_section(run_id)
    return "\n".join(lines) + "\n"
