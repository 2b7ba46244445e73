"""Stage `prepare`: the train/eval/test prompts, the reward model's preference pairs, the tokenizer.

The rows come from the embedded synthetic task (`data.source: synthetic`, the default) or from your own files
(`data.source: files`, read by grpo_steps.data.ingest). Either way the stage writes the same five files under
data/prepared (train/eval/test.jsonl: id, prompt, answer, split; preferences_train/eval.jsonl: id, prompt,
chosen, rejected), replacing the folder as a whole so a crash never leaves a mix of old and new files.
"""

from __future__ import annotations

import logging
from typing import Any

from grpo_steps.data.settings import SOURCES_FILE, SPLITS, data_file_name
from grpo_steps.data.task import (
    demonstrations,
    make_preference_pairs,
    make_splits,
    question,
    reasoning_rejected,
    worked_solution,
)
from grpo_steps.data.tokenizer import build_bpe_tokenizer, save_tokenizer
from grpo_steps.platform.config import Config
from grpo_steps.platform.io import atomic_path, write_json, write_jsonl
from grpo_steps.platform.results import StageResult

log = logging.getLogger(__name__)


def synthetic_rows(cfg: Config) -> dict[str, list[dict[str, Any]]]:
    """The embedded arithmetic task's rows for the five prepared files, in `task.format`."""
    t = cfg.task
    splits = make_splits(
        cfg.seed, {"train": t.n_train, "eval": t.n_eval, "test": t.n_test}, t.max_operand, list(t.operations)
    )
    reasoning = t.format == "reasoning"
    shown = question if reasoning else (lambda prompt: prompt)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in SPLITS:
        out[name] = [{"id": f"{name}-{i:06d}", "prompt": shown(p.prompt), "answer": p.answer, "split": name}
                     for i, p in enumerate(splits[name])]
    if t.demo_error_rate > 0 or reasoning:  # the SFT target; GRPO and evaluation keep scoring against `answer`
        demos = demonstrations(cfg.seed, splits["train"], t.demo_error_rate)
        for row, p, demo in zip(out["train"], splits["train"], demos, strict=True):
            row["demonstration"] = (worked_solution(p.prompt, p.answer, slip=demo != p.answer, working=t.working)
                                    if reasoning else demo)
    # Preference pairs come from train and eval prompts only: the test split stays unseen by every model.
    n_eval_pairs = max(1, t.n_preference_pairs // 10)
    pairs = {
        "preferences_train": make_preference_pairs(cfg.seed, splits["train"], t.n_preference_pairs - n_eval_pairs,
                                                   t.rejected_mix),
        "preferences_eval": make_preference_pairs(cfg.seed + 7, splits["eval"], n_eval_pairs, t.rejected_mix),
    }
    for name, rows in pairs.items():
        if reasoning:
            rows = [{"prompt": question(r["prompt"]),
                     "chosen": worked_solution(r["prompt"], r["chosen"], working=t.working),
                     "rejected": reasoning_rejected(r["prompt"], r["chosen"], r["rejected"], r["kind"],
                                                    t.working),
                     "kind": r["kind"]} for r in rows]
        out[name] = [{"id": f"{name}-{i:06d}", **r} for i, r in enumerate(rows)]
    return out


def task_corpus(files: dict[str, list[dict[str, Any]]], system_prompt: str | None) -> list[str]:
    """The text a `bpe` tokenizer is trained on: every prompt and completion of the prepared rows."""
    corpus = [system_prompt] if system_prompt else []
    for rows in files.values():
        for r in rows:
            corpus += [v for k, v in r.items() if k in ("prompt", "demonstration", "chosen", "rejected")
                       and isinstance(v, str)]
    return corpus


def prepare(cfg: Config) -> StageResult:
    sources = None
    if cfg.data.source == "files":
        from grpo_steps.data.ingest import ingest, take_sources  # deferred: pandas, pyarrow

        files = ingest(cfg.data, cfg.seed)
        sources = take_sources(files)  # beside the rows: validation names the user's file and line
    else:
        files = synthetic_rows(cfg)
    out = cfg.paths.prepared()
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name, rows in files.items():
            write_jsonl(tmp / data_file_name(name), rows)
        if sources:
            write_json(tmp / SOURCES_FILE, sources)
    counts = {name: len(rows) for name, rows in files.items()}
    with atomic_path(cfg.paths.tokenizer()) as tmp:
        if cfg.task.tokenizer == "bpe":
            tok = build_bpe_tokenizer(task_corpus(files, cfg.data.system_prompt), cfg.task.bpe_vocab_size)
            tok.save_pretrained(str(tmp))
        else:
            save_tokenizer(tmp)
    log.info("prepared %s (%s) in %s; tokenizer in %s", counts, cfg.data.source, out, cfg.paths.tokenizer())
    return StageResult(counts, metrics={f"rows.{name}": n for name, n in counts.items()},
                       tags={"data_source": cfg.data.source})
