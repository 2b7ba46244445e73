"""The pipeline's stages in order: one name, one function each. The CLI, the Prefect flow and dvc.yaml
all run exactly these.

Each stage also declares what it reads and writes (`STAGE_SPECS`): its source files, its params.yaml keys,
its input files and folders, its outputs. dvc.yaml says the same for the default `paths`
(tests/test_dvc_pipeline.py checks that the two agree); the Prefect flow derives its cache keys from it, so
`grpo run` and `dvc repro` skip exactly the same unchanged stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo_steps.config import Config


def grpo_checkpoint_dir(cfg: Config) -> Path:
    """Where the grpo stage keeps its resumable checkpoints (a persistent DVC output)."""
    own = getattr(cfg.paths, "grpo_checkpoints", None)  # when config.py names it, that wins
    return Path(own()) if callable(own) else Path(cfg.paths.models_dir) / "grpo_checkpoints"


def _prepare(cfg: Config) -> Any:
    from grpo_steps.prepare import prepare

    return prepare(cfg)


def _validate(cfg: Config) -> Any:
    from grpo_steps.validate import validate

    return validate(cfg)


def _train_reward(cfg: Config) -> Any:
    from grpo_steps.train_reward import train_reward

    return train_reward(cfg)


def _sft(cfg: Config) -> Any:
    from grpo_steps.sft import sft

    return sft(cfg)


def _grpo(cfg: Config) -> Any:
    from grpo_steps.train_grpo import train_grpo

    result = train_grpo(cfg)
    # The checkpoint folder is an output of the stage in dvc.yaml: it exists even when nothing was kept in it.
    grpo_checkpoint_dir(cfg).mkdir(parents=True, exist_ok=True)
    return result


def _evaluate(cfg: Config) -> Any:
    from grpo_steps.evaluate import evaluate

    return evaluate(cfg)


def _register(cfg: Config) -> Any:
    from grpo_steps.register import register

    return register(cfg)


# Imports are deferred so `grpo --help` and `grpo prepare` do not pay for torch + transformers + mlflow.
STAGES: dict[str, tuple[Callable[[Config], Any], str]] = {
    "prepare": (_prepare, "generate the task's train/eval/test prompts, preference pairs and the tokenizer"),
    "validate": (_validate, "check every prepared file against its pandera schema (all failures listed)"),
    "sft": (_sft, "cold-start the policy with supervised fine-tuning (TRL SFTTrainer)"),
    "train_reward": (_train_reward, "train the Bradley-Terry reward model (TRL RewardTrainer) from the starting "
                     "policy and gate on its held-out pairwise accuracy"),
    "grpo": (_grpo, "optimise the policy with GRPO against the weighted reward functions"),
    "evaluate": (_evaluate, "compare the starting and GRPO policies on the held-out test split"),
    "register": (_register, "register the GRPO policy in the MLflow registry behind the promotion gate"),
}


@dataclass(frozen=True)
class StageSpec:
    """What one stage reads and writes; paths are functions of the config (params.yaml's `paths`)."""

    name: str
    code: tuple[str, ...]  # source files and folders, relative to the repository root
    params: tuple[str, ...]  # params.yaml keys: whole sections or dotted keys, as in dvc.yaml
    deps: Callable[[Config], list[Path]]  # data and model inputs
    outs: Callable[[Config], list[Path]]  # outputs; every one exists after a successful run
    # Outputs kept between runs and not part of the result (DVC `persist: true`): resumable checkpoints.
    persistent_outs: Callable[[Config], list[Path]] = lambda cfg: []


def _v(cfg: Config, *names: str) -> list[Path]:
    return [cfg.paths.validated() / f"{n}.jsonl" for n in names]


def _r(cfg: Config, *names: str) -> list[Path]:
    return [cfg.paths.reports() / n for n in names]


def _user_files(cfg: Config) -> list[Path]:
    d = cfg.data
    if d.source != "files":
        return []
    given = (d.train, d.eval, d.test, d.preferences_train, d.preferences_eval)
    return [Path(p) for p in given if p]


def _local_model(name: str | None) -> list[Path]:
    """A pretrained model or backbone named in params.yaml, when it is a local folder (not a hub name)."""
    return [Path(name)] if name and Path(name).is_dir() else []


def _reward_init_model(cfg: Config) -> list[Path]:
    """The weights the reward model starts from: a local backbone, or the starting policy (models/sft)."""
    rc = cfg.reward_model
    if rc.backbone:
        return _local_model(rc.backbone)
    return [cfg.paths.sft_policy()] if rc.init == "policy" else []


_TRAIN_LENGTHS = ("validate.max_prompt_tokens", "validate.max_answer_tokens")  # the trainers' max_length

STAGE_SPECS: dict[str, StageSpec] = {s.name: s for s in [
    StageSpec(
        "prepare",
        code=("grpo_steps/prepare.py", "grpo_steps/task.py", "grpo_steps/tokenizer.py", "grpo_steps/ingest.py"),
        params=("seed", "task", "data"),
        deps=_user_files,  # dvc.yaml cannot name them (they live in params); `grpo run` hashes them
        outs=lambda cfg: [cfg.paths.prepared(), cfg.paths.tokenizer()],
    ),
    StageSpec(
        "validate",
        code=("grpo_steps/validate.py", "grpo_steps/schemas.py"),
        params=("validate",),
        deps=lambda cfg: [cfg.paths.prepared(), cfg.paths.tokenizer()],
        outs=lambda cfg: [cfg.paths.validated(), *_r(cfg, "validation.json", "validation.md", "quarantine")],
    ),
    StageSpec(
        "sft",
        code=("grpo_steps/sft.py", "grpo_steps/modeling.py"),
        params=("seed", "model", "sft", *_TRAIN_LENGTHS),
        deps=lambda cfg: [*_v(cfg, "train"), cfg.paths.tokenizer(), *_local_model(cfg.model.pretrained)],
        outs=lambda cfg: [cfg.paths.sft_policy()],
    ),
    StageSpec(
        "train_reward",
        code=("grpo_steps/train_reward.py", "grpo_steps/modeling.py", "grpo_steps/grpo/reward_model.py"),
        params=("seed", "model", "reward_model", *_TRAIN_LENGTHS),
        deps=lambda cfg: [*_v(cfg, "preferences_train", "preferences_eval"), cfg.paths.tokenizer(),
                          *_reward_init_model(cfg)],
        outs=lambda cfg: [cfg.paths.reward_model(), *_r(cfg, "reward_model.json")],
    ),
    StageSpec(
        "grpo",
        code=("grpo_steps/grpo", "grpo_steps/train_grpo.py", "grpo_steps/checkpoint.py", "grpo_steps/modeling.py"),
        params=("seed", "grpo", "model.trust_remote_code", "model.precision", "model.activation_checkpointing"),
        deps=lambda cfg: [*_v(cfg, "train"), cfg.paths.sft_policy(), cfg.paths.reward_model()],
        outs=lambda cfg: [cfg.paths.grpo_policy(), *_r(cfg, "grpo_steps.csv")],
        persistent_outs=lambda cfg: [grpo_checkpoint_dir(cfg)],
    ),
    StageSpec(
        "evaluate",
        code=("grpo_steps/evaluate.py", "grpo_steps/grpo", "grpo_steps/modeling.py"),
        # The registry's champion is evaluated too: which registry (tracking) and model name matter.
        params=("seed", "evaluate", "grpo.max_completion_length", "model.trust_remote_code", "registry.model_name",
                "tracking.tracking_uri"),
        deps=lambda cfg: [*_v(cfg, "test"), cfg.paths.sft_policy(), cfg.paths.grpo_policy(),
                          cfg.paths.reward_model(), *_r(cfg, "grpo_steps.csv")],
        outs=lambda cfg: _r(cfg, "metrics.json", "samples.jsonl", "eval.png"),
    ),
    StageSpec(
        "register",
        code=("grpo_steps/register.py", "grpo_steps/lineage.py"),
        params=("registry", "tracking", "model.trust_remote_code"),
        deps=lambda cfg: [cfg.paths.grpo_policy(), *_r(cfg, "metrics.json")],
        outs=lambda cfg: _r(cfg, "registration.json"),
    ),
]}
assert list(STAGE_SPECS) == list(STAGES), "every stage needs a spec, in the same order"


def param_values(cfg: Config, keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The values of params.yaml keys (sections or dotted keys) in the resolved config."""
    tree = cfg.as_dict()
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out
