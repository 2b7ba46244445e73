"""The whole configuration: `params.yaml` parsed and checked before any work starts.

Each setting is declared once, with its type, default and doc, in the room that owns it: the algorithm's in
grpo_steps/grpo/settings.py, the data layer's (`task`, `data`) in grpo_steps/data/settings.py, the stages' and the
platform's here. `Config` composes them. Every section forbids unknown keys, so a typo in params.yaml fails loudly
with the key's dotted path instead of being silently ignored; params.yaml states every setting at its declared
default (tests/platform/test_configs.py).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from grpo_steps.data.settings import DataConfig, TaskConfig, data_file_name
from grpo_steps.errors import UserError
from grpo_steps.grpo.settings import GRPOSettings, Settings


class ConfigError(UserError, ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the file and the key."""


WEIGHTS_FILE = "model.safetensors"  # a saved model's weights in its folder (safetensors only)


class PathsConfig(Settings):
    """The catalog: where every file a stage reads or writes lives, relative to the working directory (the repo
    root). Stages, the stage records, the flow and the tests ask these methods; no file name is spelled twice."""

    data_dir: str = Field("data", description="prepared and validated data files (DVC-tracked)")
    models_dir: str = Field("models", description="tokenizer, models and GRPO checkpoints (DVC-tracked)")
    reports_dir: str = Field("reports", description="validation reports, metrics, curves and plots")

    def prepared(self) -> Path:
        return Path(self.data_dir) / "prepared"

    def validated(self) -> Path:
        return Path(self.data_dir) / "validated"

    def prepared_file(self, name: str) -> Path:
        """data/prepared/<name>.jsonl, name one of DATA_FILES."""
        return self.prepared() / data_file_name(name)

    def validated_file(self, name: str) -> Path:
        """data/validated/<name>.jsonl, name one of DATA_FILES."""
        return self.validated() / data_file_name(name)

    def tokenizer(self) -> Path:
        return Path(self.models_dir) / "tokenizer"

    def reward_model(self) -> Path:
        return Path(self.models_dir) / "reward"

    def sft_policy(self) -> Path:
        return Path(self.models_dir) / "sft"

    def grpo_policy(self) -> Path:
        return Path(self.models_dir) / "grpo"

    def sft_checkpoints(self) -> Path:
        """The sft stage's resumable checkpoints, one folder per training setup (a persistent DVC output), emptied
        once the stage's output is written."""
        return Path(self.models_dir) / "sft_checkpoints"

    def grpo_checkpoints(self) -> Path:
        """The grpo stage's resumable checkpoints, one folder per training setup (a persistent DVC output)."""
        return Path(self.models_dir) / "grpo_checkpoints"

    def reports(self) -> Path:
        return Path(self.reports_dir)

    def validation_report(self) -> Path:
        return self.reports() / "validation.json"

    def validation_summary(self) -> Path:
        return self.reports() / "validation.md"

    def quarantine(self) -> Path:
        return self.reports() / "quarantine"

    def reward_report(self) -> Path:
        return self.reports() / "reward_model.json"

    def grpo_curve(self) -> Path:
        return self.reports() / "grpo_steps.csv"

    def metrics(self) -> Path:
        return self.reports() / "metrics.json"

    def samples(self) -> Path:
        return self.reports() / "samples.jsonl"

    def eval_plot(self) -> Path:
        return self.reports() / "eval.png"

    def registration(self) -> Path:
        return self.reports() / "registration.json"

    @staticmethod
    def weights(model_dir: str | Path) -> Path:
        return Path(model_dir) / WEIGHTS_FILE


class LoraConfig(Settings):
    """A LoRA adapter (peft.LoraConfig) on the policy during grpo."""

    r: int = Field(16, ge=1, description="rank of the update matrices")
    alpha: float = Field(32, gt=0, description="scaling: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]); all-linear: every linear layer "
        "but the output head",
    )


