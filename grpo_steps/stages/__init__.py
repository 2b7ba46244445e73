"""The stages: one module per stage, named as its CLI verb (`grpo sft` runs grpo_steps/stages/sft.py), and
their records, in run order. Two modules serve one stage each: policy_pairs.py (train_reward's preference pairs
sampled from the starting policy) and training_eval.py (grpo's held-out accuracy during training).

A record (grpo_steps/platform/stage.py's `Stage`) says what a stage runs, reads and writes; everything else
derives from these seven: the CLI (`grpo <stage>`, its help), the Prefect tasks (retries, caching, print capture)
and the flow's cache keys (flows/cache.py), the settings logged on each stage's MLflow run, the ranks of a
launched stage, and dvc.yaml (`grpo dvc-yaml`; tests/flows/test_dvc_pipeline.py checks the committed file
is current), so `grpo run` and `dvc repro` skip exactly the same unchanged stages.

A stage reads only the params keys its record declares (tests/stages/test_stage_contracts.py records every
key a stage reads and fails on an undeclared one), besides the platform's sections (PLATFORM_SECTIONS).

Stage functions are named by import path, so importing this package (for `grpo --help`) does not import torch,
transformers or mlflow.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpo_steps.platform.config import Config, ModelConfig
from grpo_steps.platform.stage import Out, Stage


def _v(*names: str) -> Callable[[Config], list[Path]]:
    return lambda cfg: [cfg.paths.validated_file(n) for n in names]


def _user_files(cfg: Config) -> list[Path]:
    d = cfg.data
    if d.source != "files":
        return []
    given = (d.train, d.eval, d.test, d.preferences_train, d.preferences_eval)
    return [Path(p) for p in given if p]


def _local_model(name: str | None) -> list[Path]:
    """A pretrained model or backbone named in params.yaml, when it is a local folder (not a hub name)."""
    return [Path(name)] if name and Path(name).is_dir() else []


def _reward_pairs(cfg: Config) -> list[Path]:
    """The pairs' source: the preference files, or the prompts the starting policy is sampled on."""
    if cfg.reward_model.pairs == "policy":
        return _v("train", "eval")(cfg) + [cfg.paths.sft_policy()]
    return _v("preferences_train", "preferences_eval")(cfg)


def _reward_init_model(cfg: Config) -> list[Path]:
    """The weights the reward model starts from: a local backbone, or the starting policy (models/sft)."""
    rc = cfg.reward_model
    if rc.backbone:
        return _local_model(rc.backbone)
    return [cfg.paths.sft_policy()] if rc.init == "policy" else []


# the model keys sft and train_reward read: all but the LoRA adapter, which only grpo trains
# the model as sft and train_reward build it (LoRA and sharding are the grpo stage's)
_MODEL = tuple(f"model.{k}" for k in ModelConfig.model_fields if k not in ("lora", "sharding"))
# the trainers' max_length
_TRAIN_LENGTHS = ("validate.max_prompt_tokens", "validate.max_answer_tokens", "validate.max_completion_tokens")
_RENDER = ("data.system_prompt", "data.chat_template")  # how prompts are rendered (grpo_steps/data/prompts.py)

