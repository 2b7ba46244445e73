"""Stage `train_reward`: a Bradley-Terry reward model on the preference pairs.

By default (`reward_model.head: likelihood`) the model is the starting policy itself (models/sft, so this
stage runs after sft) fine-tuned so that `beta * log p(completion | prompt)` ranks chosen above rejected, in
our own short loop; `head: scalar` is TRL's RewardTrainer's sequence classifier, for hub reward models. The
backbone can also be fresh weights from the `model` section (`reward_model.init: config`) or
`reward_model.backbone` (a local folder or hub name, safetensors only). The loss is
`-log sigmoid(r_chosen - r_rejected - margin)`, with the margin a constant (`reward_model.margin`) or a
per-pair column (`reward_model.margin_column`).

Its held-out pairwise accuracy is the gate: below `reward_model.min_pairwise_accuracy` the pipeline stops
before GRPO, since optimising against a reward model that cannot rank is optimising noise."""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_schedule_with_warmup,
)
from trl import RewardConfig, RewardTrainer

from grpo_steps.data.files import DataFileError, read_jsonl
from grpo_steps.data.prompts import render
from grpo_steps.errors import UserError
from grpo_steps.grpo.reward_model import RewardModelFunction, bradley_terry_loss, encode_pairs, sequence_logps
from grpo_steps.platform.config import Config, ConfigError
from grpo_steps.platform.io import write_json
from grpo_steps.platform.judge import accuracy_judge
from grpo_steps.platform.modeling import (
    accelerate_precision,
    begin_stage,
    build_policy,
    build_reward_backbone,
    load_model,
    load_policy,
    load_tokenizer,
    per_process_batch,
    place,
    policy_tokenizer,
    require_safetensors,
    save_pretrained,
    split_trl_batch,
    trl_args,
    trl_warmup,
    written_once,
)
from grpo_steps.platform.results import Artifact, StageResult
from grpo_steps.platform.tracking import log_curve
from grpo_steps.stages.policy_pairs import sample_pairs

log = logging.getLogger(__name__)


class RewardGateError(UserError, RuntimeError):
    """The reward model ranks held-out pairs too poorly to train a policy against."""


def pairwise_accuracy(scorer: RewardModelFunction, pairs: list[dict]) -> float:
    return pairwise_report(scorer, pairs)["pairwise_accuracy"]