class ModelConfig(Settings):
    """The policy (and reward-model backbone) architecture, built from a config: no hub download."""

    architecture: Literal["qwen2", "llama"] = Field("qwen2", description="the built policy's architecture")
    hidden_size: int = Field(128, ge=8, description="the built policy's hidden width")
    num_layers: int = Field(4, ge=1, description="the built policy's transformer layers")
    num_heads: int = Field(4, ge=1, description="the built policy's attention heads")
    intermediate_size: int = Field(384, ge=8, description="the built policy's MLP width")
    max_position_embeddings: int = Field(64, ge=8, description="the built policy's longest sequence")
    pretrained: str | None = Field(
        None, description="a local path or hub name of a pretrained policy; when set, the SFT cold start is skipped"
    )
    trust_remote_code: bool = Field(
        False, description="run Python code shipped with a model directory (config auto_map); off unless set here"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="mixed precision of every trainer (sft, train_reward, grpo), passed to TRL and accelerate "
        "explicitly: fp32 by default, since bf16 autocast on a CPU without native bf16 (AVX2 only) is ~8x slower",
    )
    activation_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (saves memory, costs ~30% time) in sft, "
        "train_reward and grpo alike; passed to TRL explicitly, whose configs turn it on by default",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="the dtype the policy, reference and reward model are stored in (weights, gradients and "
        "optimizer state); auto: a pretrained checkpoint's own (float32 for a model built from this config). "
        "Log-probs and losses are computed in float32 whatever this is. bfloat16 halves memory; on a CPU without "
        "native bf16 it is slower",
    )
    lora: LoraConfig | None = Field(
        None, description="train a LoRA adapter (peft) in grpo instead of every weight: the reference is the base "
        "model with the adapter off (no second copy), checkpoints hold the adapter, models/grpo the merged model",
    )
    sharding: Literal["replicate", "fsdp2"] = Field(
        "replicate", description="how the grpo stage spreads the policy over several processes: replicate = a "
        "whole copy on each (DDP); fsdp2 = each weight, its gradient and AdamW state split over them (torch's "
        "fully_shard per decoder layer), for a model that does not fit one device. The same update either way; "
        "with one process there is nothing to shard. Not with lora (an adapter is small enough to replicate)",
    )

    @model_validator(mode="after")
    def _sharding_fits(self) -> ModelConfig:
        if self.sharding == "fsdp2" and self.lora is not None:
            raise ValueError("model.sharding fsdp2 with model.lora: a LoRA adapter is small enough to replicate; "
                             "use model.sharding: replicate")
        if self.sharding == "fsdp2" and self.precision == "fp16":
            raise ValueError("model.sharding fsdp2 with model.precision fp16: fp16's loss scaling is not driven "
                             "through sharded gradients here; use bf16 (or fp32)")
        return self

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class ValidateConfig(Settings):
    """Data contracts checked by the validate stage, and what happens to rows that break them."""

    on_failure: Literal["fail", "quarantine"] = Field(
        "fail", description="fail: stop, data/validated untouched; quarantine: set bad rows aside with reasons"
    )
    max_prompt_tokens: int = Field(32, ge=1, description="longest rendered prompt, in the policy's tokens")
    max_answer_tokens: int = Field(8, ge=1, description="longest answer, in the policy's tokens")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="bound on completions: preference chosen/rejected and train demonstrations; "
        "unset: max_answer_tokens"
    )
    unique_preference_pairs: bool = Field(
        False, description="flag exact duplicate (prompt, chosen, rejected) rows within a preference file"
    )

    def completion_tokens(self) -> int:
        return self.max_completion_tokens or self.max_answer_tokens


