"""The Prefect flow's operations: task options (retries, log_prints), cross-run caching keyed on params, input
and code hashes with output verification, and the run summary artifact.

The flow tests run the real flow on Prefect's test harness (a temporary local server) with every stage
replaced by a fake that writes the stage's declared outputs, so caching is tested in seconds; the real stages
under the flow are covered by tests/e2e/test_pipeline_e2e.py and tests/flows/test_prefect_server.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from grpo_steps.platform.config import load_config
from grpo_steps.platform.stage import param_values
from grpo_steps.stages import STAGES
from tests.support.stages import stand_in

# ------------------------------------------------------------------------------------------- cache keys


def _write(p: Path, content: str, inner: str) -> None:
    """A file at `p` when it has a suffix, else a folder `p` holding the file `inner`."""
    if p.suffix:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    else:
        p.mkdir(parents=True, exist_ok=True)
        (p / inner).write_text(content)


def _write_outputs(name, cfg, tag=""):
    for p in STAGES[name].outs(cfg):
        content = f"{name}:{json.dumps(param_values(cfg, STAGES[name].params), sort_keys=True)}{tag}"
        _write(Path(p), content, "part.txt")


def test_path_md5_of_files_and_folders(tmp_path):
    from flows.cache import path_md5

    f = tmp_path / "a.txt"
    f.write_text("x")
    assert path_md5(f) == hashlib.md5(b"x").hexdigest()
    assert path_md5(tmp_path / "missing") is None
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "b.txt").write_text("b")
    before = path_md5(d)
    assert before.endswith(".dir")
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert path_md5(d) == before, "bytecode caches are not content"
    (d / "sub" / "b.txt").write_text("changed")
    assert path_md5(d) != before
    (d / "sub" / "b.txt").write_text("b")
    (d / "sub" / "b.txt").rename(d / "sub" / "c.txt")
    assert path_md5(d) != before, "a renamed file changes the folder hash"


def test_cache_key_follows_params_inputs_code_and_output_paths(workdir, tmp_path):
    from flows.cache import stage_cache_key

    cfg = load_config("params.yaml")
    root = tmp_path / "src"
    for c in STAGES["grpo"].code:
        _write(root / c, c, "x.py")
    for name in ("prepare", "validate", "sft", "train_reward"):
        _write_outputs(name, cfg)
    key = stage_cache_key("grpo", cfg, root)
    assert key == stage_cache_key("grpo", cfg, root), "deterministic"
    assert key.startswith("grpo-grpo-")

    # a param of the stage's sections changes the key; another stage's param does not
    assert stage_cache_key("grpo", load_config("params.yaml", ["grpo.beta=0.0"]), root) != key
    assert stage_cache_key("grpo", load_config("params.yaml", ["sft.max_steps=3"]), root) == key
    # an input's content
    (cfg.paths.sft_policy() / "part.txt").write_text("retrained")
    assert stage_cache_key("grpo", cfg, root) != key
    _write_outputs("sft", cfg)
    assert stage_cache_key("grpo", cfg, root) == key
    # a source file
    (root / "grpo_steps/stages/grpo.py").write_text("edited")
    assert stage_cache_key("grpo", cfg, root) != key
    (root / "grpo_steps/stages/grpo.py").write_text("grpo_steps/stages/grpo.py")
    assert stage_cache_key("grpo", cfg, root) == key
    # where the outputs go
    assert stage_cache_key("grpo", load_config("params.yaml", ["paths.reports_dir=elsewhere"]), root) != key


def test_stale_outputs(workdir):
    from flows.cache import output_manifest, stale_outputs

    cfg = load_config("params.yaml")
    _write_outputs("evaluate", cfg)
    manifest = output_manifest("evaluate", cfg)
    assert set(manifest) == {str(p) for p in STAGES["evaluate"].outs(cfg)}
    assert stale_outputs(manifest) == []
    Path(cfg.paths.reports() / "eval.png").write_text("other")
    (cfg.paths.reports() / "samples.jsonl").unlink()
    expected = sorted(str(cfg.paths.reports() / n) for n in ("eval.png", "samples.jsonl"))
    assert sorted(stale_outputs(manifest)) == expected


def test_results_dir_is_under_the_project_and_git_ignored(workdir, monkeypatch):
    from flows.cache import RESULTS_DIR_ENV, results_dir

    monkeypatch.delenv(RESULTS_DIR_ENV, raising=False)
    assert results_dir() == (workdir / ".prefect" / "results").resolve()
    gitignore = (Path(__file__).resolve().parents[2] / ".gitignore").read_text().split()
    assert "/.prefect/" in gitignore
    monkeypatch.setenv(RESULTS_DIR_ENV, str(workdir / "elsewhere"))
    assert results_dir() == (workdir / "elsewhere").resolve()


# ------------------------------------------------------------------------------------------- task options


def test_task_options():
    from prefect.cache_policies import NO_CACHE

    from flows.pipeline import STAGE_TASKS

    assert list(STAGE_TASKS) == list(STAGES)
    for name in ("sft", "train_reward", "grpo"):
        t = STAGE_TASKS[name]
        assert t.retries == 1 and t.retry_delay_seconds and t.retry_condition_fn is not None
        # TRL stages: no print() capture (datasets' dill disassembles functions through print)
        assert t.log_prints is False
    for name in ("prepare", "validate", "sft", "train_reward", "grpo", "evaluate"):
        t = STAGE_TASKS[name]
        assert t.persist_result is True and t.cache_key_fn is not None, name
    assert STAGE_TASKS["evaluate"].log_prints is True, "the comparison table is printed into the run's logs"
    assert STAGE_TASKS["register"].cache_policy is NO_CACHE, "a registry side effect is never skipped"


def test_user_errors_are_not_retried():
    from prefect.states import Failed

    from flows.pipeline import _retry_unless_user_error
    from grpo_steps.platform.config import ConfigError
    from grpo_steps.stages.train_reward import RewardGateError

    def failed(exc):
        return Failed(data=exc)

    assert _retry_unless_user_error(None, None, failed(RewardGateError("gate"))) is False
    assert _retry_unless_user_error(None, None, failed(ConfigError("bad"))) is False
    assert _retry_unless_user_error(None, None, failed(RuntimeError("CUDA error: out of memory"))) is True


# ------------------------------------------------------------------------------------------------ report


def _cfg():
    return load_config(None)


def test_summary_markdown_tables_and_gates():
    from flows.report import summary_markdown
    from grpo_steps.platform.tracking import ui_run_link

    ev = {"n_test": 60, "start": {"accuracy": 0.25, "pass_at_4": 0.5}, "grpo": {"accuracy": 0.5, "pass_at_4": 0.75,
          "kl_to_reference": 0.01}, "accuracy_gain": 0.25, "champion": {"accuracy": 0.4}, "champion_version": "3",
          "accuracy_gain_over_champion": 0.1}
    records = {
        "train_reward": {"result": {"pairwise_accuracy": 0.9, "min_pairwise_accuracy": 0.55, "gate_passed": True},
                         "duration_s": 3.0, "finished_at": "t0"},
        "evaluate": {"result": ev, "duration_s": 2.0},
        "register": {"result": {"model_name": "grpo-policy", "version": "4", "alias": "champion", "accuracy": 0.5,
                                "champion_version_before": "3", "champion_accuracy_before": 0.4}, "duration_s": 1.0},
    }
    status = {n: "ran" for n in STAGES} | {"train_reward": "cached"}
    md = summary_markdown(_cfg(), None, records, status, None, 12.0)
    assert md.startswith("# GRPO pipeline run: completed")
    assert "| train_reward | cached | 3.0 (cached run of t0) |" in md
    assert "| accuracy | 0.2500 | 0.5000 | 0.4000 |" in md and "champion v3" in md
    assert "**+0.2500**" in md and "over the champion: **+0.1000**" in md
    assert "| reward model | passed | held-out pairwise accuracy 0.9000, required 0.55 |" in md
    assert "| registry alias | `champion` | grpo-policy v4" in md and "champion before: v3 (0.4000)" in md
    assert ui_run_link("http://mlflow:5000/", "7", "abc") == \
        "http://mlflow:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert ui_run_link("sqlite:///mlflow.db", "7", "abc") is None


def test_summary_markdown_of_a_failed_gate(workdir):
    from flows.report import summary_markdown

    cfg = load_config("params.yaml")
    cfg.paths.reports().mkdir()
    (cfg.paths.reports() / "reward_model.json").write_text(json.dumps(
        {"pairwise_accuracy": 0.5, "min_pairwise_accuracy": 0.55, "gate_passed": False}))
    status = {n: "not run" for n in STAGES} | {"prepare": "ran", "validate": "ran", "train_reward": "failed"}
    md = summary_markdown(cfg, None, {}, status, RuntimeError("reward model below the gate\ndetails"), 5.0)
    assert "# GRPO pipeline run: failed" in md and "RuntimeError: reward model below the gate`" in md
    assert "**failed**: stopped before GRPO" in md
    assert "| registry alias | not reached | stage not run |" in md
    assert "Not evaluated in this run." in md


# -------------------------------------------------------------------------------------- the flow, faked


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


FAKE_RESULTS = {
    "train_reward": {"pairwise_accuracy": 0.9, "min_pairwise_accuracy": 0.0, "gate_passed": True},
    "evaluate": {"n_test": 4, "start": {"accuracy": 0.25}, "grpo": {"accuracy": 0.5}, "accuracy_gain": 0.25},
    "register": {"model_name": "grpo-policy", "version": "1", "alias": "champion", "accuracy": 0.5},
}


@pytest.fixture
def fake_stages(monkeypatch, workdir):
    """Every stage replaced by a fake that records its call and writes its declared outputs."""
    calls: list[str] = []

    def fake(name):
        def run(cfg, *, parent_run_id, publish):  # called as the flow calls a stage record
            assert parent_run_id and callable(publish)
            calls.append(name)
            _write_outputs(name, cfg)
            return FAKE_RESULTS.get(name, {"stage": name})

        return run

    for name, stage in list(STAGES.items()):
        monkeypatch.setitem(STAGES, name, stand_in(stage, fake(name)))
    return calls


def _run_flow(workdir, *overrides, **kwargs):
    from flows.pipeline import grpo_pipeline

    state = grpo_pipeline(params_path="params.yaml", return_state=True,
                          overrides=[f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db", *overrides], **kwargs)
    return state


def _summary_artifact():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.pipeline import SUMMARY_ARTIFACT_KEY

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_ARTIFACT_KEY])),
                                     sort=ArtifactSort.CREATED_DESC, limit=1)
    return arts[0].data


@pytest.mark.slow  # ~20 s each on 2 cores, plus ~20 s for the harness's server
def test_flow_skips_unchanged_stages_and_reruns_what_changed(prefect_api, fake_stages, workdir):
    from mlflow import MlflowClient

    assert _run_flow(workdir).is_completed()
    assert fake_stages == list(STAGES)
    md = _summary_artifact()
    assert "| prepare | ran |" in md and "| accuracy | 0.2500 | 0.5000 |" in md and "`champion`" in md

    # `grpo status` says what the next run would skip, without running anything
    from flows.status import stage_status

    def status(*overrides):
        cfg = load_config("params.yaml", [f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db", *overrides])
        return {r["stage"]: r["state"] for r in stage_status(cfg)}

    assert status() == {**{n: "up to date" for n in STAGES}, "register": "always runs"}
    assert status("grpo.beta=0.0") == {"prepare": "up to date", "validate": "up to date", "sft": "up to date",
                                       "train_reward": "up to date", "grpo": "will run", "evaluate": "after grpo",
                                       "register": "always runs"}
    assert fake_stages == list(STAGES), "status ran nothing"

    # nothing changed: only register (a side effect, never cached) runs
    fake_stages.clear()
    assert _run_flow(workdir).is_completed()
    assert fake_stages == ["register"]
    assert "| grpo | cached |" in _summary_artifact()
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    parents = client.search_runs([client.get_experiment_by_name("grpo-pipeline").experiment_id],
                                 "tags.mlflow.runName = 'pipeline'", order_by=["start_time DESC"])
    assert parents[0].data.tags["cached_stages"] == "prepare,validate,sft,train_reward,grpo,evaluate"

    # one GRPO param: grpo and everything after it (its output changed, so evaluate's input did)
    fake_stages.clear()
    assert _run_flow(workdir, "grpo.beta=0.0").is_completed()
    assert fake_stages == ["grpo", "evaluate", "register"]

    # a deleted output of a cached run: that stage runs again; downstream stays cached (same bytes)
    fake_stages.clear()
    cfg = load_config("params.yaml", ["grpo.beta=0.0"])
    (cfg.paths.sft_policy() / "part.txt").unlink()
    assert _run_flow(workdir, "grpo.beta=0.0").is_completed()
    assert fake_stages == ["sft", "register"]
    assert (cfg.paths.sft_policy() / "part.txt").is_file()

    # an output edited by hand is just as stale
    fake_stages.clear()
    (cfg.paths.reports() / "metrics.json").write_text("{}")
    assert _run_flow(workdir, "grpo.beta=0.0").is_completed()
    assert fake_stages == ["evaluate", "register"]

    # refresh_cache: everything
    fake_stages.clear()
    assert _run_flow(workdir, "grpo.beta=0.0", refresh_cache=True).is_completed()
    assert fake_stages == list(STAGES)


@pytest.mark.slow  # ~20 s each on 2 cores, plus ~20 s for the harness's server
def test_flow_retries_a_transient_failure_but_not_a_gate(prefect_api, fake_stages, workdir, monkeypatch):
    from flows import pipeline
    from grpo_steps.stages.train_reward import RewardGateError

    for name in STAGES:  # no pause between attempts in a test
        monkeypatch.setitem(pipeline.STAGE_TASKS, name, pipeline.STAGE_TASKS[name].with_options(retry_delay_seconds=0))
    attempts = []

    def flaky_sft(cfg, **_):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("node lost")
        _write_outputs("sft", cfg)
        return {"stage": "sft"}

    monkeypatch.setitem(STAGES, "sft", stand_in(STAGES["sft"], flaky_sft))
    assert _run_flow(workdir).is_completed()
    assert len(attempts) == 2

    def gate(cfg, **_):
        fake_stages.append("train_reward")
        raise RewardGateError("held-out pairwise accuracy 0.4 below 0.55")

    fake_stages.clear()
    monkeypatch.setitem(STAGES, "train_reward", stand_in(STAGES["train_reward"], gate))
    state = _run_flow(workdir, "reward_model.epochs=3")  # a new key, so the stage runs
    assert state.is_failed()
    assert fake_stages == ["train_reward"], "a failed gate is not retried, and nothing after it runs"
    md = _summary_artifact()
    assert "# GRPO pipeline run: failed" in md and "RewardGateError" in md
    assert "| train_reward | failed |" in md and "| grpo | not run |" in md
