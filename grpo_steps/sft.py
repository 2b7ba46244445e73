"""Stage `sft`: the cold start. A short supervised run (TRL SFTTrainer, loss on the completion only) so
GRPO starts from a policy that is sometimes right; GRPO needs groups with mixed rewards to learn anything.
Skipped when `model.pretrained` names a policy that already answers the task's format.
"""

from __future__ import annotations

import logging
import shutil

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from grpo_steps.config import Config
from grpo_steps.io import atomic_path, read_jsonl
from grpo_steps.modeling import begin_stage, build_policy, load_tokenizer, trl_args
from grpo_steps.results import StageResult

log = logging.getLogger(__name__)


def sft(cfg: Config) -> StageResult:
    begin_stage(cfg.seed)
    if cfg.model.pretrained:
        tok = load_tokenizer(cfg.model.pretrained, cfg.model.trust_remote_code, allow_hub=True)
    else:
        tok = load_tokenizer(cfg.paths.tokenizer())
    policy = build_policy(cfg.model, tok)
    out = cfg.paths.sft_policy()
    with atomic_path(out) as tmp:  # TRL logs its curve on the stage's MLflow run (report_to)
        if cfg.model.pretrained:
            log.info("model.pretrained is set: skipping the cold start, saving %s as the starting policy",
                     cfg.model.pretrained)
            metrics = {"skipped": 1.0}
        else:
            rows = read_jsonl(cfg.paths.validated_file("train"))
            sc = cfg.sft
            args = SFTConfig(
                output_dir=str(tmp / "_trainer"),
                max_steps=sc.max_steps,
                per_device_train_batch_size=sc.batch_size,
                learning_rate=sc.learning_rate,
                weight_decay=sc.weight_decay,
                lr_scheduler_type="cosine",
                warmup_steps=sc.warmup_ratio,
                completion_only_loss=True,
                max_length=cfg.validate_.max_prompt_tokens + cfg.validate_.max_answer_tokens + 2,
                **trl_args(cfg.seed, cfg.model),
            )
            trainer = SFTTrainer(
                model=policy,
                args=args,
                train_dataset=Dataset.from_list(
                    [{"prompt": r["prompt"], "completion": r.get("demonstration", r["answer"])} for r in rows]
                ),
                processing_class=tok,
            )
            result = trainer.train()
            policy = trainer.model
            metrics = {"train_loss": float(result.training_loss)}
            shutil.rmtree(tmp / "_trainer", ignore_errors=True)
        policy.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    log.info("starting policy saved to %s (%s)", out, metrics)
    return StageResult(metrics, metrics={f"sft/{k}": v for k, v in metrics.items()})
