"""The project's tokenizer, built locally and saved in the Hugging Face format (no hub access), so
`AutoTokenizer.from_pretrained(path)` loads it like any other.

* `char` (the default): the task's character set plus special tokens.
* `bpe`: a byte-level BPE trained on the task's own text, with a ChatML chat template, the shape of a chat
  model's tokenizer (`task.format: reasoning` runs through it as a user's chat model would).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
TASK_CHARACTERS = "0123456789+-*=() ?.:#abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,'\n"


def build_tokenizer(characters: str = TASK_CHARACTERS) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in dict.fromkeys(characters):
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    tok.model_max_length = 256
    return tok


def save_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    tok = build_tokenizer()
    tok.save_pretrained(str(path))
    return tok


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_PAD, CHAT_START, CHAT_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def build_bpe_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `corpus` (deterministic for the same corpus), digits split one by one,
    ChatML markers as special tokens, `<|im_end|>` as EOS: it ends the assistant's turn."""
    core = Tokenizer(models.BPE())
    # digits one by one, as Qwen2's and Llama 2's tokenizers split them: a number stays readable digit by digit
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)])
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[CHAT_PAD, CHAT_START, CHAT_END], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=CHAT_PAD, eos_token=CHAT_END,
                                  additional_special_tokens=[CHAT_START], padding_side="left")
    tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = 512
    return tok
