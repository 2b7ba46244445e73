"""Stage `evaluate`: the starting policy, the GRPO policy and the registry's champion, side by side, on the
held-out test split.

Metrics: greedy exact-match accuracy, pass@k with sampling, mean reward-model score, per-token KL (k3)
of the GRPO policy to the starting policy, completion lengths. The current `champion` version of
`registry.model_name` (when there is one and the tracking store answers) is downloaded and evaluated on the
same split, so the promotion gate compares like with like. Writes reports/metrics.json (read by
`dvc metrics`), reports/samples.jsonl (the completions side by side, also logged as an MLflow table), and
reports/eval.png: the GRPO reward curve, the KL curve and the accuracies.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo_steps.data.files import read_jsonl
from grpo_steps.data.prompts import render_all
from grpo_steps.grpo.logprobs import completion_logps
from grpo_steps.grpo.loss import k3_kl
from grpo_steps.grpo.reward_model import RewardModelFunction
from grpo_steps.grpo.rewards import RewardFunction
from grpo_steps.grpo.sampling import sample_in_batches
from grpo_steps.platform.config import Config
from grpo_steps.platform.io import atomic_path, write_json, write_jsonl
from grpo_steps.platform.judge import accuracy_judge
from grpo_steps.platform.lineage import file_md5
from grpo_steps.platform.modeling import load_policy, load_reward_model, load_tokenizer, place, seed_everything
from grpo_steps.platform.results import Artifact, StageResult
from grpo_steps.stages.comparison import format_comparison

log = logging.getLogger(__name__)


@torch.no_grad()
def policy_metrics(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    cfg: Config,
    reward_model: RewardModelFunction | None = None,
    reference: PreTrainedModel | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    # each policy reads the prompts rendered by its own tokenizer (a champion's may differ)
    prompts = render_all(tok, [r["prompt"] for r in rows], cfg.data.system_prompt, cfg.data.chat_template)
    answers = [r["answer"] for r in rows]
    max_new = cfg.grpo.max_completion_length
    backend = cfg.grpo.generation_backend  # decoded as the training rollouts were
    judge = accuracy_judge(cfg)
    greedy = sample_in_batches(model, tok, prompts, 1, max_new, greedy=True, backend=backend)
    completions = [c for r in greedy for c in r.completions]
    correct = judge(prompts, completions, answers)
    lengths = torch.cat([r.completion_mask.sum(1) for r in greedy]).float()
    metrics = {"accuracy": sum(correct) / len(correct), "mean_completion_length": float(lengths.mean())}

    k = cfg.evaluate.pass_k
    sampled = sample_in_batches(model, tok, prompts, k, max_new, greedy=False, backend=backend)
    sampled_completions = [c for r in sampled for c in r.completions]
    hits = judge([p for p in prompts for _ in range(k)], sampled_completions, [a for a in answers for _ in range(k)])
    per_prompt = torch.tensor(hits).view(-1, k).amax(dim=1)
    metrics[f"pass_at_{k}"] = float(per_prompt.mean())
    metrics[f"maj_at_{k}"] = majority_accuracy(answer_keys(judge, sampled_completions), hits, k)
    metrics["sampled_accuracy"] = float(torch.tensor(hits).mean())

    if reward_model is not None:
        metrics["reward_model_score"] = float(torch.tensor(reward_model(prompts, completions)).mean())
    if reference is not None:  # KL(policy || reference) per token, on the policy's own samples
        kls = []
        for r in sampled:
            c = r.completion_ids.size(1)
            lp, _ = completion_logps(model, r.input_ids, r.attention_mask, c)
            ref, _ = completion_logps(reference, r.input_ids, r.attention_mask, c)
            m = r.completion_mask.float()
            kls.append(((k3_kl(lp, ref) * m).sum() / m.sum().clamp(min=1)).item())
        metrics["kl_to_reference"] = sum(kls) / len(kls)
    samples = [{"prompt": r["prompt"], "answer": a, "completion": c, "correct": bool(x)}
               for r, a, c, x in zip(rows, answers, completions, correct, strict=True)]
    return metrics, samples


def answer_keys(judge: RewardFunction, completions: list[str]) -> list[str | None]:
    """What counts as the same answer in a vote: the normal form the judge extracts, or the stripped text."""
    extract = getattr(judge, "extract", None)
    return extract(completions) if extract is not None else [c.strip() or None for c in completions]


def majority_accuracy(keys: list[str | None], hits: list[float | None], k: int) -> float:
    """maj@k: per prompt, the most frequent answer among its k samples (ties: the first seen; no answer never
    wins) is right. Its correctness is that of a sample giving it."""
    right = 0
    for i in range(0, len(keys), k):
        votes = Counter(key for key in keys[i : i + k] if key is not None)
        if votes:
            top = votes.most_common(1)[0][0]
            right += bool(next(hits[j] for j in range(i, i + k) if keys[j] == top))
    return right / max(1, len(keys) // k)


@dataclass
class Champion:
    """The registry's current champion, loaded for evaluation (or why it was not)."""

    version: str | None = None
    model: PreTrainedModel | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    policy_md5: str | None = None
    note: str | None = None