def pairwise_report(scorer: RewardModelFunction, pairs: list[dict]) -> dict[str, Any]:
    """Held-out pairwise accuracy (chosen scored above rejected), overall and per kind of rejected answer
    when the pairs say (`kind`), with the mean score margin."""
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer(prompts, [p["chosen"] for p in pairs])
    rejected = scorer(prompts, [p["rejected"] for p in pairs])
    wins = [c > r for c, r in zip(chosen, rejected, strict=True)]
    report: dict[str, Any] = {
        "pairwise_accuracy": sum(wins) / max(len(pairs), 1),
        "mean_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / max(len(pairs), 1),
    }
    by_kind: dict[str, list[bool]] = {}
    for p, w in zip(pairs, wins, strict=True):
        if p.get("kind"):
            by_kind.setdefault(str(p["kind"]), []).append(w)
    report["by_kind"] = {k: {"pairwise_accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_kind.items())}
    return report


def rendered(cfg: Config, tok: PreTrainedTokenizerBase, pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pairs with their prompts rendered by the one rendering every stage uses (grpo_steps/data/prompts.py)."""
    return [{**p, "prompt": render(tok, p["prompt"], cfg.data.system_prompt, cfg.data.chat_template)}
            for p in pairs]


def trust_remote_code(cfg: Config) -> bool:
    return cfg.reward_trust_remote_code()


def reward_init(cfg: Config) -> str:
    """Where the reward model's weights start: a backbone's name, `policy` or `config`."""
    return cfg.reward_model.backbone or cfg.reward_model.init


def build_reward_model(cfg: Config) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The untrained reward model and the tokenizer it reads text with.

    By default it starts from the starting policy (models/sft): its transformer already computes the task, and
    only the scalar head is new (InstructGPT, DeepSeekMath). `init: config` builds fresh weights instead. It is
    built on the CPU: training places it (`accelerator.prepare`, or TRL's Trainer, which calls it).
    """
    backbone = cfg.reward_model.backbone
    if backbone is None and cfg.reward_model.init == "config":  # built from the `model` section
        tok = policy_tokenizer(cfg)
        if cfg.reward_model.head == "likelihood":
            return build_policy(cfg.model.model_copy(update={"pretrained": None}), tok), tok
        return build_reward_backbone(cfg.model, tok), tok
    if backbone is None:
        path = cfg.paths.sft_policy()
        require_safetensors(path, "starting policy for the reward model (reward_model.init: policy; stage sft)")
        backbone, trust = str(path), cfg.model.trust_remote_code
    else:
        trust = trust_remote_code(cfg)
    what = "reward-model backbone (a local folder or hub name with safetensors weights and a tokenizer)"
    try:
        tok = load_tokenizer(backbone, trust_remote_code=trust, allow_hub=True)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"could not load the tokenizer of the {what} from {backbone}: {e}") from e
    if cfg.reward_model.head == "likelihood":
        model = load_model(backbone, what, trust_remote_code=trust, dtype=cfg.model.dtype, allow_hub=True)
    else:
        model = load_model(backbone, what, "classifier", trust_remote_code=trust, dtype=cfg.model.dtype,
                           allow_hub=True, num_labels=1)
    if model.config.pad_token_id is None:  # the head pools the last non-pad token: it must know the pad id
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _margins(pairs: list[dict[str, Any]], cfg: Config, source: str) -> list[float] | None:
    rc = cfg.reward_model
    if rc.margin is not None:
        return [float(rc.margin)] * len(pairs)
    if rc.margin_column is None:
        return None
    col, out = rc.margin_column, []
    for i, p in enumerate(pairs, start=1):
        if col not in p:
            raise DataFileError(
                f"{source}:{i}: reward_model.margin_column={col!r} but the pair has no such column "
                f"(columns: {sorted(p)}); keep the column through prepare/validate or unset margin_column"
            )
        value = p[col]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DataFileError(f"{source}:{i}: margin {col!r} must be a finite number, got {value!r}")
        out.append(float(value))
    return out


def pairs_dataset(pairs: list[dict[str, Any]], cfg: Config, source: str = "the preference pairs") -> Dataset:
    """prompt/chosen/rejected (+ `margin`, which RewardTrainer subtracts inside the Bradley-Terry loss)."""
    rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
    margins = _margins(pairs, cfg, source)
    if margins is not None:
        for row, m in zip(rows, margins, strict=True):
            row["margin"] = m
    return Dataset.from_list(rows)


def _train_scalar(cfg: Config, model, tok, train_pairs: list[dict], source: str, scratch: Path) -> PreTrainedModel:
    """TRL's RewardTrainer: a sequence-classification head, Bradley-Terry loss (+ margin, centering); each
    optimizer step sees `reward_model.batch_size` pairs in all, however many processes share them."""
    rc = cfg.reward_model
    # Pairs were bounded in tokens of the project's tokenizer by `validate`; another backbone's tokenizer
    # counts differently, so there nothing is filtered out.
    max_length = None if rc.backbone else cfg.validate_.max_prompt_tokens + cfg.validate_.completion_tokens() + 2
    args = RewardConfig(
        output_dir=str(scratch / "_trainer"),
        num_train_epochs=rc.epochs,
        per_device_train_batch_size=rc.batch_size,  # the global batch: split over the processes below
        learning_rate=rc.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=trl_warmup(rc.warmup_ratio),  # a ratio: transformers 5 reads warmup_steps < 1 as one
        center_rewards_coefficient=rc.center_rewards_coefficient,
        max_length=max_length,
        disable_tqdm=False,
        **trl_args(cfg.seed, cfg.model),
    )
    split_trl_batch(args, rc.batch_size, "reward_model.batch_size")
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs_dataset(train_pairs, cfg, source),
                            processing_class=tok)  # places the model on the accelerator's device
    trainer.train()
    return trainer.model


def _train_likelihood(cfg: Config, model, tok, train_pairs: list[dict], source: str) -> PreTrainedModel:
    """Bradley-Terry on the completion log-likelihood of a causal LM (grpo_steps/grpo/reward_model.py).

    Seeded shuffles, AdamW with warm-up and cosine decay, gradient clipping at 1, through accelerate (the
    precision of `model.precision`, any device, DDP on a launched stage's processes); loss, accuracy and margin
    logged to MLflow every 10 steps as reward_model/train/*.

    On N processes the computation is the one process's: every process draws the same global batches of
    `reward_model.batch_size` pairs, in the same order, and trains on its contiguous share of each
    (batch_size / N pairs; a ConfigError when N does not divide it). Its loss is the mean over its share, and
    DDP averages the gradients over the processes: the mean of N equal shares' means is the mean over the global
    batch, the one process's loss, so no rescaling is needed. The logged loss, accuracy and margin are the
    global batch's, averaged over the processes alike; the main process logs them.
    """
    rc = cfg.reward_model
    margins = _margins(train_pairs, cfg, source)
    if rc.center_rewards_coefficient is not None:
        log.info("reward_model.center_rewards_coefficient applies to the scalar head only: ignored")
    if cfg.model.activation_checkpointing:
        model.activation_checkpointing_enable()
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=accelerate_precision(cfg.model))
    per = per_process_batch(rc.batch_size, acc.num_processes, "reward_model.batch_size")
    share = slice(acc.process_index * per, (acc.process_index + 1) * per)  # all of each batch on one process
    if acc.num_processes > 1:
        if len(train_pairs) < rc.batch_size:  # one process trains on a short batch; shares of it would be unequal
            raise ConfigError(f"reward_model.batch_size={rc.batch_size} is more than the {len(train_pairs)} train "
                              f"pairs: on {acc.num_processes} processes the global batch must be full")
        log.info("train_reward: process %d of %d trains on pairs %d-%d of each global batch of %d",
                 acc.process_index, acc.num_processes, share.start, share.stop - 1, rc.batch_size)
    per_epoch = math.ceil(len(train_pairs) / rc.batch_size)
    steps = max(1, math.ceil(per_epoch * rc.epochs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=rc.learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(rc.warmup_ratio * steps), steps)
    model, optimizer = acc.prepare(model, optimizer)  # placed on the accelerator's device (DDP on N processes)
    model.train()
    g = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    window: dict[str, list[float]] = {"loss": [], "accuracy": [], "margin": []}
    bar = tqdm(range(1, steps + 1), desc="train_reward", disable=not acc.is_main_process, dynamic_ncols=True)
    for step in bar:
        if len(order) < rc.batch_size:  # a fresh seeded permutation per epoch, no pair dropped
            order += torch.randperm(len(train_pairs), generator=g).tolist()
        idx, order = order[: rc.batch_size], order[rc.batch_size :]  # the global batch, alike on every process
        idx = idx[share]
        batch = [train_pairs[i] for i in idx]
        prompts = [p["prompt"] for p in batch]
        ids, attention, completion = (t.to(acc.device) for t in encode_pairs(
            tok, prompts + prompts, [p["chosen"] for p in batch] + [p["rejected"] for p in batch]))
        # (2B,) chosen then rejected
        scores = rc.beta * sequence_logps(model, ids, attention, completion, rc.length_normalize)
        chosen, rejected = scores[: len(batch)], scores[len(batch) :]
        margin = torch.tensor([margins[i] for i in idx], device=acc.device) if margins is not None else None
        loss = bradley_terry_loss(chosen, rejected, margin)  # the share's mean: see the docstring
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        stats = torch.stack([loss.detach(), (chosen > rejected).float().mean(), (chosen - rejected).mean()])
        if acc.num_processes > 1:  # equal shares: the mean over the processes is the global batch's
            stats = acc.reduce(stats, reduction="mean")
        for key, value in zip(window, stats.tolist(), strict=True):
            window[key].append(value)
        if step % 10 == 0 or step == steps:
            means = {k: sum(v) / len(v) for k, v in window.items()}
            log_curve({f"reward_model/train/{k}": v for k, v in means.items()}, step)
            bar.set_postfix(loss=f"{means['loss']:.3f}", accuracy=f"{means['accuracy']:.2f}")
            window = {k: [] for k in window}
    model = acc.unwrap_model(model).eval()
    model.config.reward_beta = rc.beta  # the scorer reads them back
    model.config.reward_length_normalize = rc.length_normalize
    return model


def policy_sampled_pairs(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) pairs from the starting policy's samples on the train and eval prompts."""
    policy = place(load_policy(cfg.paths.sft_policy(), cfg.model.trust_remote_code, cfg.model.dtype).eval())
    tok = load_tokenizer(cfg.paths.sft_policy(), cfg.model.trust_remote_code)
    judge = accuracy_judge(cfg)
    train_rows = read_jsonl(cfg.paths.validated_file("train"))[: cfg.reward_model.sample_prompts]
    return (sample_pairs(cfg, policy, tok, train_rows, judge, "train"),
            sample_pairs(cfg, policy, tok, read_jsonl(cfg.paths.validated_file("eval")), judge, "eval"))


def train_reward(cfg: Config) -> StageResult:
    begin_stage(cfg.seed)
    rc = cfg.reward_model
    if rc.pairs == "policy":
        source = "the starting policy's samples"
        train_pairs, eval_pairs = policy_sampled_pairs(cfg)
    else:
        source = str(cfg.paths.validated_file("preferences_train"))
        train_pairs = read_jsonl(cfg.paths.validated_file("preferences_train"))
        eval_pairs = read_jsonl(cfg.paths.validated_file("preferences_eval"))
    _margins(train_pairs, cfg, source)  # a bad margin column fails before any model is built
    model, tok = build_reward_model(cfg)
    # the prompts as the policy sees them, so the model scores what it will be asked to score in grpo
    train_pairs, eval_pairs = rendered(cfg, tok, train_pairs), rendered(cfg, tok, eval_pairs)
    if rc.head == "likelihood":
        model = _train_likelihood(cfg, model, tok, train_pairs, source)
    else:
        out = cfg.paths.reward_model()
        out.parent.mkdir(parents=True, exist_ok=True)
        # the trainer's output_dir, beside the output: what a kill leaves there the stage's next run removes
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as scratch:
            model = _train_scalar(cfg, model, tok, train_pairs, source, Path(scratch))
    # every process scores the held-out pairs with the same weights, so each reaches the gate's verdict
    scorer = RewardModelFunction(place(model), tok)
    report = pairwise_report(scorer, eval_pairs)
    acc = report["pairwise_accuracy"]
    passed = acc >= rc.min_pairwise_accuracy
    metrics = {
        "pairwise_accuracy": acc,
        "by_kind": report["by_kind"],
        "mean_margin": report["mean_margin"],
        "n_train_pairs": len(train_pairs),
        "n_eval_pairs": len(eval_pairs),
        "min_pairwise_accuracy": rc.min_pairwise_accuracy,
        "gate_passed": passed,
        "init": reward_init(cfg),
        "head": rc.head,
        "pairs": rc.pairs,
    }

    def write() -> None:  # the report first: a model in place always has its own report beside it
        write_json(cfg.paths.reward_report(), metrics)
        save_pretrained(cfg.paths.reward_model(), model, tok)

    written_once(write)  # one writer under torchrun; the outputs exist when any process returns
    log.info("reward model: held-out pairwise accuracy %.3f (gate %.3f); by kind of rejected answer: %s", acc,
             rc.min_pairwise_accuracy,
             ", ".join(f"{k} {v['pairwise_accuracy']:.3f} (n={v['n']})" for k, v in report["by_kind"].items()) or "-")
    result = StageResult(
        metrics,
        metrics={"reward_model/pairwise_accuracy": acc, "reward_model/gate_passed": float(passed),
                 "reward_model/mean_margin": report["mean_margin"],
                 **{f"reward_model/pairwise_accuracy/{k}": v["pairwise_accuracy"]
                    for k, v in report["by_kind"].items()}},
        tags={"reward_gate": "passed" if passed else "failed", "reward_init": reward_init(cfg)},
        artifacts=[Artifact(cfg.paths.reward_report())],
    )
    if not passed:
        result.error = RewardGateError(
            f"reward model held-out pairwise accuracy {acc:.3f} is below the gate "
            f"reward_model.min_pairwise_accuracy={rc.min_pairwise_accuracy}; stopping before GRPO "
            f"(not training a policy against it). Improve the reward model or its data, or lower the gate."
        )
    return result
