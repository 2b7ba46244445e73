"""Our GRPO step against TRL's `GRPOTrainer`, side by side: throughput and peak memory at equal settings.

    python bench/grpo_vs_trl.py                                   # CPU, the default tiny model
    python bench/grpo_vs_trl.py --device cuda --model-preset qwen2.5-0.5b --completion-length 256
    python bench/grpo_vs_trl.py --help

Each measurement runs in its own subprocess (so peak memory is that implementation's alone), alternating
ours / TRL / ours / TRL for `--repeats` rounds (so a change in machine load hits both alike). Each child trains
`--warmup-steps` untimed steps, then `--steps` timed ones, and reports:

  * steps/s: timed steps / wall time from the end of the last warm-up step to the end of the last step (TRL: the
    interval between `on_step_end` callbacks, so its data loading and every per-step overhead are inside it; ours:
    `PromptSampler.next` + `GRPOTrainer.train_step`, the whole loop body of `GRPOTrainer.fit`).
  * steps per CPU-second (CPU only): the same steps / the child's CPU time (user + system, `time.process_time`)
    over the same interval. With one thread per run this barely moves with the load other processes put on a
    shared machine, where the wall-clock columns do.
  * completion tokens/s: completion tokens (up to and including EOS) sampled in the timed steps / the same time.
    Sampling is random on both sides, so lengths differ a little; this column normalises for that.
  * peak memory: CPU: the child's `ru_maxrss` (whole-process high-water mark, imports included) and that peak minus
    the RSS right after imports (what training itself added); CUDA: `torch.cuda.max_memory_allocated()`, reset
    before the model is loaded (weights, gradients, optimizer state and activations).

The table shows the median over the repeats (min-max in brackets) and a `ratio ours/TRL` row of the medians.

Same for both (one settings dict, passed to both children):
  * the model: built once by the parent from the preset's config with seeded random weights, saved with
    `save_pretrained` to a temporary directory and loaded from there by both children (identical weights, fp32);
    the tokenizer likewise (the project's character tokenizer, padded with inert extra tokens to `--vocab-size`);
  * the data: the task's arithmetic prompts (`grpo_steps.data.task.make_splits`, seeded), reward `exact_match` (TRL
    calls the same function, wrapped only to count completion tokens from the `completion_ids` TRL passes it);
  * prompts per step P and group size G: one generation batch of P x G rows per optimizer step, one micro-batch
    (ours: `micro_batch_size = P*G`, `mu = 1`; TRL: `per_device_train_batch_size = P*G`, `num_generations = G`,
    `gradient_accumulation_steps = 1`, so `steps_per_generation = 1`, and `num_iterations = 1`), or micro-batches
    of `--micro-batch-size` rows (TRL: that per device, accumulating P*G / it; its generation batch stays P*G):
    neither side computes old log-probs (ratio against the detached current ones);
  * sampling: transformers `generate` on both sides, KV cache on, `do_sample=True`, `temperature`, `top_k=0`,
    `top_p=1.0`, `max_new_tokens = --completion-length`, stop at EOS (TRL: `use_vllm=False`, no continuous batching);
    with `--generation-backend compact` ours samples the same distribution with its own loop instead, which drops
    each row from the batch at its EOS (the random model of the `tiny` preset ends a completion with probability
    ~1/80 per token, so at `--completion-length 128` lengths vary from 1 to 128);
  * loss: `--loss-type`, `--beta`, epsilon 0.2 both ways, `scale_rewards="group"`, `importance_sampling_level`
    token; learning rate `--lr`, constant, no warm-up; AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0);
    gradient clipping at norm 1.0; entropy computed as a metric on both sides;
  * `--seed`, device, fp32 everywhere, the same torch thread count (`--threads`, 1 by default, for numbers that
    hold still on a shared machine: on 2 cores, two intra-op threads made a tiny-model step 1.6x faster than one at
    a load average of 3, and 18x slower (10.8 s against 0.58 s) at a load average of 7, where each thread waits
    for the other to be scheduled; `--threads 0` is torch's default, one per core).

TRL settings changed from `trl.GRPOConfig`'s defaults, each to match what ours does:
  * `activation_checkpointing=False` (TRL's GRPOConfig defaults gradient checkpointing ON; ours has none: it
    recomputes the decoder in the backward pass, i.e. extra work, which also lowers its memory);
  * `bf16=False` (TRL turns on bf16 autocast on capable devices; ours trains in fp32);
  * `use_bias_correction_kl=False` (TRL 1.x multiplies the KL term by the importance ratio; ours is the plain k3
    penalty; it only matters with `--beta` > 0 and costs next to nothing);
  * `lr_scheduler_type="constant"` (TRL's default decays linearly; ours has a constant rate);
  * `optim="adamw_torch"` (TRL's default is `adamw_torch_fused`; ours is `torch.optim.AdamW` with torch's default
    implementation; `--trl-optim adamw_torch_fused` measures TRL's default instead);
  * `loss_type`, `beta`, `learning_rate`, `max_completion_length`, `num_generations`, `temperature`: set to the
    shared values (TRL's defaults are dapo, 0.0, 1e-6, 512, 8, 1.0);
  * bookkeeping off: `report_to="none"`, `logging_strategy="no"`, `save_strategy="no"`, `eval_strategy="no"`,
    `disable_tqdm=True`, `log_completions=False` (ours logs nothing either; both still compute their metrics).
  * The reference model (`--beta` > 0): TRL builds it by name from `model.config._name_or_path`, which here is the
    saved local directory, so it loads the same weights offline, through TRL's own code; ours deep-copies the policy.

Left as TRL does it: `disable_dropout=False` (the models have no dropout), `shuffle_dataset=True` (ours shuffles
too), `top_entropy_quantile=1.0`, `mask_truncated_completions=False`, TRL's fused chunked LM head for log-probs
(ours: `--logprob-chunk-size`, 0 = the model's own full logits, as `grpo.logprob_chunk_size` defaults).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# `python bench/grpo_vs_trl.py` puts bench/, not the repo root, on the path
sys.path.insert(0, str(ROOT))
# Models from configs only: nothing may reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IMPLEMENTATIONS = ("ours", "trl")
LABELS = {"ours": "ours (grpo_steps GRPOTrainer.train_step)", "trl": "TRL GRPOTrainer"}
RATIO_LABEL = "ratio ours/TRL"
PRESETS = ("tiny", "micro", "qwen2.5-0.5b")
# Qwen2.5-0.5B's shape (random weights): only meant for a GPU.
QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
N_PROMPTS = 400  # distinct task prompts in the dataset (more than any run consumes)
MAX_OPERAND = 99
OPERATIONS = ["+", "-"]


# ----------------------------------------------------------------------------------------------------------------
# model and tokenizer (parent)


def bench_tokenizer(vocab_size: int | None = None):
    """The project's character tokenizer, padded with inert tokens `<v123>` to `vocab_size` entries.

    The extra tokens are never produced when encoding (every character is its own token) but decode, so a model
    with a large vocabulary can sample them and the completion still decodes to text.
    """
    from grpo_steps.data.tokenizer import build_tokenizer

    tok = build_tokenizer()
    if vocab_size is None or vocab_size == len(tok):
        return tok
    if vocab_size < len(tok):
        raise ValueError(f"--vocab-size {vocab_size} is below the tokenizer's {len(tok)} tokens")
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    vocab = dict(core.get_vocab())
    for i in range(len(vocab), vocab_size):
        vocab[f"<v{i}>"] = i
    padded = Tokenizer(models.WordLevel(vocab=vocab, unk_token=tok.unk_token))
    padded.pre_tokenizer = core.pre_tokenizer
    padded.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=padded, pad_token=tok.pad_token, bos_token=tok.bos_token,
                                  eos_token=tok.eos_token, unk_token=tok.unk_token, padding_side="left")
    out.model_max_length = tok.model_max_length
    assert len(out) == vocab_size
    return out


def build_model(preset: str, tokenizer, max_length: int):
    """A randomly initialised causal LM of the preset's shape, its vocabulary the tokenizer's."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from grpo_steps.platform.config import ModelConfig
    from grpo_steps.platform.modeling import build_policy

    positions = max(64, 1 << math.ceil(math.log2(max_length)))
    if preset == "tiny":  # the pipeline's default policy (params.yaml `model`)
        return build_policy(ModelConfig(max_position_embeddings=positions), tokenizer)
    if preset == "micro":  # for the smoke test: seconds per run
        return build_policy(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                        max_position_embeddings=positions), tokenizer)
    if preset == "qwen2.5-0.5b":
        cfg = Qwen2Config(**{**QWEN25_05B, "vocab_size": len(tokenizer)}, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model
    raise ValueError(f"unknown preset {preset!r}")


def prepare_model_dir(args, directory: Path) -> dict[str, Any]:
    from grpo_steps.platform.modeling import seed_everything

    tok = bench_tokenizer(args.vocab_size if args.vocab_size is not None
                          else (QWEN25_05B["vocab_size"] if args.model_preset == "qwen2.5-0.5b" else None))
    seed_everything(args.seed)
    model = build_model(args.model_preset, tok, 16 + args.completion_length)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    info = {"preset": args.model_preset, "vocab_size": len(tok),
            "parameters": sum(p.numel() for p in model.parameters()),
            "hidden_size": model.config.hidden_size, "num_layers": model.config.num_hidden_layers}
    return info


# ----------------------------------------------------------------------------------------------------------------
# children


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _prompt_rows(seed: int) -> list[dict[str, str]]:
    from grpo_steps.data.task import make_splits

    problems = make_splits(seed, {"train": N_PROMPTS}, MAX_OPERAND, OPERATIONS)["train"]
    return [{"prompt": p.prompt, "answer": p.answer} for p in problems]


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _micro(s: dict[str, Any]) -> int:
    """Rows per forward/backward on both sides (one optimizer step per generation batch of P x G rows)."""
    rows = s["prompts_per_step"] * s["num_generations"]
    micro = s.get("micro_batch_size") or rows
    if rows % micro:
        raise SystemExit(f"--micro-batch-size {micro} must divide P x G = {rows}")
    return micro


def _total_steps(s: dict[str, Any]) -> int:
    return s["warmup_steps"] + s["steps"]


LORA = {"r": 16, "alpha": 32}  # --lora-bf16: both sides' adapter (all linear layers) on a bf16 base


def build_ours(s: dict[str, Any], model_dir: Path):
    """(our GRPOTrainer, its PromptSampler) for the settings `s`, on the saved model."""
    from accelerate import Accelerator

    from grpo_steps.grpo.trainer import GRPOTrainer, PromptSampler
    from grpo_steps.platform.config import GRPOConfig
    from grpo_steps.platform.modeling import load_policy, load_tokenizer, seed_everything

    rows = _prompt_rows(s["seed"])
    tok = load_tokenizer(model_dir)
    model = load_policy(model_dir, dtype="bfloat16" if s.get("lora_bf16") else "float32")
    if s.get("lora_bf16"):
        from grpo_steps.platform.config import LoraConfig
        from grpo_steps.platform.modeling import apply_lora

        model = apply_lora(model, LoraConfig(**LORA))
    cfg = GRPOConfig(
        steps=_total_steps(s), prompts_per_step=s["prompts_per_step"], num_generations=s["num_generations"],
        micro_batch_size=_micro(s), micro_batch_tokens=s.get("micro_batch_tokens"), mu=1,
        max_completion_length=s["completion_length"], temperature=s["temperature"], learning_rate=s["lr"],
        weight_decay=0.0, max_grad_norm=1.0, beta=s["beta"], epsilon=0.2, loss_type=s["loss_type"],
        scale_rewards="group", logprob_chunk_size=s["logprob_chunk_size"],
        generation_backend=s.get("generation_backend", "compact"), share_prompt=s.get("share_prompt", True),
        merge_identical_rows=s.get("merge_identical_rows", True),
    )
    seed_everything(s["seed"])
    trainer = GRPOTrainer(model, tok, [reward_function(s)], [1.0], cfg, seed=s["seed"],
                          accelerator=Accelerator(cpu=s["device"] == "cpu"))
    return trainer, PromptSampler(rows, s["seed"])


def train_ours(s: dict[str, Any], model_dir: Path, on_step_end: Callable[[], None] | None = None) -> list[float]:
    """Run `_total_steps(s)` steps of ours (the loop body of `GRPOTrainer.fit`); completion tokens per step."""
    trainer, sampler = build_ours(s, model_dir)
    tokens = []
    for _ in range(_total_steps(s)):
        metrics = trainer.train_step(sampler.next(trainer.cfg.prompts_per_step))
        _sync(s["device"])
        if on_step_end is not None:
            on_step_end()
        tokens.append(metrics["num_tokens"])
        SKIPPED.append(metrics["frac_rows_skipped"])
    return tokens


SKIPPED: list[float] = []  # ours: the share of rows whose forward/backward was skipped (zero advantage), per step


def shorter_is_better(prompts, completions, **_):
    """A reward every group spreads on (completion length in characters, negated): each row has a gradient."""
    return [-len(c) / 128 for c in completions]


def reward_function(s: dict[str, Any]):
    """The benchmark's reward (`--reward`): exact_match, which an untrained model almost never earns (so with
    beta 0 nearly every row has advantage 0), or shorter_is_better, on which every group has a spread."""
    from grpo_steps.grpo.rewards import exact_match

    return shorter_is_better if s.get("reward") == "shorter_is_better" else exact_match


def _counting(fn, counts: list[int]):
    """`fn` for TRL, recording the completion tokens of each call (TRL passes the masked `completion_ids`)."""

    def wrapped(prompts, completions, completion_ids, **kwargs):
        counts.append(sum(len(ids) for ids in completion_ids))
        return fn(prompts=prompts, completions=completions, **kwargs)

    wrapped.__name__ = fn.__name__
    return wrapped


def trl_config(s: dict[str, Any], output_dir: str):
    """TRL's GRPOConfig for the settings `s`; every departure from its defaults is listed in the module docstring."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir, report_to="none", use_cpu=s["device"] == "cpu", bf16=False, fp16=False,
        per_device_train_batch_size=_micro(s),
        num_generations=s["num_generations"], num_iterations=1,
        gradient_accumulation_steps=s["prompts_per_step"] * s["num_generations"] // _micro(s),
        max_steps=_total_steps(s), max_completion_length=s["completion_length"], temperature=s["temperature"],
        top_k=0, top_p=1.0, use_vllm=False, learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim=s["trl_optim"], beta=s["beta"], epsilon=0.2,
        loss_type=s["loss_type"], scale_rewards="group", use_bias_correction_kl=False,
        activation_checkpointing=False, logging_strategy="no", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, log_completions=False, dataloader_num_workers=0, seed=s["seed"],
    )


def build_trl(s: dict[str, Any], model_dir: Path, output_dir: str, counts: list[int], callbacks: list | None = None):
    """TRL's GRPOTrainer for the settings `s`, on the saved model; `counts` receives completion tokens per step."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer

    from grpo_steps.platform.modeling import load_tokenizer, seed_everything

    rows = _prompt_rows(s["seed"])
    tok = load_tokenizer(model_dir)
    # Loaded by path, so `config._name_or_path` is this directory: with beta > 0 TRL builds its reference from it.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True,
                                                 dtype=torch.bfloat16 if s.get("lora_bf16") else torch.float32)
    peft_config = None
    if s.get("lora_bf16"):  # the same adapter as ours; TRL's reference is then the base with the adapter off
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                                 task_type="CAUSAL_LM", bias="none")
    args = trl_config(s, output_dir)
    seed_everything(s["seed"])
    trainer = GRPOTrainer(model=model, reward_funcs=_counting(reward_function(s), counts), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=callbacks,
                          peft_config=peft_config)
    rows = s["prompts_per_step"] * s["num_generations"]
    assert not trainer.args.gradient_checkpointing and trainer.args.steps_per_generation * _micro(s) == rows
    assert (trainer.ref_model is not None) == (s["beta"] != 0.0 and not s.get("lora_bf16"))
    return trainer