class RewardModelConfig(Settings):
    """The Bradley-Terry reward model (TRL RewardTrainer): a sequence-classification head on a backbone."""

    head: Literal["likelihood", "scalar"] = Field(
        "likelihood",
        description="likelihood: the score is beta x the completion's log-likelihood under a causal LM trained "
        "with the Bradley-Terry loss (the policy's own LM head is the reward head, nothing starts random); "
        "scalar: a sequence-classification head on the last token (TRL RewardTrainer, InstructGPT)",
    )
    beta: float = Field(1.0, gt=0, description="likelihood head: score = beta * sum of completion log-probs")
    length_normalize: bool = Field(
        False, description="likelihood head: the mean log-prob per completion token instead of the sum (SimPO); "
        "for completions of varied length, where a sum rewards writing less",
    )
    init: Literal["policy", "config"] = Field(
        "policy",
        description="what the reward model starts from when `backbone` is unset: 'policy' = the starting policy "
        "(models/sft, the output of the sft stage), as in InstructGPT and DeepSeekMath, so it starts with the "
        "policy's knowledge of the task; 'config' = fresh weights built from the `model` section",
    )
    backbone: str | None = Field(
        None, description="a local path or hub name loaded with AutoModelForSequenceClassification(num_labels=1), "
        "safetensors only, with its own tokenizer; overrides `init`"
    )
    trust_remote_code: bool = Field(False, description="allow the backbone's custom code (or model.trust_remote_code)")
    epochs: float = Field(2.0, gt=0, description="passes over the train pairs (a fraction: part of one)")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate, cosine schedule")
    batch_size: int = Field(64, ge=1, description="preference pairs per optimizer step")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="share of the steps the learning rate warms up")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="pull rewards towards zero mean: + coef * mean((r_chosen + r_rejected)^2)"
    )
    margin: float | None = Field(
        None, description="a constant margin for every pair: loss = -log sigmoid(r_chosen - r_rejected - margin)"
    )
    margin_column: str | None = Field(
        None, description="a numeric column of the preference pairs holding each pair's margin"
    )
    min_pairwise_accuracy: float = Field(
        0.7, ge=0, le=1, description="gate: the pipeline stops before GRPO when held-out accuracy is below this"
    )
    pairs: Literal["data", "policy"] = Field(
        "data", description="data: the prepared preference files; policy: sampled from the starting policy on "
        "the train (held out: eval) prompts, a verified-right completion over a wrong one of the same prompt",
    )
    samples_per_prompt: int = Field(8, ge=2, description="pairs: policy: completions sampled per prompt")
    pairs_per_prompt: int = Field(1, ge=1, description="pairs: policy: at most this many pairs per prompt")
    sample_prompts: int | None = Field(
        None, ge=1, description="pairs: policy: sample on at most this many train prompts (unset: all)",
    )

    @model_validator(mode="after")
    def _one_margin(self) -> RewardModelConfig:
        if self.margin is not None and self.margin_column is not None:
            raise ValueError("set margin (a constant) or margin_column (per pair), not both")
        return self


class SFTConfig(Settings):
    """Cold start: a short supervised run so GRPO starts from a policy that is sometimes right."""

    enabled: Literal["auto"] | bool = Field(
        "auto", description="auto: run for a policy built from `model`, skip for a pretrained one "
        "(`model.pretrained`, which is then the starting policy as it is); true: fine-tune the pretrained policy "
        "on the demonstrations too (a reasoning cold start); false: never",
    )
    max_steps: int = Field(2000, ge=1, description="optimizer steps of the cold start")
    learning_rate: float = Field(
        1e-3, gt=0, description="1e-3 imitates the weak teacher cleanly on every seed measured; 3e-3 left one "
        "seed with 0.38 held-out accuracy, half its errors neither right nor the teacher's slip",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    batch_size: int = Field(64, ge=1, description="demonstrations per optimizer step, all processes together")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="share of the steps the learning rate warms up")
    checkpoint_every: int = Field(
        500, ge=0, description="a resumable checkpoint every N optimizer steps (0: none): a rerun after a kill "
        "resumes from the newest (same settings, inputs and code)")
    keep_checkpoints: int = Field(1, ge=1, description="how many of the newest sft checkpoints are kept")


