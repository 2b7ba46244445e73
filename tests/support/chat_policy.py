"""A user's model and data, built offline inside the tests: a Llama-shaped policy saved locally with a
byte-level BPE tokenizer (trained here with `tokenizers`) that carries a ChatML chat template, and a
GSM8K-style file whose answers reason and end in `#### <number>`."""

from __future__ import annotations

import json
import random
from pathlib import Path

from grpo_steps.data.tokenizer import CHAT_END as END
from grpo_steps.data.tokenizer import CHAT_START as START

__all__ = ["END", "START", "build_chat_policy", "gsm8k_rows", "write_gsm8k"]

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
THINGS = ["apples", "books", "coins", "shells", "stamps", "pens"]


def gsm8k_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """GSM8K-style rows: a word problem and a worked solution (with calculator annotations) ending in ####."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        question = f"{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have now?"
        solution = f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {thing}.\n#### {a + b}"
        rows.append({"question": question, "answer": solution})
    return rows


def write_gsm8k(path: Path, n: int, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows(n, seed)), encoding="utf-8")
    return path


def build_chat_policy(folder: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A small Llama with a byte-level BPE tokenizer and a ChatML template, saved as a user would have it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from grpo_steps.data.tokenizer import build_bpe_tokenizer

    corpus = [r["question"] + "\n" + r["answer"] for r in gsm8k_rows(400, seed=99)]
    corpus += ["You are a careful math tutor. Show your work, then give the answer after ####."] * 20
    tok = build_bpe_tokenizer(corpus, vocab_size=600)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder
