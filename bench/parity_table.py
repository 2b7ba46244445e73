"""Parity of our GRPO loss and advantages with TRL's `GRPOTrainer`, on identical inputs.

    python bench/parity_table.py

prints a markdown table (variant | max abs loss diff | max abs grad diff). The same helpers back
`tests/algorithm/test_trl_parity.py`, which asserts every difference is <= TOL; keep the logic here, in one copy.

What is compared. Our side: `completion_logps` + `policy_loss` with `Normalizers` describing the one micro-batch.
TRL's side: a real `trl.GRPOTrainer` built on the *same* tiny model object, whose `_compute_loss(model, inputs)`
is called directly with a hand-built inputs dict. Old and reference log-probs are the same tensors for both sides;
the old ones are perturbed (per sequence and per token) so ratios != 1 and every clip regime holds some tokens
(`clip_coverage`). Gradients are compared for every model parameter. Advantages are compared against TRL's own
`_generate_and_score_completions`, fed rewards fixed in advance.

Where the definitions coincide, and why the inputs are chosen as they are:
  * One micro-batch per optimizer step (`current_gradient_accumulation_steps = 1`, `steps_per_generation = 1`,
    `num_items_in_batch` = the batch's completion tokens). TRL's grpo / bnpo / dr_grpo normalise per micro-batch
    and divide by the accumulation steps; ours divide by the sizes of the whole optimizer batch, so micro-batch
    losses sum to the big-batch loss. With one micro-batch all four agree. With several, TRL's bnpo (tokens per
    micro-batch) and, for unequal micro-batches, its grpo / dr_grpo weight micro-batches differently: a deliberate
    difference in definition (see loss.py's docstring), not a bug on either side, so it is not tested here.
  * Positions. Our forward passes `position_ids` derived from the attention mask (cumsum - 1), as `generate` used
    when it sampled the tokens; TRL's fused-head forward passes only input_ids and attention_mask, so the model
    falls back to `arange` positions, shifted by the padding length on left-padded rows. The main batch therefore
    has prompts of equal length (no padding), where the two forwards are the same computation for any
    architecture. `padded_batch` left-pads one prompt group and still agrees, but only because both our
    architectures (qwen2, llama) use RoPE, whose attention scores depend on position *differences*, which a
    constant shift per row leaves unchanged; a model with absolute position embeddings would differ there.
    Right padding of the completions is harmless either way: it only moves positions after the last real token,
    which causal attention hides from earlier tokens and the mask drops from the loss.
  * `use_bias_correction_kl=False`. TRL 1.x defaults to multiplying the k3 KL term by the (differentiable)
    importance ratio (DeepSeek-V3.2); our loss is the GRPO paper's plain k3 penalty, as loss.py documents.
    Deliberate, so parity is checked with TRL's correction off; `documented_differences` measures the gap.
  * `bf16=False`: TRL's config defaults to bf16 autocast, which would make the comparison about precision.

The trainer is built once with beta = 0 (with beta != 0 it would load a reference model by name, from the hub),
then the attributes `_compute_loss` reads (loss_type, beta, epsilon_low/high, importance_sampling_level) are set
per variant by `configure`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# `python bench/parity_table.py` puts bench/, not the repo root, on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Tiny models from configs only: nothing may reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from grpo_steps.data.tokenizer import SPECIAL_TOKENS, build_tokenizer
from grpo_steps.grpo.advantages import group_advantages
from grpo_steps.grpo.logprobs import completion_logps
from grpo_steps.grpo.loss import Normalizers, policy_loss
from grpo_steps.platform.config import ModelConfig
from grpo_steps.platform.modeling import build_policy

TOL = 1e-5
NUM_GENERATIONS = 4
NUM_PROMPTS = 2
PROMPT_LEN = 6
COMPLETION_WIDTH = 8  # width of the completion tensor
MAX_COMPLETION_LENGTH = 10  # the config value; > width, so dr_grpo's constant is checked to be the config one
COMPLETION_LENGTHS = (8, 5, 1, 7, 8, 3, 6, 8)  # real tokens per row (right padded to the width)
REWARDS = (1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.25, 0.0)
# log(pi / pi_old) per token = OLD_OFFSETS[row] + LOG_RATIO_PATTERN[(t + 2 * row) % 8], except on the on-policy rows
# (offset 0), where it is 0. The pattern puts tokens below 1 - 0.2, inside [0.8, 1.2], inside the clip-higher band
# (1.2, 1.28] and above 1.28, all >= 2e-3 (in log space) from a clip boundary, so the two sides cannot fall on
# different sides of one through rounding; the offsets make sequence-level (GSPO) ratios leave their 3e-4 band.
LOG_RATIO_PATTERN = (-0.45, -0.15, 0.0, 0.21, 0.4, -0.3, 0.1, 0.24)
OLD_OFFSETS = (0.0, 0.02, -0.03, 0.01, 0.0, -0.02, 0.03, -0.01)
# Rewards for the advantage check: a varied group, an all-equal group (std 0), a group with an unscorable
# completion (None -> NaN, left out of the statistics, advantage 0).
ADVANTAGE_REWARDS = ((1.0, 2.0, 3.0, 5.0), (2.0, 2.0, 2.0, 2.0), (0.5, None, 1.5, 0.0))
ADVANTAGE_PROMPTS = ("1+2=", "3+4=", "9-3=")
LEFT_PAD = 2


@dataclass(frozen=True)
class Variant:
    name: str
    loss_type: str
    beta: float
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    importance_sampling_level: str = "token"
    ours: str | None = None  # our loss_type for TRL's, where the names differ

    @property
    def our_loss_type(self) -> str:
        return self.ours or self.loss_type


VARIANTS = (
    Variant("grpo", "grpo", 0.04),
    Variant("bnpo (TRL) = dapo (ours), one micro-batch", "bnpo", 0.04, ours="dapo"),
    Variant("dr_grpo", "dr_grpo", 0.04),
    Variant("dapo (clip-higher 0.2/0.28)", "dapo", 0.04, 0.2, 0.28),
    # GSPO as TRL documents it: sequence-level ratios with the paper's tiny clip range, on the grpo aggregation.
    Variant("gspo (sequence, 3e-4/4e-4)", "grpo", 0.04, 3e-4, 4e-4, "sequence"),
    Variant("grpo, beta=0", "grpo", 0.0),
    Variant("dapo (clip-higher), beta=0", "dapo", 0.0, 0.2, 0.28),
)
GRPO_WITH_KL = VARIANTS[0]
SCALES = ("group", "batch", "none")


@dataclass
class Setup:
    trainer: Any  # trl.GRPOTrainer
    model: torch.nn.Module
    tokenizer: Any
    batch: dict[str, torch.Tensor]  # equal-length prompts
    padded_batch: dict[str, torch.Tensor]  # the same, second prompt group left-padded by LEFT_PAD


@dataclass(frozen=True)
class ParityResult:
    name: str
    loss_ours: float
    loss_trl: float
    loss_diff: float
    grad_diff: float
    grad_scale: float  # max |grad| on our side: shows the gradients compared are not all ~0
    coverage: dict[str, int]  # completion tokens per clip regime (`clip_coverage`)


def _fixed_reward(completions, target_reward, **kwargs):
    """Reward read from the dataset column, so the advantage check controls the rewards exactly."""
    return list(target_reward)


def build_trainer(model, tokenizer, output_dir: str | Path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(output_dir),
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=NUM_PROMPTS * NUM_GENERATIONS,
        num_generations=NUM_GENERATIONS,
        gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION_LENGTH,
        temperature=1.0,
        beta=0.0,  # set per variant below; 0 here so no reference model is loaded by name
        use_bias_correction_kl=False,
        save_strategy="no",
        seed=0,
    )
    dataset = Dataset.from_dict({"prompt": list(ADVANTAGE_PROMPTS), "target_reward": [0.0] * len(ADVANTAGE_PROMPTS)})
    trainer = GRPOTrainer(model=model, reward_funcs=_fixed_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    assert trainer.model is model, "TRL wrapped the model; the two sides would no longer share parameters"
    # Set by Trainer's training loop for each accumulation window; one micro-batch per step here.
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def configure(trainer, variant: Variant) -> None:
    """Point the trainer at one variant: the attributes `_compute_loss` reads, as `__init__` sets them."""
    values = {"loss_type": variant.loss_type, "beta": variant.beta, "epsilon_low": variant.epsilon_low,
              "epsilon_high": variant.epsilon_high, "importance_sampling_level": variant.importance_sampling_level}
    for attr, value in values.items():
        if not hasattr(trainer, attr):
            raise AttributeError(f"GRPOTrainer has no attribute {attr!r}: TRL changed, revisit this harness")
        setattr(trainer, attr, value)
    trainer.current_gradient_accumulation_steps = 1
    assert trainer.args.steps_per_generation == 1 and trainer.accelerator.num_processes == 1


def make_batch(model, tokenizer, seed: int = 0, left_pad: int = 0) -> dict[str, torch.Tensor]:
    """A generation batch of NUM_PROMPTS x NUM_GENERATIONS rows, in TRL's inputs layout plus `rewards`.

    left_pad > 0 left-pads the second prompt group by that many tokens (`padded_batch`).
    """
    g = torch.Generator().manual_seed(seed)
    n = NUM_PROMPTS * NUM_GENERATIONS
    low, high = len(SPECIAL_TOKENS), len(tokenizer)
    prompts = torch.randint(low, high, (NUM_PROMPTS, PROMPT_LEN), generator=g)
    prompt_ids = prompts.repeat_interleave(NUM_GENERATIONS, dim=0)
    prompt_mask = torch.ones_like(prompt_ids)
    if left_pad:
        rows = slice(NUM_GENERATIONS, 2 * NUM_GENERATIONS)
        prompt_ids[rows, :left_pad] = tokenizer.pad_token_id
        prompt_mask[rows, :left_pad] = 0

    lengths = torch.tensor(COMPLETION_LENGTHS)
    completion_mask = (torch.arange(COMPLETION_WIDTH).unsqueeze(0) < lengths.unsqueeze(1)).long()
    completion_ids = torch.randint(low, high, (n, COMPLETION_WIDTH), generator=g)
    stopped = lengths < COMPLETION_WIDTH  # rows that ended early end with EOS, then padding
    completion_ids[stopped, lengths[stopped] - 1] = tokenizer.eos_token_id
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)

    rewards = torch.tensor(REWARDS)
    advantages, _ = group_advantages(rewards, NUM_GENERATIONS, "group")

    with torch.no_grad():
        logps, _ = completion_logps(model, torch.cat([prompt_ids, completion_ids], 1),
                                    torch.cat([prompt_mask, completion_mask], 1), COMPLETION_WIDTH)
    offsets = torch.tensor(OLD_OFFSETS).unsqueeze(1)
    pattern = torch.tensor(LOG_RATIO_PATTERN)
    index = (torch.arange(COMPLETION_WIDTH).unsqueeze(0) + 2 * torch.arange(n).unsqueeze(1)) % len(pattern)
    log_ratio = (offsets + pattern[index]) * (offsets != 0)
    old = (logps - log_ratio) * completion_mask  # finite everywhere; padding positions are masked anyway
    ref = (logps + 0.15 * torch.randn(n, COMPLETION_WIDTH, generator=g)) * completion_mask
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        # TRL: the loss-mask token count of the whole generation batch (gathered over processes)
        "num_items_in_batch": completion_mask.sum(),
        "rewards": rewards,
    }


def build_setup(output_dir: str | Path | None = None, seed: int = 0) -> Setup:
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = build_policy(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                     max_position_embeddings=64), tokenizer)
    output_dir = output_dir if output_dir is not None else tempfile.mkdtemp(prefix="trl-parity-")
    trainer = build_trainer(model, tokenizer, output_dir)
    model.train()  # TRL's `_compute_loss` picks its train-mode normalisation from `self.model.training`
    return Setup(trainer, model, tokenizer, make_batch(model, tokenizer, seed),
                 make_batch(model, tokenizer, seed, left_pad=LEFT_PAD))


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    model.zero_grad(set_to_none=True)
    return out


def our_loss(model, batch: dict[str, torch.Tensor], variant: Variant):
    """(loss, stats, current log-probs) from our code, the normalisers describing this one micro-batch."""
    mask = batch["completion_mask"]
    norm = Normalizers(num_sequences=mask.size(0), num_tokens=int(mask.sum()),
                       max_completion_length=MAX_COMPLETION_LENGTH)
    logps, _ = completion_logps(model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                                torch.cat([batch["prompt_mask"], mask], 1), batch["completion_ids"].size(1))
    loss, stats = policy_loss(logps, batch["old_per_token_logps"], batch["advantages"], mask, norm,
                              loss_type=variant.our_loss_type, epsilon_low=variant.epsilon_low,
                              epsilon_high=variant.epsilon_high, beta=variant.beta,
                              ref_logps=batch["ref_per_token_logps"] if variant.beta != 0.0 else None,
                              importance_sampling_level=variant.importance_sampling_level)
    return loss, stats, logps.detach()


def trl_loss(trainer, model, batch: dict[str, torch.Tensor], variant: Variant) -> torch.Tensor:
    configure(trainer, variant)
    inputs = {k: v for k, v in batch.items() if k != "rewards"}
    return trainer._compute_loss(model, inputs)


def clip_coverage(logps: torch.Tensor, batch: dict[str, torch.Tensor], variant: Variant) -> dict[str, int]:
    """Completion tokens per clip regime, so a test can check every branch of the surrogate is exercised."""
    mask = batch["completion_mask"].bool()
    log_ratio = logps - batch["old_per_token_logps"]
    if variant.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(log_ratio)
    ratio, adv = log_ratio.exp(), batch["advantages"].unsqueeze(-1).expand_as(log_ratio)
    clipped = ((ratio < 1 - variant.epsilon_low) & (adv < 0)) | ((ratio > 1 + variant.epsilon_high) & (adv > 0))
    band = (ratio > 1 + variant.epsilon_low) & (ratio <= 1 + variant.epsilon_high) & (adv > 0)
    return {"clipped": int((clipped & mask).sum()), "unclipped": int((~clipped & mask & (adv != 0)).sum()),
            "clip_higher_band": int((band & mask).sum())}


def compare(setup: Setup, variant: Variant, batch: dict[str, torch.Tensor] | None = None) -> ParityResult:
    batch = batch if batch is not None else setup.batch
    model = setup.model
    model.zero_grad(set_to_none=True)
    ours, _, logps = our_loss(model, batch, variant)
    ours.backward()
    g_ours = _grads(model)
    theirs = trl_loss(setup.trainer, model, batch, variant)
    theirs.backward()
    g_trl = _grads(model)
    ours_v, theirs_v = ours.detach().item(), theirs.detach().item()
    return ParityResult(
        name=variant.name,
        loss_ours=ours_v, loss_trl=theirs_v, loss_diff=abs(ours_v - theirs_v),
        grad_diff=max(float((g_ours[k] - g_trl[k]).abs().max()) for k in g_ours),
        grad_scale=max(float(g.abs().max()) for g in g_ours.values()),
        coverage=clip_coverage(logps, batch, variant),
    )


@contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def trl_advantages(trainer, rewards: list[float | None], scale: str) -> torch.Tensor:
    """TRL's own advantage code: `_generate_and_score_completions` on rows whose reward is fixed in advance.

    It samples (tiny) completions, but `_fixed_reward` ignores them; rows are grouped contiguously, NUM_GENERATIONS
    per prompt, as TRL's repeat sampler delivers them. TRL warns about the unscorable row on purpose: silenced.
    """
    trainer.scale_rewards = scale
    trainer.beta = 0.0  # as built: with beta != 0 it would score a reference model, and there is none (see top)
    inputs = [{"prompt": ADVANTAGE_PROMPTS[i // NUM_GENERATIONS], "target_reward": r} for i, r in enumerate(rewards)]
    with _quiet("trl.trainer.grpo_trainer"):
        return trainer._generate_and_score_completions(inputs)["advantages"]


def compare_advantages(setup: Setup, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, TRL's) advantages for ADVANTAGE_REWARDS under one scaling."""
    rewards = [r for group in ADVANTAGE_REWARDS for r in group]
    theirs = trl_advantages(setup.trainer, rewards, scale)
    as_tensor = torch.tensor([float("nan") if r is None else r for r in rewards], dtype=torch.float32)
    ours, _ = group_advantages(as_tensor, NUM_GENERATIONS, scale)
    return ours, theirs


