"""The train_reward stage: the likelihood head trained from the starting policy, the scalar head (backbone
choice, margin and centering through TRL's RewardTrainer), the gate, and the gate stopping the CLI and the
Prefect flow before GRPO."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from mlflow import MlflowClient

from grpo_steps.data.files import DataFileError
from grpo_steps.platform.config import ConfigError
from grpo_steps.platform.modeling import load_reward_model, load_tokenizer
from grpo_steps.stages import train_reward as stage
from tests.support.project import (
    ROOT,
    load_tiny,
    tiny_overrides,
)
from tests.support.stages import train_reward


class SpyTrainer(stage.RewardTrainer):
    """RewardTrainer that records the batches its loss saw."""

    batches: list[dict] = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        SpyTrainer.batches.append({k: v.detach().clone() for k, v in inputs.items() if k == "margin"}
                                  | {"keys": sorted(inputs)})
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_margin_settings(workdir):
    with pytest.raises(ConfigError, match="margin"):
        load_tiny(workdir, "reward_model.margin=0.5", "reward_model.margin_column=m")
    pairs = [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "m": 0.25},
             {"prompt": "2+2=", "chosen": "4", "rejected": "5", "m": 1}]
    constant = stage.pairs_dataset(pairs, load_tiny(workdir, "reward_model.margin=0.5"))
    assert constant["margin"] == [0.5, 0.5] and set(constant.column_names) == {"prompt", "chosen", "rejected",
                                                                                "margin"}
    per_pair = stage.pairs_dataset(pairs, load_tiny(workdir, "reward_model.margin_column=m"))
    assert per_pair["margin"] == [0.25, 1.0]
    assert "margin" not in stage.pairs_dataset(pairs, load_tiny(workdir)).column_names
    with pytest.raises(DataFileError, match="'gap'"):
        stage.pairs_dataset(pairs, load_tiny(workdir, "reward_model.margin_column=gap"), "pairs.jsonl")
    with pytest.raises(DataFileError, match="finite number"):
        stage.pairs_dataset([{**pairs[0], "m": "big"}], load_tiny(workdir, "reward_model.margin_column=m"))


def test_train_reward_with_margin_and_centering(project, monkeypatch):
    cfg = load_tiny(project, "reward_model.head=scalar", "reward_model.margin=0.5",
                    "reward_model.center_rewards_coefficient=0.01")
    SpyTrainer.batches = []
    monkeypatch.setattr(stage, "RewardTrainer", SpyTrainer)
    metrics = train_reward(cfg)

    assert SpyTrainer.batches and all(b["margin"].eq(0.5).all() for b in SpyTrainer.batches)  # reached the loss
    report = json.loads(load_tiny(project).paths.reward_report().read_text())
    assert report["pairwise_accuracy"] == metrics["pairwise_accuracy"] and report["gate_passed"] is True
    assert 0.0 <= report["pairwise_accuracy"] <= 1.0 and report["n_eval_pairs"] > 0

    folder = cfg.paths.reward_model()
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    assert not (folder / "_trainer").exists()
    model = load_reward_model(folder)
    assert model.config.num_labels == 1
    scores = stage.RewardModelFunction(model)(["1+1="], ["2"])  # scores with the tokenizer saved beside it
    assert len(scores) == 1 and isinstance(scores[0], float)

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'train_reward'")
    assert run.data.metrics["reward_model/pairwise_accuracy"] == pytest.approx(metrics["pairwise_accuracy"])
    assert run.data.params["reward_model.margin"] == "0.5"
    assert run.data.params["reward_model.center_rewards_coefficient"] == "0.01"
    assert run.data.tags["reward_gate"] == "passed"
    assert "reward_model.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_backbone_from_a_local_folder(project, tmp_path):
    from grpo_steps.platform.modeling import build_policy

    # a "pretrained" causal LM with its own tokenizer: gets a fresh one-output score head
    base = load_tiny(project)
    tok = load_tokenizer(base.paths.tokenizer())
    backbone = tmp_path / "backbone"
    build_policy(base.model, tok).save_pretrained(str(backbone), safe_serialization=True)
    tok.save_pretrained(str(backbone))

    cfg = load_tiny(project, f"reward_model.backbone={backbone}", "reward_model.head=scalar")
    model, rm_tok = stage.build_reward_model(cfg)
    assert model.config.num_labels == 1 and model.config.pad_token_id == rm_tok.pad_token_id
    metrics = train_reward(cfg)
    assert 0.0 <= metrics["pairwise_accuracy"] <= 1.0
    assert (cfg.paths.reward_model() / "tokenizer_config.json").is_file()

    with pytest.raises(RuntimeError, match="backbone"):
        stage.build_reward_model(load_tiny(project, f"reward_model.backbone={tmp_path / 'nothing-here'}"))


def test_gate_failure_stops_the_stage_and_the_cli_exits_2(project, capsys):
    from grpo_steps.cli import main

    args = [x for o in tiny_overrides(project, "reward_model.min_pairwise_accuracy=1.0") for x in ("--set", o)]
    assert main(["train_reward", *args]) == 2
    err = capsys.readouterr().err
    assert "grpo train_reward: error:" in err and "below the gate" in err and "stopping before GRPO" in err
    report = json.loads(load_tiny(project).paths.reward_report().read_text())  # kept for a look at why
    assert report["gate_passed"] is False and report["min_pairwise_accuracy"] == 1.0


FLOW_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    from grpo_steps.stages import STAGES
    from tests.support.stages import stand_in
    from grpo_steps.stages.train_reward import RewardGateError

    ran = Path("ran.txt")

    def recorded(name, real):
        def run(cfg, **kw):
            with ran.open("a") as f:
                f.write(name + "\\n")
            if name == "train_reward":  # the gate fails, as train_reward raises it
                raise RewardGateError("reward model held-out pairwise accuracy 0.400 is below the gate "
                                      "reward_model.min_pairwise_accuracy=0.55; stopping before GRPO")
            if name == "sft":  # the reward model starts from the starting policy: sft runs first
                Path("models/sft").mkdir(parents=True, exist_ok=True)
                Path("models/sft/model.safetensors").write_text("stand-in")
            return real(cfg, **kw) if name in ("prepare", "validate") else {}
        return run

    for name, stage in list(STAGES.items()):
        STAGES[name] = stand_in(stage, recorded(name, stage))

    from grpo_steps.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
""")


@pytest.mark.slow
def test_gate_failure_stops_the_prefect_flow_before_grpo(workdir):
    """`grpo run` with a failing gate: exit code 2, the message, and no stage after train_reward ran."""
    (workdir / "flow_gate.py").write_text(FLOW_SCRIPT)
    env = {**os.environ, "PREFECT_HOME": str(workdir / ".prefect"), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [x for o in tiny_overrides(workdir) for x in ("--set", o)]
    proc = subprocess.run([sys.executable, "flow_gate.py", *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "grpo run: error:" in proc.stderr and "below the gate" in proc.stderr
    assert (workdir / "ran.txt").read_text().split() == ["prepare", "validate", "sft", "train_reward"]

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("grpo-pipeline")
    (parent,) = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'pipeline'")
    assert parent.info.status == "FAILED"
