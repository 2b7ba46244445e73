"""The evaluate stage: metrics.json, plot, samples, MLflow logging, and the side-by-side champion comparison."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from grpo_steps.stages.evaluate import Champion, format_comparison, load_champion
from tests.support.project import load_tiny, perturb_policy, write_metrics
from tests.support.stages import evaluate, register

KEPT_KEYS = {"start", "grpo", "accuracy_gain", "n_test", "reward_hacking_warning"}


def _evaluate_run(cfg):
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'evaluate'", order_by=["attributes.start_time DESC"])
    return client, runs[0]


def test_evaluate_without_champion_writes_reports_and_logs(project, capsys):
    """The numbers hold together: every test row is in samples.jsonl (n_samples_logged = n_test), each row's
    `correct` is the exact-match judgement of its completion, each accuracy is the share of right rows, the
    sampled metrics keep their order (maj@k <= pass@k, sampled accuracy <= pass@k), the k3 KL is >= 0, and
    MLflow holds the same values as metrics.json."""
    n_test = len(load_tiny(project).paths.validated_file("test").read_text().splitlines())
    cfg = load_tiny(project, f"evaluate.n_samples_logged={n_test}")
    result = evaluate(cfg)

    metrics = json.loads(cfg.paths.metrics().read_text())
    assert KEPT_KEYS <= set(metrics) and "champion" not in metrics
    assert "no champion" in metrics["champion_note"]
    assert metrics["n_test"] == n_test
    samples = [json.loads(line) for line in cfg.paths.samples().read_text().splitlines()]
    assert len(samples) == n_test
    for policy, prefix in (("grpo", ""), ("start", "start_")):
        m = metrics[policy]
        right = [r[f"{prefix}correct"] for r in samples]
        assert right == [r[f"{prefix}completion"].strip() == r["answer"].strip() for r in samples], policy
        assert m["accuracy"] == pytest.approx(sum(right) / n_test), policy
        assert 0.0 <= m["maj_at_2"] <= m["pass_at_2"] <= 1.0 and m["sampled_accuracy"] <= m["pass_at_2"], m
        assert 1.0 <= m["mean_completion_length"] <= cfg.grpo.max_completion_length, m
        assert m["reward_model_score"] == pytest.approx(m["reward_model_score"]), "finite"  # NaN != NaN
    assert metrics["grpo"]["kl_to_reference"] >= 0.0 and "kl_to_reference" not in metrics["start"]
    assert result["accuracy_gain"] == pytest.approx(metrics["grpo"]["accuracy"] - metrics["start"]["accuracy"])
    assert cfg.paths.eval_plot().stat().st_size > 1000

    client, run = _evaluate_run(cfg)
    for policy in ("start", "grpo"):
        for key, value in metrics[policy].items():
            assert run.data.metrics[f"eval/{policy}/{key}"] == pytest.approx(value), (policy, key)
    assert run.data.metrics["eval/accuracy_gain"] == pytest.approx(metrics["accuracy_gain"])
    assert {"metrics.json", "eval.png", "samples.jsonl", "samples.json"} <= {a.path for a in
                                                                            client.list_artifacts(run.info.run_id)}
    assert run.data.params["evaluate.pass_k"] == "2"  # a stage on its own: the run carries the settings
    out = capsys.readouterr().out
    assert "held-out evaluation" in out and "champion: not compared" in out


def test_evaluate_compares_against_the_registered_champion(project):
    cfg = load_tiny(project)
    # a champion in the registry: the current GRPO weights, slightly changed, registered with a made-up accuracy
    grpo = cfg.paths.grpo_policy() / "model.safetensors"
    original = grpo.read_bytes()
    perturb_policy(cfg.paths.grpo_policy(), 0.05)
    write_metrics(cfg, accuracy=0.9)
    assert register(cfg)["alias"] == "champion"
    grpo.write_bytes(original)

    result = evaluate(cfg)
    assert result["champion_version"] == "1" and result["champion_note"] is None
    assert {"accuracy", "pass_at_2", "reward_model_score"} <= set(result["champion"])
    assert result["accuracy_gain_over_champion"] == pytest.approx(
        result["grpo"]["accuracy"] - result["champion"]["accuracy"])
    metrics = json.loads(load_tiny(project).paths.metrics().read_text())
    assert KEPT_KEYS | {"champion", "champion_version"} <= set(metrics)
    samples = [json.loads(line) for line in cfg.paths.samples().read_text().splitlines()]
    assert len(samples) == cfg.evaluate.n_samples_logged < metrics["n_test"]  # the first rows only
    assert {"prompt", "answer", "champion_completion", "champion_correct", "start_completion"} <= set(samples[0])
    _, run = _evaluate_run(cfg)
    assert "eval/champion/accuracy" in run.data.metrics and run.data.tags["champion_version"] == "1"
    assert "champion" in format_comparison(result)

    # the gate now compares against the champion as measured on this very test split, not its old tag of 0.9
    reg = register(cfg)
    assert reg["champion_accuracy_source"] == "same_test_split"
    assert reg["champion_accuracy_before"] == pytest.approx(result["champion"]["accuracy"])


def test_champion_lookup_problems_become_notes(project, monkeypatch):
    cfg = load_tiny(project)
    from grpo_steps.platform.tracking import setup

    setup(cfg)
    assert "no champion" in load_champion(cfg, project / "scratch").note  # nothing registered yet

    def unreachable(self, name, alias):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", unreachable)
    champ = load_champion(cfg, project / "scratch")
    assert champ.model is None and "unreachable" in champ.note and "connection refused" in champ.note


def test_compare_champion_can_be_switched_off(project, monkeypatch):
    cfg = load_tiny(project, "evaluate.compare_champion=false", "evaluate.n_samples_logged=0")

    def must_not_run(*_a, **_k):
        raise AssertionError("champion looked up although compare_champion is off")

    monkeypatch.setattr("grpo_steps.stages.evaluate.load_champion", must_not_run)
    result = evaluate(cfg)
    assert result["champion_note"] == "evaluate.compare_champion is off" and "champion" not in result
    assert load_tiny(project).paths.samples().read_text() == ""


def test_format_comparison_lists_every_policy():
    result = {"n_test": 3, "start": {"accuracy": 0.1}, "grpo": {"accuracy": 0.5, "kl_to_reference": 0.02},
              "champion": {"accuracy": 0.4}, "champion_version": "7", "accuracy_gain": 0.4,
              "accuracy_gain_over_champion": 0.1}
    text = format_comparison(result)
    assert "champion" in text.splitlines()[1] and "0.4000" in text and "grpo - champion v7" in text
    assert Champion().model is None


@pytest.mark.parametrize("backend", ["compact", "hf"])
def test_evaluation_decodes_as_the_training_rollouts_do(project, monkeypatch, backend):
    """Greedy accuracy and pass@k sample through grpo.generation_backend, as the grpo stage's rollouts and its
    evaluation during training do (one decoder, one set of processors)."""
    import grpo_steps.stages.evaluate as stage
    from grpo_steps.grpo import sampling

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return sampling.sample_in_batches(*args, **kwargs)

    monkeypatch.setattr(stage, "sample_in_batches", spy)
    cfg = load_tiny(project, f"grpo.generation_backend={backend}", "evaluate.compare_champion=false")
    evaluate(cfg)
    assert seen and set(seen) == {backend}
