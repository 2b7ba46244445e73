"""Peak memory of per-token log-probs (forward + backward) with a large vocabulary: ours, chunked or not, and TRL's.

    python bench/logprob_memory.py                          # vocab 151,936, completion 512, batch 8, CPU
    python bench/logprob_memory.py --batch 2 --chunk-sizes 1 2
    python bench/logprob_memory.py --device cuda            # on a GPU: torch.cuda.max_memory_allocated

The model is tiny everywhere except its vocabulary (hidden 64, 2 layers, tied embeddings, Qwen2 architecture), so
the memory measured is the log-prob computation's: full (batch, completion, vocab) fp32 logits are
batch x 512 x 151,936 x 4 bytes = 2.3 GiB at batch 8.

Every variant runs in a fresh subprocess on the same seeded model and inputs (prompt of 16 tokens, a completion
of `--completion-length` tokens, a few rows right-padded), computes the log-probs of the completion tokens and
their entropy (as both trainers do, entropy as a metric), then backward of the masked mean log-prob. Memory: on
CPU, RSS sampled every millisecond by a thread during forward + backward, minus the RSS just before (the model and
inputs already built); `ru_maxrss` minus the same baseline is reported too. On CUDA: `max_memory_allocated` minus
the allocated memory before. Each child also saves its log-probs and gradients, and the parent compares them with
ours unchunked.

Variants:
  * ours, unchunked: `completion_logps(..., chunk_size=0)`, the model's own (B, L, V) logits.
  * ours, chunk_size=N: `completion_logps(..., chunk_size=N)`: decoder once, LM head N rows at a time under
    activation checkpointing.
  * TRL selective_log_softmax: TRL's pre-1.x per-token-logps path, on full logits: `model(...).logits`,
    divided by the temperature, `trl.trainer.utils.selective_log_softmax`, entropy by `entropy_from_logits` under
    no_grad (exactly what `GRPOTrainer._get_per_token_logps_and_entropies` did before TRL added its fused head).
  * TRL fused LM head: what TRL 1.16's `GRPOTrainer` runs: `add_fused_lm_head(model, outputs=("log_probs",
    "entropy"))` as its `__init__` does, then `GRPOTrainer._get_per_token_logps_and_entropies` itself (called with
    a stand-in `self` whose `accelerator.autocast()` is a no-op, as TRL's is in fp32), which projects 4,096 tokens
    x 32,768 vocabulary columns at a time in a custom autograd function (on CPU, without Triton, its tiles are
    processed with plain torch ops, which allocate several tile-sized temporaries).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT_LEN = 16
PAD_ID, EOS_ID = 0, 2
TRL_CLASSIC = "trl_selective_log_softmax"
TRL_FUSED = "trl_fused_lm_head"
REFERENCE = "ours_unchunked"


def variant_label(name: str) -> str:
    if name == REFERENCE:
        return "ours, unchunked (chunk_size=0)"
    if name.startswith("ours_chunk"):
        return f"ours, chunk_size={name.removeprefix('ours_chunk')}"
    return {TRL_CLASSIC: "TRL selective_log_softmax (full logits)",
            TRL_FUSED: "TRL 1.16 GRPOTrainer fused LM head"}[name]


def build_model(vocab_size: int, hidden: int, layers: int, max_positions: int, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=max_positions, tie_word_embeddings=True,
                      pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=1)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def make_inputs(vocab_size: int, batch: int, completion_length: int, seed: int):
    """(input_ids, attention_mask, completion_mask): equal-length prompts, some completions right-padded."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(4, vocab_size, (batch, PROMPT_LEN + completion_length), generator=g)
    lengths = torch.full((batch,), completion_length)
    lengths[1::3] = completion_length // 2  # every third row stops at EOS half-way
    completion_mask = (torch.arange(completion_length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    rows = torch.arange(batch)
    short = lengths < completion_length
    ids[rows[short], PROMPT_LEN + lengths[short] - 1] = EOS_ID
    ids[:, PROMPT_LEN:] = ids[:, PROMPT_LEN:].masked_fill(completion_mask == 0, PAD_ID)
    attention_mask = torch.cat([torch.ones(batch, PROMPT_LEN, dtype=torch.long), completion_mask], 1)
    return ids, attention_mask, completion_mask


def ours_logps(model, ids, attention_mask, logits_to_keep: int, chunk_size: int, temperature: float):
    from grpo_steps.grpo.logprobs import completion_logps

    return completion_logps(model, ids, attention_mask, logits_to_keep, temperature, chunk_size,
                            compute_entropy=True)


def trl_classic_logps(model, ids, attention_mask, logits_to_keep: int, temperature: float):
    """TRL's per-token log-probs before its fused head: full logits, `selective_log_softmax`."""
    import torch
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logits = model(input_ids=ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1).logits
    logits = logits[:, :-1, :] / temperature
    logps = selective_log_softmax(logits, ids[:, -logits_to_keep:])
    with torch.no_grad():
        entropy = entropy_from_logits(logits)
    return logps, entropy


def prepare_trl_fused(model, temperature: float):
    """Patch the model as TRL's GRPOTrainer.__init__ does; return (the trainer's method, a stand-in `self`).

    The method uses nothing of `self` but `self.accelerator`: `autocast()`, a no-op without mixed precision (fp32
    here, as `bf16=False` in the benchmark), and `is_main_process` for TRL's profiling decorator (a timer). The
    stand-in's are `nullcontext` and True, so no process-wide accelerate state is created (a test process shares
    it with every other test).
    """
    from contextlib import nullcontext
    from types import SimpleNamespace

    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=False, outputs=("log_probs", "entropy"))
    stand_in = SimpleNamespace(accelerator=SimpleNamespace(autocast=nullcontext, is_main_process=True))
    return GRPOTrainer._get_per_token_logps_and_entropies, stand_in


class RSSSampler:
    """Highest RSS seen by a thread polling every `interval` seconds (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.001):
        import psutil

        self._proc, self._interval = psutil.Process(), interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def child(variant: str, s: dict[str, Any], out_file: Path) -> None:
    import gc
    import resource

    import psutil
    import torch

    if s["threads"] > 0:
        torch.set_num_threads(s["threads"])
    device = s["device"]
    model = build_model(s["vocab_size"], s["hidden"], s["layers"], PROMPT_LEN + s["completion_length"] + 8,
                        s["seed"]).to(device)
    model.train()
    ids, attention_mask, completion_mask = (t.to(device) for t in make_inputs(
        s["vocab_size"], s["batch"], s["completion_length"], s["seed"]))
    L, T = s["completion_length"], s["temperature"]
    if variant == REFERENCE or variant.startswith("ours_chunk"):
        import grpo_steps.grpo.logprobs  # noqa: F401  (imported before the baseline)

        chunk = 0 if variant == REFERENCE else int(variant.removeprefix("ours_chunk"))

        def run():
            return ours_logps(model, ids, attention_mask, L, chunk, T)
    elif variant == TRL_CLASSIC:
        import trl.trainer.utils  # noqa: F401

        def run():
            return trl_classic_logps(model, ids, attention_mask, L, T)
    elif variant == TRL_FUSED:
        method, stand_in = prepare_trl_fused(model, T)

        def run():
            logps, entropy, _ = method(stand_in, model, ids, attention_mask, L, compute_entropy=True)
            return logps, entropy
    else:
        raise ValueError(variant)

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    base_rss = psutil.Process().memory_info().rss
    t0, c0 = time.perf_counter(), time.process_time()
    with RSSSampler() as sampler:
        logps, entropy = run()
        mask = completion_mask.to(logps.dtype)
        loss = -(logps * mask).sum() / mask.sum()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    result = {
        "variant": variant, "wall_s": wall, "cpu_s": cpu,
        "peak_rss_above_baseline_mib": (sampler.peak - base_rss) / 2**20,
        "maxrss_above_baseline_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss) / 2**20,
        "baseline_rss_mib": base_rss / 2**20,
    }
    if device == "cuda":
        result["cuda_peak_above_baseline_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    torch.save({"logps": (logps.detach() * mask).cpu(), "entropy": (entropy.detach() * mask).cpu(),
                "grads": {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}},
               out_file.with_suffix(".pt"))
    out_file.write_text(json.dumps(result))


def compare(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    grads = max(float((reference["grads"][k] - other["grads"][k]).abs().max()) for k in reference["grads"])
    return {"max_abs_logp_diff": float((reference["logps"] - other["logps"]).abs().max()),
            "max_abs_entropy_diff": float((reference["entropy"] - other["entropy"]).abs().max()),
            "max_abs_grad_diff": grads,
            "max_abs_grad": max(float(g.abs().max()) for g in reference["grads"].values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--vocab-size", type=int, default=151936)
    p.add_argument("--completion-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[4, 2, 1], help="ours, rows per chunk")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (0: torch's default)")
    p.add_argument("--variants", nargs="+", choices=("ours_unchunked", "ours_chunked", "trl_classic", "trl_fused"),
                   default=["ours_unchunked", "ours_chunked", "trl_classic", "trl_fused"],
                   help="which to run; log-probs and gradients are compared with the first of ours unchunked, TRL "
                   "selective_log_softmax, TRL fused that runs")
    p.add_argument("--force", action="store_true", help="run even where the memory guard would refuse")
    p.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--settings-json", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, json.loads(args.settings_json), args.result_file)
        return 0

    import psutil
    import torch

    settings = {k: getattr(args, k) for k in ("device", "vocab_size", "completion_length", "batch", "hidden",
                                              "layers", "temperature", "seed", "threads")}
    full_logits = args.batch * args.completion_length * args.vocab_size * 4
    variants = [REFERENCE] if "ours_unchunked" in args.variants else []
    variants += [f"ours_chunk{c}" for c in args.chunk_sizes] if "ours_chunked" in args.variants else []
    variants += [TRL_CLASSIC] if "trl_classic" in args.variants else []
    variants += [TRL_FUSED] if "trl_fused" in args.variants else []
    # Measured on CPU: ours unchunked peaks at ~5x the full (B, L, V) fp32 logits, TRL's classic path at ~3x. The
    # machines this runs on are shared: refuse rather than push others into swap or the OOM killer.
    need = max([5.5 * full_logits] * (REFERENCE in variants) + [3.5 * full_logits] * (TRL_CLASSIC in variants) + [0])
    available = psutil.virtual_memory().available
    if args.device == "cpu" and need > 0.8 * available and not args.force:
        print(f"full logits are {full_logits / 2**30:.1f} GiB; the full-logits variants would need ~"
              f"{need / 2**30:.0f} GiB and {available / 2**30:.1f} GiB is available: lower --batch, leave them out "
              "with --variants, or pass --force", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    results, tensors = {}, {}
    with tempfile.TemporaryDirectory(prefix="logprob-memory-") as tmp:
        for v in variants:
            out = Path(tmp) / f"{v}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", v, "--settings-json",
                   json.dumps(settings), "--result-file", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                print(f"variant {v} failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            results[v] = json.loads(out.read_text())
            tensors[v] = torch.load(out.with_suffix(".pt"))
            print(f"{variant_label(v)}: {results[v]['peak_rss_above_baseline_mib']:.0f} MiB", file=sys.stderr)
    reference = next(v for v in (REFERENCE, TRL_CLASSIC, TRL_FUSED, *variants) if v in tensors)
    for v in variants:
        results[v].update(compare(tensors[reference], tensors[v]))

    mem_key = "cuda_peak_above_baseline_mib" if args.device == "cuda" else "peak_rss_above_baseline_mib"
    mem_label = "peak CUDA memory above baseline (MiB)" if args.device == "cuda" else "peak RSS above baseline (MiB)"
    trl_names = [n for n in (TRL_CLASSIC, TRL_FUSED) if n in results]
    header = ["variant", mem_label] + [f"ratio to {variant_label(n)}" for n in trl_names]
    if args.device == "cpu":
        header.append("ru_maxrss above baseline (MiB)")
    header += [f"max abs logp diff vs {variant_label(reference)}", "max abs grad diff", "CPU s" if
               args.device == "cpu" else "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        r = results[v]
        row = [variant_label(v), f"{r[mem_key]:.0f}"]
        row += [f"{r[mem_key] / results[n][mem_key]:.2f}" for n in trl_names]
        if args.device == "cpu":
            row.append(f"{r['maxrss_above_baseline_mib']:.0f}")
        row += [f"{r['max_abs_logp_diff']:.1e}", f"{r['max_abs_grad_diff']:.1e}",
                f"{r['cpu_s'] if args.device == 'cpu' else r['wall_s']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    load_after = os.getloadavg()
    context = (f"vocab {args.vocab_size:,}, completion length {args.completion_length}, prompt {PROMPT_LEN}, batch "
               f"{args.batch}, hidden {args.hidden}, {args.layers} layers, fp32, {args.device}, "
               f"{args.threads or 'default'} thread(s); full (B, L, V) fp32 logits = {full_logits / 2**20:.0f} MiB; "
               f"forward (log-probs + entropy) + backward of the masked mean log-prob; max |grad| "
               f"{results[reference]['max_abs_grad']:.1e}; {os.cpu_count()} CPU cores, load average before "
               f"{', '.join(f'{x:.2f}' for x in load_before)}, after {', '.join(f'{x:.2f}' for x in load_after)}")
    table = "\n".join(lines)
    print(context + "\n")
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        stem = args.out.with_suffix("") if args.out.suffix in (".md", ".json") else args.out
        Path(f"{stem}.md").write_text(context + "\n\n" + table + "\n")
        Path(f"{stem}.json").write_text(json.dumps({"settings": settings, "results": results,
                                                    "markdown": table, "context": context}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
