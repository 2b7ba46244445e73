"""Stage `sft`: the cold start. A short supervised run (TRL SFTTrainer, loss on the completion only) so
GRPO starts from a policy that is sometimes right; GRPO needs groups with mixed rewards to learn anything.
Skipped by default when `model.pretrained` names a policy (`sft.enabled: auto`); `sft.enabled: true` fine-tunes
a pretrained policy on the worked solutions too (a reasoning cold start). Prompts are rendered as every stage
renders them (grpo_steps/data/prompts.py) and tokenized here, so the loss covers exactly the demonstration's tokens
and EOS after the prompt the policy will see.
"""

from __future__ import annotations

import logging
import shutil

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from grpo_steps.data.files import read_jsonl
from grpo_steps.data.prompts import render
from grpo_steps.grpo.tokens import prompt_completion_ids
from grpo_steps.platform.config import Config
from grpo_steps.platform.modeling import (
    begin_stage,
    build_policy,
    policy_tokenizer,
    save_pretrained,
    split_trl_batch,
    trainer_checkpointing,
    trl_args,
    trl_warmup,
    written_once,
)
from grpo_steps.platform.results import StageResult
from grpo_steps.platform.trainer_checkpoints import resume_from, set_aside_unusable, stage_key

log = logging.getLogger(__name__)


def cold_start_runs(cfg: Config) -> bool:
    """`sft.enabled`: auto runs the cold start for a policy built from `model`, not for a pretrained one."""
    enabled = cfg.sft.enabled
    return not cfg.model.pretrained if enabled == "auto" else bool(enabled)


def demonstrations_dataset(cfg: Config, tok, rows: list[dict]) -> Dataset:
    """Tokenized (rendered prompt, demonstration) rows: `input_ids` and the `completion_mask` of the loss, the
    same ids the policy sees when it answers that prompt and the reward model scores (EOS included)."""
    data = cfg.data
    out = []
    for r in rows:
        prompt = render(tok, r["prompt"], data.system_prompt, data.chat_template)
        ids, start = prompt_completion_ids(tok, prompt, r.get("demonstration", r["answer"]))
        out.append({"input_ids": ids, "completion_mask": [0] * start + [1] * (len(ids) - start)})
    return Dataset.from_list(out)


def sft(cfg: Config) -> StageResult:
    begin_stage(cfg.seed)
    tok = policy_tokenizer(cfg)
    policy = build_policy(cfg.model, tok)
    out = cfg.paths.sft_policy()
    if not cold_start_runs(cfg):
        log.info("sft.enabled=%s with model.pretrained=%s: no cold start, the pretrained policy is the "
                 "starting policy", cfg.sft.enabled, cfg.model.pretrained)
        metrics = {"skipped": 1.0}
    else:
        rows = read_jsonl(cfg.paths.validated_file("train"))
        sc = cfg.sft
        # resumable: a rerun of the same settings, inputs and code resumes at the newest complete checkpoint
        from grpo_steps.stages import STAGES  # deferred: the records import this module

        ckpts = cfg.paths.sft_checkpoints() / stage_key(STAGES["sft"], cfg)
        written_once(lambda: set_aside_unusable(ckpts))
        resume = resume_from(ckpts)
        if resume is not None:
            log.info("resuming the cold start from checkpoint %s of %d steps", resume, sc.max_steps)
        args = SFTConfig(
            output_dir=str(ckpts),  # TRL logs its curve on the stage's MLflow run (report_to)
            max_steps=sc.max_steps,
            per_device_train_batch_size=sc.batch_size,  # the global batch: split over the processes below
            learning_rate=sc.learning_rate,
            weight_decay=sc.weight_decay,
            lr_scheduler_type="cosine",
            warmup_steps=trl_warmup(sc.warmup_ratio),  # a ratio: transformers 5 reads warmup_steps < 1 as one
            completion_only_loss=True,
            max_length=cfg.validate_.max_prompt_tokens + cfg.validate_.completion_tokens() + 2,
            **{**trl_args(cfg.seed, cfg.model), **trainer_checkpointing(sc.checkpoint_every, sc.keep_checkpoints)},
        )
        split_trl_batch(args, sc.batch_size, "sft.batch_size")  # sft.batch_size rows a step, on N processes too
        # the trainer places the policy on the accelerator's device (accelerator.prepare)
        trainer = SFTTrainer(model=policy, args=args, train_dataset=demonstrations_dataset(cfg, tok, rows),
                             processing_class=tok)
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        policy = trainer.model
        metrics = {"train_loss": float(result.training_loss)}
        if resume is not None:
            metrics["resumed_from_step"] = float(resume.name.split("-")[-1])
    written_once(lambda: save_pretrained(out, policy, tok))  # one writer under torchrun
    if cold_start_runs(cfg):  # the output holds what they would resume to
        written_once(lambda: shutil.rmtree(ckpts, ignore_errors=True))
    log.info("starting policy saved to %s (%s)", out, metrics)
    return StageResult(metrics, metrics={f"sft/{k}": v for k, v in metrics.items()})
