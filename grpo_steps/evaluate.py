"""Stage `evaluate`: the starting policy and the GRPO policy, side by side, on the held-out test split.

Metrics: greedy exact-match accuracy, pass@k with sampling, mean reward-model score, per-token KL (k3)
of the GRPO policy to the starting policy, completion lengths. Writes reports/metrics.json (read by
`dvc metrics`), sample completions, and a plot of the GRPO reward curve with both accuracies.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import mlflow
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo_steps.config import Config
from grpo_steps.grpo.logprobs import completion_logps
from grpo_steps.grpo.loss import k3_kl
from grpo_steps.grpo.reward_model import RewardModelFunction
from grpo_steps.grpo.rewards import exact_match
from grpo_steps.grpo.sampling import Rollout, sample_groups
from grpo_steps.io import atomic_path, read_jsonl, write_json, write_jsonl
from grpo_steps.modeling import load_policy, load_reward_model, load_tokenizer, seed_everything
from grpo_steps.tracking import stage_run

log = logging.getLogger(__name__)


def _rollouts(model, tok, prompts: list[str], n: int, max_new: int, greedy: bool, batch: int = 256) -> list[Rollout]:
    per = max(1, batch // n)
    return [sample_groups(model, tok, prompts[i : i + per], n, max_new, 1.0, do_sample=not greedy)
            for i in range(0, len(prompts), per)]


@torch.no_grad()
def policy_metrics(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    cfg: Config,
    reward_model: RewardModelFunction | None = None,
    reference: PreTrainedModel | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    max_new = cfg.grpo.max_completion_length
    greedy = _rollouts(model, tok, prompts, 1, max_new, greedy=True)
    completions = [c for r in greedy for c in r.completions]
    correct = exact_match(prompts, completions, answers)
    lengths = torch.cat([r.completion_mask.sum(1) for r in greedy]).float()
    metrics = {"accuracy": sum(correct) / len(correct), "mean_completion_length": float(lengths.mean())}

    k = cfg.evaluate.pass_k
    sampled = _rollouts(model, tok, prompts, k, max_new, greedy=False)
    sampled_completions = [c for r in sampled for c in r.completions]
    hits = exact_match([p for p in prompts for _ in range(k)], sampled_completions,
                       [a for a in answers for _ in range(k)])
    per_prompt = torch.tensor(hits).view(-1, k).amax(dim=1)
    metrics[f"pass_at_{k}"] = float(per_prompt.mean())
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
    samples = [{"prompt": p, "answer": a, "completion": c, "correct": bool(x)}
               for p, a, c, x in zip(prompts, answers, completions, correct, strict=True)]
    return metrics, samples


def _plot(curve_csv: Path, metrics: dict[str, dict[str, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, reward, kl = [], [], []
    if curve_csv.is_file():
        with curve_csv.open() as f:
            for row in csv.DictReader(f):
                steps.append(int(row["step"]))
                reward.append(float(row["reward"]))
                kl.append(float(row["kl"] or 0))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, reward, lw=1)
    axes[0].set(title="GRPO mean reward per step", xlabel="step", ylabel="reward")
    axes[1].plot(steps, kl, lw=1, color="tab:red")
    axes[1].set(title="KL to reference (k3)", xlabel="step")
    names = list(metrics)
    axes[2].bar(names, [metrics[n]["accuracy"] for n in names], color=["tab:gray", "tab:green"][: len(names)])
    axes[2].set(title="held-out exact-match accuracy", ylim=(0, 1))
    for i, n in enumerate(names):
        axes[2].text(i, metrics[n]["accuracy"] + 0.02, f"{metrics[n]['accuracy']:.3f}", ha="center")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def evaluate(cfg: Config) -> dict[str, Any]:
    seed_everything(cfg.seed)
    rows = read_jsonl(cfg.paths.validated() / "test.jsonl")
    tok = load_tokenizer(cfg.paths.grpo_policy())
    start = load_policy(cfg.paths.sft_policy(), cfg.model.trust_remote_code).eval()
    trained = load_policy(cfg.paths.grpo_policy(), cfg.model.trust_remote_code).eval()
    rm = None
    if cfg.paths.reward_model().exists():
        rm = RewardModelFunction(load_reward_model(cfg.paths.reward_model(), cfg.model.trust_remote_code), tok)
    reports = cfg.paths.reports()
    with stage_run(cfg, "evaluate"):
        start_metrics, _ = policy_metrics(start, tok, rows, cfg, rm)
        grpo_metrics, samples = policy_metrics(trained, tok, rows, cfg, rm, reference=start)
        result = {
            "n_test": len(rows),
            "start": start_metrics,
            "grpo": grpo_metrics,
            "accuracy_gain": grpo_metrics["accuracy"] - start_metrics["accuracy"],
        }
        warning = None
        if "reward_model_score" in grpo_metrics and (
            grpo_metrics["reward_model_score"] > start_metrics["reward_model_score"]
            and grpo_metrics["accuracy"] < start_metrics["accuracy"]
        ):
            warning = "reward-model score rose while accuracy fell: possible reward hacking"
            log.warning(warning)
        result["reward_hacking_warning"] = warning
        write_json(reports / "metrics.json", result)
        write_jsonl(reports / "samples.jsonl", samples[: max(cfg.evaluate.n_samples_logged, 0)] or samples[:0])
        _plot(reports / "grpo_steps.csv", {"start": start_metrics, "grpo": grpo_metrics}, reports / "eval.png")
        mlflow.log_metrics({f"eval/start/{k}": v for k, v in start_metrics.items()})
        mlflow.log_metrics({f"eval/grpo/{k}": v for k, v in grpo_metrics.items()})
        mlflow.log_metric("eval/accuracy_gain", result["accuracy_gain"])
        mlflow.log_artifact(str(reports / "metrics.json"))
        mlflow.log_artifact(str(reports / "eval.png"))
        mlflow.log_table({k: [s[k] for s in samples[:50]] for k in ("prompt", "answer", "completion", "correct")},
                         artifact_file="samples.json")
    print(format_comparison(result))
    return result


def format_comparison(result: dict[str, Any]) -> str:
    keys = [k for k in result["grpo"] if k in result["start"]]
    lines = [f"held-out evaluation on {result['n_test']} test prompts", f"{'metric':<24}{'start':>10}{'grpo':>10}"]
    for k in keys:
        lines.append(f"{k:<24}{result['start'][k]:>10.4f}{result['grpo'][k]:>10.4f}")
    if "kl_to_reference" in result["grpo"]:
        lines.append(f"{'kl_to_reference':<24}{'':>10}{result['grpo']['kl_to_reference']:>10.4f}")
    lines.append(f"accuracy gain (grpo - start): {result['accuracy_gain']:+.4f}")
    return "\n".join(lines)