class RewardFunctionConfig(Settings):
    """One reward function: a built-in name or an import path `module:function`, its weight, and the keyword
    arguments that build it (for `math_accuracy`, `format`, `overlong_penalty`, or a factory of your own)."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="math_accuracy: timeout_s; format: pattern; overlong_penalty: "
        "max_length (default grpo.max_completion_length), buffer (default a quarter of it)",
    )


class GRPOConfig(GRPOSettings):
    """The grpo stage: the algorithm's settings (grpo_steps/grpo/settings.py, declared there) and the stage's own."""

    steps: int = Field(100, ge=1, description="optimizer steps (one generation batch per step when mu = 1)")
    reward_functions: list[RewardFunctionConfig] = Field(
        default_factory=lambda: [
            RewardFunctionConfig(name="exact_match", weight=1.0),
            RewardFunctionConfig(name="reward_model", weight=0.1),
        ],
        description="the rewards, each a name (grpo/rewards.py's registry, `reward_model`, or module:function) "
        "with its weight and kwargs; a completion's reward is their weighted sum",
    )
    eval_every: int = Field(
        20, ge=0, description="every N steps (and at the last), greedy accuracy on the eval split and the reward "
        "model's mean score, logged as eval/accuracy and eval/reward_model_score; 0: off",
    )
    eval_prompts: int | None = Field(None, ge=1, description="eval prompts used for eval_every; unset: all of them")
    select_best: bool = Field(
        False, description="models/grpo is the policy of the step with the best eval/accuracy (the first of "
        "equals), not the last one; needs eval_every",
    )
    checkpoint_every: int = Field(
        25, ge=0, description="save a resumable checkpoint every N steps (0: only at the end); a rerun resumes"
    )
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept (older ones are deleted)")

    @model_validator(mode="after")
    def _consistent(self) -> GRPOConfig:
        if self.select_best and not self.eval_every:
            raise ValueError("grpo.select_best needs grpo.eval_every > 0 (the best step is chosen by eval accuracy)")
        if not self.reward_functions:
            raise ValueError("grpo.reward_functions is empty: configure at least one reward function")
        seen: dict[str, int] = {}
        for i, rf in enumerate(self.reward_functions):
            if not rf.name.strip():
                raise ValueError(f"grpo.reward_functions[{i}].name is empty")
            if rf.name in seen:
                raise ValueError(f"grpo.reward_functions[{i}].name {rf.name!r} repeats "
                                 f"grpo.reward_functions[{seen[rf.name]}] (names must be unique)")
            seen[rf.name] = i
            if rf.weight != rf.weight or rf.weight in (float("inf"), float("-inf")):
                raise ValueError(f"grpo.reward_functions[{i}].weight must be a finite number (got {rf.weight})")
        return self


class EvaluateConfig(Settings):
    pass_k: int = Field(4, ge=1, description="k for pass@k and maj@k (sampled at temperature 1)")
    accuracy: Literal["auto", "exact_match", "math_accuracy"] = Field(
        "auto", description="how a completion's answer is judged: exact_match (the whole completion is the "
        "answer) or math_accuracy (math-verify: the final answer, equivalent forms); auto: math_accuracy when "
        "grpo.reward_functions lists it, else exact_match",
    )
    n_samples_logged: int = Field(20, ge=0, description="test completions written to reports/samples.jsonl")
    compare_champion: bool = Field(
        True, description="also evaluate the registry's current `champion` version on the same test split"
    )


class RegisterConfig(Settings):
    model_name: str = Field("grpo-policy", description="the registered model's name in the MLflow registry")
    promotion_margin: float = Field(0.0, ge=0, description="held-out accuracy the new version must add over champion")


class TrackingConfig(Settings):
    tracking_uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI (a server URL in production); the MLFLOW_TRACKING_URI variable overrides it",
    )
    experiment: str = Field("grpo-pipeline", description="the MLflow experiment every run is logged in")
    artifact_location: str | None = Field(
        "mlartifacts",
        description="artifact root for a newly created experiment: a local folder, or a URI with a scheme "
        "(mlflow-artifacts:/..., s3://...); null: the tracking store's default",
    )
    system_metrics: bool = Field(True, description="log CPU/memory/disk/network (and GPU) metrics on the parent run")
    system_metrics_interval_s: float = Field(5.0, gt=0, description="seconds between system-metric samples")


class LaunchConfig(Settings):
    """How many processes the training stages (sft, train_reward, grpo) run on: torch's launcher (torchrun, c10d
    rendezvous) starts them as a child job of the stage when more than one is asked for; the other stages, and
    one process, run in the stage's own process. A platform setting, like `paths`: it moves the computation, not
    its result (the same weights within float tolerance on any layout), so it is in no stage's cache key.
    Each key may also come from the environment, `GRPO_LAUNCH_<KEY>` (e.g. GRPO_LAUNCH_NODES=2), which wins:
    how a Kubernetes job tells every pod the same layout (infra/README.md)."""

    processes_per_node: Literal["auto"] | int = Field(
        "auto", description="processes on each node: auto = one per visible GPU (CUDA_VISIBLE_DEVICES), 1 on a "
        "machine without one; or a number (gloo processes on CPU)",
    )
    nodes: int = Field(1, ge=1, description="nodes in each training stage's job; each node runs `grpo node` (or "
                       "the same stage command) and they meet at rdzv_endpoint")
    rdzv_endpoint: str | None = Field(
        None, description="host:port where the nodes rendezvous (node 0's address); unset: a private rendezvous "
        "on this machine (one node only)",
    )
    rdzv_backend: Literal["c10d"] = Field("c10d", description="torch elastic's rendezvous backend")
    rdzv_id: str = Field("grpo-pipeline", description="the job id every node of one run shares (a Kubernetes "
                         "job's name): nodes with another id never meet")
    join_timeout_s: int = Field(1800, ge=10, description="how long each stage's job waits at the rendezvous for "
                                "its nodes (and its ranks for the job) before it fails")
    shutdown_timeout_s: int = Field(30, ge=1, description="after a stop signal, seconds each rank has to exit "
                                    "before it is killed")

    @model_validator(mode="after")
    def _rendezvous_named(self) -> LaunchConfig:
        if isinstance(self.processes_per_node, int) and self.processes_per_node < 1:
            raise ValueError(f"launch.processes_per_node must be auto or >= 1 (got {self.processes_per_node})")
        if self.nodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"launch.nodes is {self.nodes}: set launch.rdzv_endpoint to host:port of node 0, "
                             "where the nodes meet")
        if self.rdzv_endpoint and not re.fullmatch(r"[^\s:]+:\d{1,5}", self.rdzv_endpoint):
            raise ValueError(f"launch.rdzv_endpoint must be host:port (got {self.rdzv_endpoint!r})")
        return self


class Config(Settings):
    seed: int = Field(0, description="the one seed: data, sampling, training and evaluation")
    paths: PathsConfig = Field(default_factory=PathsConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    registry: RegisterConfig = Field(default_factory=RegisterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def reward_trust_remote_code(self) -> bool:
        """Custom model code may run for the reward model when either section allows it."""
        return self.reward_model.trust_remote_code or self.model.trust_remote_code

    def params_hash(self) -> str:
        """A stable hash of every setting: part of each registered model's lineage."""
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def pick(tree: dict[str, Any], keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """{key: value} for params.yaml keys (sections or dotted keys) of a config tree (`Config.as_dict()`)."""
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """The setting names of the section at `loc` (a path of keys from the top), aliases as params.yaml spells them."""
    model: Any = Config
    for part in loc:
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        options = (getattr(field, "annotation", None), *get_args(getattr(field, "annotation", None)))  # X | None too
        model = next((a for a in options if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _format_errors(err: ValidationError, source: str, origins: dict[str, str]) -> str:
    """One line per error: the dotted key, what is wrong, the value given, where it was set when not in the file
    (`--set`, a GRPO_LAUNCH_ variable), and for an unknown key the closest declared one."""
    lines = [f"invalid configuration in {source}" + (" and its overrides" if origins else "") + ":"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        got = e.get("input")
        line = f"  - {key}: {e['msg']}" + ("" if isinstance(got, dict) else f" (got {got!r})")
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _section_fields(loc[:-1]), n=1, cutoff=0.6)
            if close:
                line += f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?"
        origin = next((o for k, o in origins.items() if key == k or key.startswith(k + ".") or k.startswith(key + ".")),
                      None)
        lines.append(line + (f" [set by {origin}]" if origin else ""))
    return "\n".join(lines)


def _set_by(overrides: list[str], key: str) -> str:
    """The last `--set` that gave `key`: the key itself, or a section holding it (`model.lora={r: 4}`)."""
    for item in reversed(overrides):
        given = item.split("=", 1)[0].strip()
        if key == given or key.startswith(given + "."):
            return f"--set {item}"
    return "--set"


def _origins(tree: dict[str, Any], origin: Any, where: str = "") -> dict[str, str]:
    """{dotted key: origin(key)} for every leaf of an override tree."""
    out: dict[str, str] = {}
    for name, value in tree.items():
        key = f"{where}.{name}".lstrip(".")
        out.update(_origins(value, origin, key) if isinstance(value, dict) and value else {key: origin(key)})
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[leaf] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings (values parsed as YAML) into a nested dict."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


LAUNCH_ENV_PREFIX = "GRPO_LAUNCH_"


def launch_from_environment() -> dict[str, Any]:
    """`launch` keys set by GRPO_LAUNCH_<KEY> variables, as an override tree: numbers parsed as YAML, text
    settings taken as they are (a job named `no` stays a name)."""
    found: dict[str, Any] = {}
    for name, field in LaunchConfig.model_fields.items():
        raw = os.environ.get(LAUNCH_ENV_PREFIX + name.upper(), "").strip()
        if raw:
            found[name] = raw if field.annotation in (str, str | None) else yaml.safe_load(raw)
    return {"launch": found} if found else {}


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Read params.yaml (or the defaults when path is None), apply `a.b=c` overrides, validate everything."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"configuration file not found: {path.resolve()}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    origins: dict[str, str] = {}  # dotted key -> where it was set, when not in the file
    if overrides:
        tree = parse_overrides(overrides)
        origins = _origins(tree, lambda k: _set_by(overrides, k))
        raw = _merge(raw, tree)
    environment = launch_from_environment()
    origins.update(_origins(environment, lambda k: LAUNCH_ENV_PREFIX + k.split(".", 1)[1].upper()))
    raw = _merge(raw, environment)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, origins)) from None
