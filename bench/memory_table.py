"""Peak memory of one GRPO step at Qwen2.5-0.5B's shape: fp32 full fine-tune against bf16, LoRA, and LoRA + bf16
+ chunked log-probs (the settings `model.dtype`, `model.lora`, `grpo.logprob_chunk_size`).

    python bench/memory_table.py                     # CPU: peak RSS, the whole table (~10 min on 2 cores)
    python bench/memory_table.py --device cuda       # GPU: torch.cuda.max_memory_allocated
    python bench/memory_table.py --variants fp32-full lora-bf16-chunked --preset micro   # seconds (the test's)

Each variant runs in a fresh subprocess, so its peak is its own. The child builds the model from Qwen2.5-0.5B's
config with seeded random weights directly in the variant's dtype (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4,864, vocabulary 151,936, tied embeddings: 494 M parameters; no hub download), wraps it in LoRA where
the variant says, and runs one `GRPOTrainer.train_step` with the pipeline's defaults otherwise: beta 0.02, so a
reference exists (a deep copy of the policy in a full fine-tune, the base with the adapter off under LoRA), AdamW,
`--prompts` prompts x `--generations` completions of at most `--completion-length` tokens, one micro-batch.

Memory: on CPU, the child's `ru_maxrss` (the whole process's high-water mark, imports included) and that peak
minus the RSS right after imports (what the model and training added); on CUDA, `max_memory_allocated` (weights,
reference, gradients, optimizer state, activations). The ratio column divides by the fp32 full fine-tune's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.grpo_vs_trl import QWEN25_05B, bench_tokenizer  # noqa: E402 - after the path set-up

# name -> (model.dtype, LoRA on, grpo.logprob_chunk_size, activation checkpointing)
VARIANTS: dict[str, tuple[str, bool, int, bool]] = {
    "fp32-full": ("float32", False, 0, False),
    "fp32-full-checkpointing": ("float32", False, 0, True),
    "bf16-full": ("bfloat16", False, 0, False),
    "lora-fp32": ("float32", True, 0, False),
    "lora-bf16-chunked": ("bfloat16", True, 4, False),
}
LABELS = {
    "fp32-full": "fp32, full fine-tune",
    "fp32-full-checkpointing": "fp32, full fine-tune, activation checkpointing",
    "bf16-full": "bf16 weights, full fine-tune",
    "lora-fp32": "LoRA r=16 all-linear, fp32 base",
    "lora-bf16-chunked": "LoRA r=16 + bf16 base + chunked log-probs (4 rows)",
}
BASELINE = "fp32-full"
MICRO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
             vocab_size=4096, max_position_embeddings=256, tie_word_embeddings=True)


def length_reward(prompts, completions, **_):
    """Rewards that differ within a group (so advantages, and the gradient, are not zero)."""
    return [float(len(c)) for c in completions]


def child(variant: str, preset: str, device: str, prompts: int, generations: int, length: int, seed: int) -> dict:
    import resource

    import psutil
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from grpo_steps.grpo.trainer import GRPOTrainer
    from grpo_steps.platform.config import GRPOConfig, LoraConfig
    from grpo_steps.platform.modeling import apply_lora, seed_everything

    dtype, lora, chunk, checkpointing = VARIANTS[variant]
    shape = QWEN25_05B if preset == "qwen2.5-0.5b" else MICRO
    tok = bench_tokenizer(shape["vocab_size"])
    after_imports = psutil.Process().memory_info().rss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seed_everything(seed)
    cfg = Qwen2Config(**shape, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).to(device)
    if checkpointing:
        model.activation_checkpointing_enable()
    model = apply_lora(model, LoraConfig(r=16, alpha=32) if lora else None)
    settings = GRPOConfig(prompts_per_step=prompts, num_generations=generations, micro_batch_size=prompts * generations,
                          max_completion_length=length, logprob_chunk_size=chunk, learning_rate=1e-6,
                          reward_functions=[{"name": "digit_match"}]).settings()
    from accelerate import Accelerator

    trainer = GRPOTrainer(model, tok, [length_reward], [1.0], settings, seed=seed,
                          accelerator=Accelerator(cpu=device == "cpu"))
    rows = [{"prompt": f"{10 + i}+{i}=", "answer": str(10 + 2 * i)} for i in range(prompts)]
    t0 = time.perf_counter()
    metrics = trainer.train_step(rows)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {
        "variant": variant, "seconds": seconds, "loss": metrics["loss"],
        "parameters": sum(p.numel() for p in trainer.unwrapped.parameters()),
        "trainable": sum(p.numel() for p in trainer.unwrapped.parameters() if p.requires_grad),
        "has_reference_copy": trainer.ref_model is not None,
    }
    if device == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.update(peak_bytes=peak, added_bytes=peak - after_imports)
    return out


def run_variant(args, variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", variant, "--out", str(result), "--preset", args.preset,
               "--device", args.device, "--prompts", str(args.prompts), "--generations", str(args.generations),
               "--completion-length", str(args.completion_length), "--seed", str(args.seed)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else dict(os.environ)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"variant {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def table(results: list[dict], device: str) -> str:
    base = next((r for r in results if r["variant"] == BASELINE), None)
    gib = 1024 ** 3
    head = "peak max_memory_allocated" if device == "cuda" else "peak RSS"
    lines = [f"| variant | trainable params | reference copy | {head} (GiB) | "
             + ("" if device == "cuda" else "added by training (GiB) | ") + f"ratio to {BASELINE} | step (s) |",
             "|---|---:|---|---:|" + ("" if device == "cuda" else "---:|") + "---:|---:|"]
    for r in results:
        ratio = f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if base else "-"
        added = "" if device == "cuda" else f"{r['added_bytes'] / gib:.2f} | "
        lines.append(f"| {LABELS[r['variant']]} | {r['trainable'] / 1e6:.2f} M | "
                     f"{'yes' if r['has_reference_copy'] else 'no (adapter off)'} | {r['peak_bytes'] / gib:.2f} | "
                     f"{added}{ratio} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--preset", choices=("qwen2.5-0.5b", "micro"), default="qwen2.5-0.5b")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (default: %(default)s)")
    p.add_argument("--generations", type=int, default=4, help="G, completions per prompt (default: %(default)s)")
    p.add_argument("--completion-length", type=int, default=8, help="max completion tokens (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each child (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.out.write_text(json.dumps(child(args.child, args.preset, args.device, args.prompts, args.generations,
                                             args.completion_length, args.seed)))
        return 0
    results = []
    for v in args.variants:
        results.append(run_variant(args, v))
        print(f"{v}: peak {results[-1]['peak_bytes'] / 1024 ** 3:.2f} GiB, {results[-1]['seconds']:.1f} s",
              file=sys.stderr, flush=True)
    cpu = platform.processor() or platform.machine()
    print(f"One GRPO step, {args.preset} shape, {args.prompts} prompts x {args.generations} completions of <= "
          f"{args.completion_length} tokens, beta 0.02, AdamW; {args.device} ({cpu}, {os.cpu_count()} cores)\n")
    print(table(results, args.device))
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": None, "out": None}, "results": results},
                                        indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