_RECORDS: tuple[Stage, ...] = (
    Stage(
        "prepare", "grpo_steps.stages.prepare:prepare",
        "generate the task's train/eval/test prompts and preference pairs (or ingest your files) and build the "
        "tokenizer; writes data/prepared, models/tokenizer",
        code=("grpo_steps/stages/prepare.py", "grpo_steps/data/task.py", "grpo_steps/data/tokenizer.py",
              "grpo_steps/data/ingest.py"),
        params=("seed", "task", "data"),
        deps=_user_files,  # dvc.yaml cannot name them (they live in params); `grpo run` hashes them
        outputs=(Out("prepared"), Out("tokenizer")),
        notes={"data": "with `data.source: files`, `dvc repro -f -s prepare` after editing those files in place"},
    ),
    Stage(
        "validate", "grpo_steps.stages.validate:validate",
        "check every prepared file against its pandera schema, all failures listed; reads data/prepared, writes "
        "data/validated and reports/validation.{json,md}",
        code=("grpo_steps/stages/validate.py", "grpo_steps/data/schemas.py", "grpo_steps/data/prompts.py"),
        # tokens are counted with the policy's tokenizer, on prompts rendered as the policy sees them
        params=("validate", "model.pretrained", "model.trust_remote_code", *_RENDER),
        deps=lambda cfg: [cfg.paths.prepared(), cfg.paths.tokenizer(), *_local_model(cfg.model.pretrained)],
        outputs=(Out("validated"), Out("validation_report", kind="metrics"),
              Out("validation_summary"),
              Out("quarantine", note="rows set aside with their reasons (empty unless validate.on_failure: "
                  "quarantine)")),
    ),
    Stage(
        "sft", "grpo_steps.stages.sft:sft",
        "cold-start the policy with supervised fine-tuning (TRL SFTTrainer) on the train demonstrations; "
        "writes models/sft, the starting policy",
        code=("grpo_steps/stages/sft.py", "grpo_steps/platform/modeling.py", "grpo_steps/data/prompts.py",
              "grpo_steps/grpo/tokens.py", "grpo_steps/platform/trainer_checkpoints.py"),
        params=("seed", *_MODEL, "sft", *_TRAIN_LENGTHS, *_RENDER),
        deps=lambda cfg: [*_v("train")(cfg), cfg.paths.tokenizer(), *_local_model(cfg.model.pretrained)],
        outputs=(Out("sft_policy"),
                 Out("sft_checkpoints", persist=True,
                     note="resumable checkpoints (grpo_steps/platform/trainer_checkpoints.py), emptied on success")),
        retries=1, log_prints=False, launched=True,
    ),
    Stage(
        "train_reward", "grpo_steps.stages.train_reward:train_reward",
        "train the Bradley-Terry reward model from the starting policy on the preference pairs and gate on its "
        "held-out pairwise accuracy; writes models/reward, reports/reward_model.json",
        code=("grpo_steps/stages/train_reward.py", "grpo_steps/platform/modeling.py", "grpo_steps/data/prompts.py",
              "grpo_steps/platform/judge.py", "grpo_steps/stages/policy_pairs.py", "grpo_steps/grpo"),
        # with reward_model.pairs: policy, pairs are the starting policy's samples, judged as evaluate judges
        params=("seed", *_MODEL, "reward_model", *_TRAIN_LENGTHS, *_RENDER, "grpo.max_completion_length",
                "grpo.generation_backend", "grpo.reward_functions", "evaluate.accuracy"),
        deps=lambda cfg: list(dict.fromkeys([*_reward_pairs(cfg), cfg.paths.tokenizer(), *_reward_init_model(cfg)])),
        outputs=(Out("reward_model"), Out("reward_report", kind="metrics")),
        retries=1, log_prints=False, launched=True,
        notes={"models/sft": "the reward model starts from the starting policy (reward_model.init: policy)"},
    ),
    Stage(
        "grpo", "grpo_steps.stages.grpo:train_grpo",
        "optimise the policy with GRPO against the weighted reward functions; reads models/sft, models/reward, "
        "writes models/grpo, reports/grpo_steps.csv and resumable checkpoints",
        code=("grpo_steps/grpo", "grpo_steps/stages/grpo.py", "grpo_steps/platform/checkpoint.py",
              "grpo_steps/platform/modeling.py", "grpo_steps/data/prompts.py", "grpo_steps/stages/training_eval.py",
              "grpo_steps/platform/judge.py"),
        params=("seed", "grpo", "model.trust_remote_code", "model.precision", "model.activation_checkpointing",
                "model.dtype", "model.lora", "model.sharding", "evaluate.accuracy",
                "reward_model.trust_remote_code", *_RENDER),
        # the eval split for the held-out accuracy during training (grpo.eval_every)
        deps=lambda cfg: [*_v("train", "eval")(cfg), cfg.paths.sft_policy(), cfg.paths.reward_model()],
        outputs=(Out("grpo_policy"),
              Out("grpo_checkpoints", persist=True,
                  note="resumable checkpoints (grpo_steps/platform/checkpoint.py), kept so a retried stage resumes"),
              Out("grpo_curve", kind="plots", plot={"x": "step", "y": "reward"})),
        retries=1, log_prints=False, launched=True,  # a retry resumes from the stage's checkpoints
    ),
    Stage(
        "evaluate", "grpo_steps.stages.evaluate:evaluate",
        "compare the starting and GRPO policies (and the registry's champion) on the held-out test split; writes "
        "reports/metrics.json, samples.jsonl, eval.png",
        code=("grpo_steps/stages/evaluate.py", "grpo_steps/grpo", "grpo_steps/platform/modeling.py",
              "grpo_steps/data/prompts.py", "grpo_steps/platform/judge.py"),
        # The registry's champion is evaluated too: which registry (tracking) and model name matter.
        params=("seed", "evaluate", "grpo.max_completion_length", "grpo.generation_backend", "grpo.reward_functions",
                "model.trust_remote_code", "model.dtype",
                "reward_model.trust_remote_code", "registry.model_name", "tracking.tracking_uri", *_RENDER),
        deps=lambda cfg: [*_v("test")(cfg), cfg.paths.sft_policy(), cfg.paths.grpo_policy(),
                          cfg.paths.reward_model(), cfg.paths.grpo_curve()],
        outputs=(Out("samples"), Out("metrics", kind="metrics"),
              Out("eval_plot", kind="plots")),
        retries=1,  # prints the comparison table into the run's logs
        notes={"registry.model_name": "evaluate also scores the registry's current champion"},
    ),
    Stage(
        "register", "grpo_steps.stages.register:register",
        "register the GRPO policy in the MLflow registry behind the champion/challenger gate; writes "
        "reports/registration.json",
        code=("grpo_steps/stages/register.py", "grpo_steps/platform/lineage.py"),
        # the version's description names the base model and the data it was trained on
        params=("registry", "tracking", "model.trust_remote_code", "model.dtype", "model.pretrained", "seed",
                "task.format",
                "data.source", "data.train"),
        deps=lambda cfg: [cfg.paths.grpo_policy(), cfg.paths.metrics()],
        outputs=(Out("registration", cache=False,
                     note="a receipt of a side effect on the registry; registering the same weights again returns "
                     "the existing version"),),
        retries=2, cached=False,  # a side effect on the registry: never skipped
    ),
)
# The one registry, in run order: what the CLI, the flow, the rank processes and dvc.yaml look stages up in.
STAGES: dict[str, Stage] = {s.name: s for s in _RECORDS}

def run_stage(name: str, cfg: Config, **kwargs: Any) -> Any:
    """`grpo <name>`: the stage through its record, tracked (see `Stage.__call__`)."""
    return STAGES[name](cfg, **kwargs)