def train_trl(s: dict[str, Any], model_dir: Path, on_step_end: Callable[[], None] | None = None) -> list[int]:
    """Run `_total_steps(s)` steps of TRL (`trainer.train()`); completion tokens per step."""
    from transformers import TrainerCallback

    counts: list[int] = []
    steps = [0]

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync(s["device"])
            steps[0] += 1
            if on_step_end is not None:
                on_step_end()

    with tempfile.TemporaryDirectory(prefix="grpo-bench-trl-") as out:
        build_trl(s, model_dir, out, counts, [StepEnd()]).train()
    if len(counts) != steps[0]:
        raise RuntimeError(f"{len(counts)} reward calls for {steps[0]} steps: TRL's loop changed")
    return counts


def child_main(impl: str, settings: dict[str, Any], model_dir: Path, result_file: Path) -> None:
    import torch

    if settings["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    if settings["threads"] > 0:
        torch.set_num_threads(settings["threads"])
    # What each side imports, imported before the baseline RSS is read, so "above imports" is training alone.
    if impl == "ours":
        import grpo_steps.grpo.trainer  # noqa: F401
    else:
        from datasets import Dataset  # noqa: F401
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401  (trl imports lazily: name the classes)

        import grpo_steps.grpo.rewards  # noqa: F401
    base_rss = _rss()
    if settings["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ends: list[float] = []
    cpu_ends: list[float] = []

    def on_step_end() -> None:
        ends.append(time.perf_counter())
        cpu_ends.append(time.process_time())

    tokens = (train_ours if impl == "ours" else train_trl)(settings, model_dir, on_step_end)
    w = settings["warmup_steps"]
    if w < 1 or len(ends) != w + settings["steps"]:
        raise RuntimeError(f"{len(ends)} steps ran, {w} + {settings['steps']} expected")
    elapsed = ends[-1] - ends[w - 1]  # from the end of the last warm-up step
    cpu = cpu_ends[-1] - cpu_ends[w - 1]
    timed_tokens = float(sum(tokens[w:]))
    out = {
        "impl": impl,
        "steps": settings["steps"],
        "elapsed_s": elapsed,
        "steps_per_s": settings["steps"] / elapsed,
        "cpu_s": cpu,
        "steps_per_cpu_s": settings["steps"] / cpu,
        "tokens_per_s": timed_tokens / elapsed,
        "mean_completion_tokens_per_step": timed_tokens / settings["steps"],
        "step_times_s": [b - a for a, b in zip(ends[w - 1 : -1], ends[w:], strict=True)],
        "base_rss_mib": base_rss / 2**20,
        "peak_rss_mib": _peak_rss() / 2**20,
        "frac_rows_skipped": sum(SKIPPED[w:]) / max(len(SKIPPED[w:]), 1) if impl == "ours" else 0.0,
    }
    out["peak_rss_above_imports_mib"] = out["peak_rss_mib"] - out["base_rss_mib"]
    if settings["device"] == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result_file.write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------------------------------
# parent: alternate the children, aggregate, print


def _run_child(impl: str, settings: dict[str, Any], model_dir: Path, work: Path, round_: int) -> dict[str, Any]:
    result_file = work / f"{impl}-{round_}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--model-dir", str(model_dir),
           "--settings-json", json.dumps(settings), "--result-file", str(result_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0 or not result_file.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"the {impl} child failed (exit {proc.returncode}); its output is above")
    return json.loads(result_file.read_text())


def _median_range(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def memory_columns(device: str) -> list[tuple[str, str]]:
    if device == "cuda":
        return [("cuda_peak_allocated_mib", "peak CUDA memory allocated (MiB)")]
    return [("peak_rss_mib", "peak RSS (MiB)"), ("peak_rss_above_imports_mib", "peak RSS above imports (MiB)")]


def summarise(results: dict[str, list[dict[str, Any]]], device: str) -> dict[str, Any]:
    keys = [("steps_per_s", "steps/s", ".3f"), ("tokens_per_s", "completion tokens/s", ".1f")]
    if device == "cpu":
        keys.append(("steps_per_cpu_s", "steps per CPU-second", ".3f"))
    keys += [(k, label, ".0f") for k, label in memory_columns(device)]
    medians = {impl: {k: statistics.median(r[k] for r in results[impl]) for k, _, _ in keys} for impl in results}
    ratios = {k: medians["ours"][k] / medians["trl"][k] if medians["trl"][k] else math.nan for k, _, _ in keys}
    header = ["implementation"] + [label for _, label, _ in keys]
    rows = [[LABELS[impl]] + [_median_range([r[k] for r in results[impl]], fmt) for k, _, fmt in keys]
            for impl in IMPLEMENTATIONS]
    rows.append([RATIO_LABEL] + [f"{ratios[k]:.2f}x" for k, _, _ in keys])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return {"markdown": "\n".join(lines), "medians": medians, "ratios": ratios}


def machine_description(device: str) -> str:
    import torch

    desc = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    try:
        import psutil

        desc += f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def add_step_arguments(p: argparse.ArgumentParser, steps: int = 10, warmup_steps: int = 2) -> None:
    """The settings of one measured run (model, batch, update, ours' options), shared with bench/profile_step.py."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model-preset", choices=PRESETS, default="tiny",
                   help="tiny: the pipeline's default policy (hidden 128, 4 layers); micro: a smoke-test model; "
                   "qwen2.5-0.5b: Qwen2.5-0.5B's shape with random weights (meant for a GPU; on CPU one step of "
                   "8 x 256 tokens peaks at ~17 GiB and takes ~10 minutes)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size (the character tokenizer padded with inert tokens); default: the "
                   "tokenizer's own for tiny/micro, 151936 for qwen2.5-0.5b")
    p.add_argument("--completion-length", type=int, default=32, help="max completion length (max_new_tokens)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="distinct prompts per step (P)")
    p.add_argument("--num-generations", type=int, default=8, help="group size G")
    p.add_argument("--steps", type=int, default=steps, help="timed steps per run")
    p.add_argument("--warmup-steps", type=int, default=warmup_steps, help="untimed steps before the timed ones")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (constant)")
    p.add_argument("--beta", type=float, default=0.02, help="KL coefficient (> 0: both sides run a reference model)")
    p.add_argument("--loss-type", choices=("grpo", "dr_grpo", "dapo"), default="grpo")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads in each child (0: torch's default, one per core). 1 by default: "
                   "on a small shared machine, several threads per run make timings follow the neighbours' load")
    p.add_argument("--logprob-chunk-size", type=int, default=0, help="ours: grpo.logprob_chunk_size")
    p.add_argument("--reward", choices=("exact_match", "shorter_is_better"), default="exact_match",
                   help="exact_match: rarely earned by the random model (zero-advantage groups); shorter_is_better: "
                   "every group spreads, so every row has a gradient")
    p.add_argument("--generation-backend", choices=("hf", "compact"), default="compact",
                   help="ours: grpo.generation_backend (compact, the default: each prompt prefilled once, finished "
                   "rows leave the decoding batch; TRL keeps transformers generate either way)")
    p.add_argument("--micro-batch-size", type=int, default=0,
                   help="rows per forward/backward on both sides, dividing P x G (default 0: all of them, one "
                   "micro-batch); TRL accumulates P x G / this many, ours sorts the rows by length first")
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="ours: grpo.micro_batch_tokens (micro-batches also cut by completion positions, shortest "
                   "rows first; the same update as the micro-batch size alone gives). TRL has no such setting")
    p.add_argument("--no-share-prompt", dest="share_prompt", action="store_false",
                   help="ours: grpo.share_prompt off (every row's prompt computed in every pass, as TRL does)")
    p.add_argument("--no-merge-rows", dest="merge_identical_rows", action="store_false",
                   help="ours: grpo.merge_identical_rows off (identical completions each computed, as TRL does)")
    p.add_argument("--lora-bf16", action="store_true",
                   help="both sides train a LoRA adapter (r=16, all linear layers) on bf16 weights (default: fp32, "
                   "every weight)")
    p.add_argument("--trl-optim", default="adamw_torch",
                   help="TRL's `optim`; adamw_torch matches ours, TRL's default is adamw_torch_fused")


SETTING_KEYS = ("device", "completion_length", "prompts_per_step", "num_generations", "steps", "warmup_steps", "lr",
                "beta", "loss_type", "temperature", "seed", "logprob_chunk_size", "trl_optim", "threads",
                "generation_backend", "reward", "share_prompt", "micro_batch_size", "micro_batch_tokens",
                "merge_identical_rows", "lora_bf16")


def micro_batch_text(args: argparse.Namespace) -> str:
    """The micro-batches of a run, as its printed context says them."""
    tokens = f" (ours: at most {args.micro_batch_tokens} positions)" if args.micro_batch_tokens else ""
    return f"micro-batch {args.micro_batch_size or 'P x G'}{tokens}"


def step_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a child needs of the parsed arguments (JSON-able)."""
    return {k: getattr(args, k) for k in SETTING_KEYS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark our GRPO step against TRL's GRPOTrainer at equal settings (each run in its own "
        "subprocess, alternating ours/TRL). See the module docstring for every setting made equal.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_step_arguments(p)
    p.add_argument("--repeats", type=int, default=2, help="rounds of (ours, TRL)")
    p.add_argument("--out", type=Path, default=None,
                   help="write the table and the raw results to OUT.md and OUT.json")
    # internal: one measurement in this process
    p.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--settings-json", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup_steps < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup-steps, --steps and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, json.loads(args.settings_json), args.model_dir, args.result_file)
        return 0

    import torch
    import transformers
    import trl

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.model_preset == "qwen2.5-0.5b" and args.device == "cpu":
        print("warning: qwen2.5-0.5b on CPU: ~10 GiB per run for weights, reference, gradients and AdamW state, "
              "~17 GiB at 8 completions of 256 tokens, and minutes per step; it is meant for --device cuda",
              file=sys.stderr)
    settings = step_settings(args)
    load_before = _load()
    results: dict[str, list[dict[str, Any]]] = {impl: [] for impl in IMPLEMENTATIONS}
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        model_info = prepare_model_dir(args, model_dir)
        for round_ in range(args.repeats):
            for impl in IMPLEMENTATIONS:
                r = _run_child(impl, settings, model_dir, work, round_)
                results[impl].append(r)
                print(f"round {round_ + 1}/{args.repeats} {impl}: {r['steps_per_s']:.3f} steps/s, "
                      f"{r['steps_per_cpu_s']:.3f} steps/CPU-s, {r['tokens_per_s']:.1f} tokens/s, "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    load_after = _load()
    summary = summarise(results, args.device)
    context = (
        f"model {model_info['preset']} ({model_info['parameters']:,} parameters, hidden "
        f"{model_info['hidden_size']}, {model_info['num_layers']} layers, vocab {model_info['vocab_size']}); "
        f"device {args.device}; P={args.prompts_per_step} prompts x G={args.num_generations}, max completion "
        f"length {args.completion_length}, torch threads per run {args.threads or 'default'}, beta {args.beta}, "
        f"loss {args.loss_type}, lr {args.lr}, ours logprob_chunk_size {args.logprob_chunk_size}, ours generation "
        f"backend {args.generation_backend}, ours share_prompt {args.share_prompt}, merge rows "
        f"{args.merge_identical_rows}, {'LoRA r=16 on bf16 weights' if args.lora_bf16 else 'fp32, every weight'}, "
        f"{micro_batch_text(args)}, reward {args.reward}, TRL optim "
        f"{args.trl_optim}, temperature "
        f"{args.temperature}, seed {args.seed}; {args.warmup_steps} warm-up + {args.steps} timed steps, "
        f"{args.repeats} repeat(s), median (min-max)\n"
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; machine: "
        f"{machine_description(args.device)}; load average (1, 5, 15 min) before {load_before}, after {load_after}"
    )
    print(context + "\n")
    print(summary["markdown"])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        stem = args.out.with_suffix("") if args.out.suffix in (".md", ".json") else args.out
        Path(f"{stem}.md").write_text(context + "\n\n" + summary["markdown"] + "\n")
        Path(f"{stem}.json").write_text(json.dumps({
            "settings": settings, "model": model_info, "load_before": load_before, "load_after": load_after,
            "machine": machine_description(args.device), "versions": {"torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__},
            "medians": summary["medians"], "ratios": summary["ratios"], "runs": results,
            "markdown": summary["markdown"],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
