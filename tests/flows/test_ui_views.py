"""What the MLflow UI is told to show first: headline metrics of the parent run, the saved runs view, the
links the pipeline prints, the grpo run's headline curves."""

from __future__ import annotations

import json

import mlflow

from grpo_steps.platform import tracking
from grpo_steps.platform.tracking import (
    HEADLINE_METRICS,
    headline_metrics,
    headline_view_state,
    ui_run_link,
    ui_runs_link,
)

VALUES = {
    "evaluate": {"start": {"accuracy": 0.69}, "grpo": {"accuracy": 0.935, "kl_to_reference": 0.0212345},
                 "accuracy_gain": 0.245},
    "grpo": {"reward_last": 1.234567, "steps": 100},
    "train_reward": {"pairwise_accuracy": 0.98},
}


def test_headline_metrics_of_a_full_run_are_rounded_and_named_for_the_columns():
    got = headline_metrics(VALUES)
    assert set(got) == set(HEADLINE_METRICS)
    assert got == {"accuracy_start": 0.69, "accuracy_grpo": 0.935, "accuracy_gain": 0.245, "train_reward": 1.2346,
                   "kl_to_ref": 0.0212, "rm_accuracy": 0.98}


def test_headline_metrics_leave_out_what_did_not_run_or_is_not_finite():
    assert headline_metrics({}) == {}
    partial = headline_metrics({"grpo": {"reward_last": float("nan")}, "train_reward": {"pairwise_accuracy": 0.7}})
    assert partial == {"rm_accuracy": 0.7}


def test_the_saved_view_selects_the_headline_columns_in_order_and_keeps_runs_nested():
    envelope = json.loads(headline_view_state())
    state = json.loads(envelope["state"])
    metric_columns = [c for c in state["selectedColumns"] if c.startswith("metrics.")]
    assert metric_columns == [f"metrics.`{m}`" for m in HEADLINE_METRICS]
    assert state["columnOrder"] == state["selectedColumns"]
    # MLflow nests child runs only when sorted by start time (or not at all)
    assert state["orderByKey"] == "attributes.start_time" and envelope["name"]


def test_links_open_model_training_mode_and_the_headline_view_on_a_server_only():
    link = ui_runs_link("http://mlflow:5000/", "3")
    assert link == "http://mlflow:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=headline"
    assert ui_run_link("https://m.example/", "3", "r1") == \
        "https://m.example/#/experiments/3/runs/r1?workflowType=machine_learning"
    assert ui_runs_link("sqlite:///mlflow.db", "3") is None and ui_run_link("file:/x", "3", "r") is None


def test_log_curve_adds_the_headline_curves_next_to_the_usual_names(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    experiment_id = mlflow.MlflowClient().create_experiment("curves")  # not the experiment an earlier test set
    with mlflow.start_run(experiment_id=experiment_id) as run:
        tracking.log_curve({"reward": 0.5, "kl": 0.01, "loss": float("nan"), "clip_ratio/low_mean": 0.0}, step=1)
        tracking.log_curve({"eval/accuracy": 0.8}, step=2)
    keys = set(mlflow.MlflowClient().get_run(run.info.run_id).data.metrics)
    assert keys == {"reward", "kl", "clip_ratio/low_mean", "eval/accuracy", "Headline/reward", "Headline/kl",
                    "Headline/accuracy"}
