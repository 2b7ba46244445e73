"""Stage `prepare`: the task's train/eval/test prompts, the reward model's preference pairs, the tokenizer."""

from __future__ import annotations

import logging

from grpo_steps.config import Config
from grpo_steps.io import atomic_path, write_jsonl
from grpo_steps.task import make_preference_pairs, make_splits
from grpo_steps.tokenizer import save_tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "eval", "test")


def prepare(cfg: Config) -> dict[str, int]:
    t = cfg.task
    splits = make_splits(
        cfg.seed, {"train": t.n_train, "eval": t.n_eval, "test": t.n_test}, t.max_operand, list(t.operations)
    )
    out = cfg.paths.prepared()
    counts = {}
    for name in SPLITS:
        rows = [{"id": f"{name}-{i:06d}", "prompt": p.prompt, "answer": p.answer, "split": name}
                for i, p in enumerate(splits[name])]
        write_jsonl(out / f"{name}.jsonl", rows)
        counts[name] = len(rows)
    # Preference pairs come from train and eval prompts only: the test split stays unseen by every model.
    n_eval_pairs = max(1, t.n_preference_pairs // 10)
    pairs = {
        "preferences_train": make_preference_pairs(cfg.seed, splits["train"], t.n_preference_pairs - n_eval_pairs),
        "preferences_eval": make_preference_pairs(cfg.seed + 7, splits["eval"], n_eval_pairs),
    }
    for name, rows in pairs.items():
        rows = [{"id": f"{name}-{i:06d}", **r} for i, r in enumerate(rows)]
        write_jsonl(out / f"{name}.jsonl", rows)
        counts[name] = len(rows)
    with atomic_path(cfg.paths.tokenizer()) as tmp:
        save_tokenizer(tmp)
    log.info("prepared %s in %s; tokenizer in %s", counts, out, cfg.paths.tokenizer())
    return counts