def load_champion(cfg: Config, dst: Path) -> Champion:
    """Download `models:/<name>@champion` into `dst` and load it with our safetensors-only loaders.

    Never raises: no registered model, no champion alias, an unreachable store or an unloadable version
    each come back as a note, and the evaluation goes on without the comparison.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = cfg.registry.model_name
    try:
        mv = MlflowClient().get_model_version_by_alias(name, "champion")
    except MlflowException as e:
        code = getattr(e, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return Champion(note=f"no champion of {name!r} in the registry yet")
        return Champion(note=f"registry lookup of {name}@champion failed: {e}")
    except Exception as e:  # noqa: BLE001 - network errors and the like: evaluate without the comparison
        return Champion(note=f"tracking store unreachable, champion not compared: {e}")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}",
                                                         dst_path=str(dst)))
        model = place(load_policy(local / "model", cfg.model.trust_remote_code, cfg.model.dtype).eval())
        tok = load_tokenizer(local / "components" / "tokenizer", cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a broken or foreign version must not fail the evaluation
        return Champion(version=str(mv.version), note=f"could not load {name} v{mv.version} (champion): {e}")
    return Champion(version=str(mv.version), model=model, tokenizer=tok, policy_md5=mv.tags.get("policy_md5"))


def _plot(curve_csv: Path, metrics: dict[str, dict[str, float]], out: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, reward, kl, eval_steps, eval_acc = [], [], [], [], []
    if curve_csv.is_file():
        with curve_csv.open() as f:
            for row in csv.DictReader(f):
                steps.append(int(row["step"]))
                reward.append(float(row["reward"]))
                kl.append(float(row.get("kl") or 0))
                if row.get("eval/accuracy"):  # grpo.eval_every: held-out accuracy during training
                    eval_steps.append(int(row["step"]))
                    eval_acc.append(float(row["eval/accuracy"]))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(steps, reward, lw=1)
    axes[0].set(title="GRPO mean reward per step", xlabel="step", ylabel="reward")
    if eval_steps:
        acc_axis = axes[0].twinx()
        acc_axis.plot(eval_steps, eval_acc, "o-", color="tab:green", ms=3, lw=1, label="held-out accuracy")
        acc_axis.set(ylabel="held-out greedy accuracy", ylim=(0, 1.05))
        acc_axis.legend(loc="lower right", fontsize=8)
        axes[0].set_title("GRPO reward per step, held-out accuracy")
    axes[1].plot(steps, kl, lw=1, color="tab:red")
    axes[1].set(title="KL to reference (k3)", xlabel="step")
    names = list(metrics)
    colors = {"start": "tab:gray", "grpo": "tab:green"}
    width = 0.38
    xs = range(len(names))
    for offset, key, label, alpha in ((-width / 2, "accuracy", "greedy accuracy", 1.0),
                                      (width / 2, f"pass_at_{k}", f"pass@{k}", 0.5)):
        values = [metrics[n].get(key, 0.0) for n in names]
        bars = axes[2].bar([x + offset for x in xs], values, width, label=label, alpha=alpha,
                           color=[colors.get(n.split(" ")[0], "tab:blue") for n in names])
        for bar, v in zip(bars, values, strict=True):
            axes[2].text(bar.get_x() + bar.get_width() / 2, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    axes[2].set_xticks(list(xs), names)
    axes[2].set(title="held-out accuracy (solid) and pass@k (light)", ylim=(0, 1.1))
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _side_by_side(results: dict[str, list[dict[str, Any]]], limit: int) -> list[dict[str, Any]]:
    """One row per prompt: the GRPO completion (`completion`, `correct`) beside the others' (`<name>_...`)."""
    rows = []
    for i, g in enumerate(results["grpo"][:limit]):
        row = dict(g)
        for name, samples in results.items():
            if name != "grpo":
                row[f"{name}_completion"] = samples[i]["completion"]
                row[f"{name}_correct"] = samples[i]["correct"]
        rows.append(row)
    return rows