def documented_differences(setup: Setup) -> list[ParityResult]:
    """The deliberate differences, measured (expected to be far above TOL; not asserted anywhere)."""
    trainer = setup.trainer
    trainer.args.use_bias_correction_kl = True
    try:
        r = compare(setup, GRPO_WITH_KL)
    finally:
        trainer.args.use_bias_correction_kl = False
    return [dataclasses.replace(r, name="grpo, beta=0.04, TRL default use_bias_correction_kl=True")]


def parity_results(setup: Setup) -> list[ParityResult]:
    results = [compare(setup, variant) for variant in VARIANTS]
    padded = compare(setup, GRPO_WITH_KL, setup.padded_batch)
    results.append(dataclasses.replace(padded, name=f"grpo, beta=0.04, prompts left-padded by {LEFT_PAD} (RoPE)"))
    return results


def markdown_table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| variant | max abs loss diff | max abs grad diff |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> int:
    import transformers
    import trl

    setup = build_setup()
    rows, ok = [], True
    for r in parity_results(setup):
        ok &= r.loss_diff <= TOL and r.grad_diff <= TOL
        rows.append((r.name, f"{r.loss_diff:.2e}", f"{r.grad_diff:.2e}"))
    for scale in SCALES:
        ours, theirs = compare_advantages(setup, scale)
        diff = float((ours - theirs).abs().max())
        ok &= diff <= TOL
        rows.append((f"advantages, scale_rewards={scale} (column 2: max abs advantage diff)", f"{diff:.2e}", "n/a"))
    print(f"TRL {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}; "
          f"tolerance {TOL:g}\n")
    print(markdown_table(rows))
    print("\nDeliberate difference (expected to exceed the tolerance; see this module's docstring):\n")
    print(markdown_table([(r.name, f"{r.loss_diff:.2e}", f"{r.grad_diff:.2e}") for r in documented_differences(setup)]))
    print(f"\nparity {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
