"""Stage `train_reward`: a Bradley-Terry reward model (TRL RewardTrainer) on the preference pairs.

Its held-out pairwise accuracy is the gate: below `reward_model.min_pairwise_accuracy` the pipeline stops
before GRPO, since optimising against a reward model that cannot rank is optimising noise.
"""

from __future__ import annotations

import logging
import shutil

import mlflow
import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from grpo_steps.config import Config
from grpo_steps.grpo.reward_model import RewardModelFunction
from grpo_steps.io import atomic_path, read_jsonl, write_json
from grpo_steps.modeling import build_reward_backbone, load_tokenizer, seed_everything
from grpo_steps.tracking import stage_run

log = logging.getLogger(__name__)


class RewardGateError(RuntimeError):
    """The reward model ranks held-out pairs too poorly to train a policy against."""


def pairwise_accuracy(scorer: RewardModelFunction, pairs: list[dict]) -> float:
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer(prompts, [p["chosen"] for p in pairs])
    rejected = scorer(prompts, [p["rejected"] for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / max(len(pairs), 1)


def train_reward(cfg: Config) -> dict[str, float]:
    seed_everything(cfg.seed)
    data = cfg.paths.validated()
    train_pairs = read_jsonl(data / "preferences_train.jsonl")
    eval_pairs = read_jsonl(data / "preferences_eval.jsonl")
    tok = load_tokenizer(cfg.paths.tokenizer())
    model = build_reward_backbone(cfg.model, tok)
    rc = cfg.reward_model
    out = cfg.paths.reward_model()
    with stage_run(cfg, "train_reward"), atomic_path(out) as tmp:
        args = RewardConfig(
            output_dir=str(tmp / "_trainer"),
            num_train_epochs=rc.epochs,
            per_device_train_batch_size=rc.batch_size,
            learning_rate=rc.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            center_rewards_coefficient=rc.center_rewards_coefficient,
            max_length=cfg.validate_.max_prompt_tokens + cfg.validate_.max_answer_tokens + 2,
            logging_steps=10,
            save_strategy="no",
            report_to=["mlflow"],
            seed=cfg.seed,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            disable_tqdm=False,
        )
        columns = ["prompt", "chosen", "rejected"]
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([{k: p[k] for k in columns} for p in train_pairs]),
            processing_class=tok,
        )
        trainer.train()
        scorer = RewardModelFunction(trainer.model, tok)
        acc = pairwise_accuracy(scorer, eval_pairs)
        metrics = {"pairwise_accuracy": acc, "n_train_pairs": len(train_pairs), "n_eval_pairs": len(eval_pairs)}
        mlflow.log_metrics({"reward_model/pairwise_accuracy": acc})
        trainer.model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)
        write_json(cfg.paths.reports() / "reward_model.json", metrics)
    log.info("reward model: held-out pairwise accuracy %.3f", acc)
    if acc < rc.min_pairwise_accuracy:
        raise RewardGateError(
            f"reward model held-out pairwise accuracy {acc:.3f} is below the gate "
            f"reward_model.min_pairwise_accuracy={rc.min_pairwise_accuracy}; not training a policy against it"
        )
    return metrics