def evaluate(cfg: Config) -> StageResult:
    seed_everything(cfg.seed)
    rows = read_jsonl(cfg.paths.validated_file("test"))
    tok = load_tokenizer(cfg.paths.grpo_policy())
    # every model on this process's accelerator device (platform/modeling.py `place`); inputs follow the model's
    start = place(load_policy(cfg.paths.sft_policy(), cfg.model.trust_remote_code, cfg.model.dtype).eval())
    trained = place(load_policy(cfg.paths.grpo_policy(), cfg.model.trust_remote_code, cfg.model.dtype).eval())
    rm = None
    if cfg.paths.reward_model().exists():
        trust = cfg.reward_model.trust_remote_code or cfg.model.trust_remote_code
        rm = RewardModelFunction(place(load_reward_model(cfg.paths.reward_model(), trust, cfg.model.dtype)), tok)
    tracked: dict[str, float] = {}
    tags: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="champion-") as scratch:
        start_metrics, start_samples = policy_metrics(start, tok, rows, cfg, rm)
        grpo_metrics, samples = policy_metrics(trained, tok, rows, cfg, rm, reference=start)
        result: dict[str, Any] = {
            "n_test": len(rows),
            "start": start_metrics,
            "grpo": grpo_metrics,
            "accuracy_gain": grpo_metrics["accuracy"] - start_metrics["accuracy"],
        }
        by_policy = {"grpo": samples, "start": start_samples}
        champ = (load_champion(cfg, Path(scratch)) if cfg.evaluate.compare_champion
                 else Champion(note="evaluate.compare_champion is off"))
        if champ.model is not None:
            if champ.policy_md5 and champ.policy_md5 == file_md5(cfg.paths.weights(cfg.paths.grpo_policy())):
                champ_metrics, champ_samples = dict(grpo_metrics), samples  # the champion is this very policy
                champ_metrics.pop("kl_to_reference", None)
            else:
                champ_metrics, champ_samples = policy_metrics(champ.model, champ.tokenizer, rows, cfg, rm)
            result["champion"] = champ_metrics
            result["champion_version"] = champ.version
            result["accuracy_gain_over_champion"] = grpo_metrics["accuracy"] - champ_metrics["accuracy"]
            by_policy["champion"] = champ_samples
            tracked.update({f"eval/champion/{k}": v for k, v in champ_metrics.items()})
            tracked["eval/accuracy_gain_over_champion"] = result["accuracy_gain_over_champion"]
            tags["champion_version"] = str(champ.version)
        else:
            log.info("champion comparison skipped: %s", champ.note)
        result["champion_note"] = champ.note
        warning = None
        if "reward_model_score" in grpo_metrics and (
            grpo_metrics["reward_model_score"] > start_metrics["reward_model_score"]
            and grpo_metrics["accuracy"] < start_metrics["accuracy"]
        ):
            warning = "reward-model score rose while accuracy fell: possible reward hacking"
            log.warning(warning)
        result["reward_hacking_warning"] = warning
        write_json(cfg.paths.metrics(), result)
        table = _side_by_side(by_policy, cfg.evaluate.n_samples_logged)
        write_jsonl(cfg.paths.samples(), table)
        plotted = {"start": start_metrics, "grpo": grpo_metrics}
        if "champion" in result:
            plotted[f"champion v{champ.version}"] = result["champion"]
        _plot(cfg.paths.grpo_curve(), plotted, cfg.paths.eval_plot(), cfg.evaluate.pass_k)
    tracked.update({f"eval/start/{k}": v for k, v in start_metrics.items()})
    tracked.update({f"eval/grpo/{k}": v for k, v in grpo_metrics.items()})
    tracked["eval/accuracy_gain"] = result["accuracy_gain"]
    print(format_comparison(result))
    return StageResult(
        result, metrics=tracked, tags=tags,
        artifacts=[Artifact(p) for p in (cfg.paths.metrics(), cfg.paths.eval_plot(), cfg.paths.samples())],
        tables={"samples.json": {k: [r[k] for r in table] for k in table[0]}} if table else {},
    )
