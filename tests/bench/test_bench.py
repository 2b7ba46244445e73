"""bench/grpo_vs_trl.py (ours vs TRL's GRPOTrainer) and bench/profile_step.py: the table they print, end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.grpo_vs_trl import LABELS, RATIO_LABEL, summarise
from bench.profile_step import PhaseTimer

ROOT = Path(__file__).resolve().parents[2]


def _table_rows(text: str) -> dict[str, list[str]]:
    """The markdown table in `text`: first cell -> the other cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _ratio(cell: str) -> float:
    assert cell.endswith("x"), cell
    value = float(cell[:-1])
    assert math.isfinite(value) and value > 0, cell
    return value


@pytest.mark.parametrize("script,option", [("grpo_vs_trl.py", "--device"), ("logprob_memory.py", "--device"),
                                           ("profile_step.py", "--device"), ("memory_table.py", "--device"),
                                           ("time_to_accuracy.py", "--target-gain"), ("processes.py", "--cores"),
                                           ("async_rollout.py", "--repeats")])
def test_scripts_have_help(script, option):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert option in proc.stdout


def test_summary_table_has_both_rows_and_ratios():
    def run(steps_per_s, rss):
        return {"steps_per_s": steps_per_s, "tokens_per_s": 10 * steps_per_s, "steps_per_cpu_s": steps_per_s,
                "peak_rss_mib": rss, "peak_rss_above_imports_mib": rss / 2}

    results = {"ours": [run(2.0, 500), run(4.0, 502)], "trl": [run(1.0, 1000), run(2.0, 1000)]}
    summary = summarise(results, "cpu")
    rows = _table_rows(summary["markdown"])
    assert rows[LABELS["ours"]][0] == "3.000 (2.000-4.000)"  # median (min-max)
    ratios = [_ratio(c) for c in rows[RATIO_LABEL]]
    assert ratios == [2.0, 2.0, 2.0, 0.5, 0.5]
    assert summary["ratios"]["steps_per_s"] == 2.0


def test_phase_timer_charges_nested_phases_exclusively():
    timer = PhaseTimer()
    inner = timer.wrap(lambda: time.sleep(0.05), "inner")
    outer = timer.wrap(lambda: (time.sleep(0.05), inner()), "outer")
    outer()  # disabled: nothing recorded
    assert timer.wall == {}
    timer.enabled = True
    outer()
    assert 0.04 < timer.wall["inner"] < 0.2 and 0.04 < timer.wall["outer"] < 0.2
    assert timer.wall["outer"] + timer.wall["inner"] >= 0.1


@pytest.mark.slow  # 20 s on 2 idle cores, 45 s at load 5: two subprocesses importing torch, transformers, TRL
def test_grpo_vs_trl_runs_both_and_prints_numeric_ratios(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "bench" / "grpo_vs_trl.py"), "--model-preset", "micro", "--steps", "2",
           "--warmup-steps", "1", "--repeats", "1", "--completion-length", "8", "--prompts-per-step", "2",
           "--num-generations", "4", "--micro-batch-tokens", "8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ours: at most 8 positions" in proc.stdout
    rows = _table_rows(proc.stdout)
    assert LABELS["ours"] in rows and LABELS["trl"] in rows, proc.stdout
    for impl in ("ours", "trl"):
        assert all(float(cell) > 0 for cell in rows[LABELS[impl]]), rows[LABELS[impl]]
    assert len(rows[RATIO_LABEL]) == len(rows[LABELS["ours"]]) >= 3
    for cell in rows[RATIO_LABEL]:
        _ratio(cell)
    assert "load average" in proc.stdout
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert {len(saved["runs"]["ours"]), len(saved["runs"]["trl"])} == {1}
    assert saved["runs"]["trl"][0]["mean_completion_tokens_per_step"] > 0
    assert (tmp_path / "bench.md").read_text().count("|") > 10


@pytest.mark.slow  # ~20 s: two subprocesses importing torch and transformers
def test_memory_table_runs_each_variant_and_lora_trains_only_the_adapter(tmp_path):
    from bench.memory_table import LABELS as MEMORY_LABELS

    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_table.py"), "--preset", "micro",
                           "--variants", "fp32-full", "lora-bf16-chunked", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    assert _ratio(rows[MEMORY_LABELS["fp32-full"]][4]) == 1.0
    _ratio(rows[MEMORY_LABELS["lora-bf16-chunked"]][4])
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    full, lora = results["fp32-full"], results["lora-bf16-chunked"]
    assert full["has_reference_copy"] and not lora["has_reference_copy"]  # LoRA's reference is its base
    assert lora["trainable"] < full["trainable"] and lora["parameters"] > full["parameters"]
    assert full["peak_bytes"] > 0 and math.isfinite(lora["loss"])


def test_time_to_target_is_the_first_evaluation_at_or_above_it():
    from bench.time_to_accuracy import report, time_to_target

    points = [[0, 0.0, 0.50], [10, 30.0, 0.60], [20, 61.0, 0.66], [30, 90.0, 0.64]]
    assert time_to_target(points, 0.65) == 61.0 and time_to_target(points, 0.70) is None
    table, summary = report({"ours": {"points": points},
                             "trl": {"points": [[0, 0.0, 0.50], [10, 50.0, 0.55], [20, 100.0, 0.65]]}}, 0.15)
    assert summary["time_to_target_s"] == {"ours": 61.0, "trl": 100.0} and summary["ratio"] == pytest.approx(0.61)
    assert "| 30 | 0.640 | 90 | - | - |" in table and "ratio ours/TRL 0.61x" in table


TINY_SET = ["task.n_train=400", "task.n_eval=40", "task.n_test=60", "task.n_preference_pairs=200",
            "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
            "reward_model.epochs=1", "reward_model.min_pairwise_accuracy=0.0", "sft.max_steps=20",
            "grpo.prompts_per_step=4", "grpo.num_generations=4"]


@pytest.mark.slow  # ~70 s: the set-up stages, then both trainers in subprocesses
def test_time_to_accuracy_runs_both_trainers_from_the_same_start(tmp_path):
    out = tmp_path / "tta"
    cmd = [sys.executable, str(ROOT / "bench" / "time_to_accuracy.py"), "--inputs", str(tmp_path / "inputs"),
           "--steps", "4", "--eval-every", "2", "--threads", "1", "--eval-prompts", "20", "--out", str(out),
           *[x for o in TINY_SET for x in ("--set", o)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    for impl in ("ours", "trl"):
        steps = [p[0] for p in data["results"][impl]["points"]]
        assert steps == [0, 2, 4], (impl, steps)
        times = [p[1] for p in data["results"][impl]["points"]]
        assert times[0] == 0.0 and times[1] > 0 and times[2] > times[1]  # training time, growing
    # the same starting policy and evaluator: the same start accuracy on both sides
    assert data["results"]["ours"]["points"][0][2] == data["results"]["trl"]["points"][0][2]
    assert out.with_suffix(".png").stat().st_size > 0 and "time to target" in out.with_suffix(".md").read_text()
