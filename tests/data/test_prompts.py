"""One rendering of prompts for every stage: chat templates with the generation prompt, system prompts,
conversations, plain text with the tokenizer's BOS, and ids that never add special tokens twice."""

from __future__ import annotations

import pytest

from grpo_steps.data.prompts import RenderError, messages, render
from grpo_steps.data.tokenizer import build_tokenizer
from grpo_steps.grpo.reward_model import encode_pairs
from grpo_steps.grpo.tokens import encode, prompt_completion_ids
from tests.support.chat_policy import END, START, build_chat_policy


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = build_chat_policy(tmp_path_factory.mktemp("chat-policy"), hidden=16, layers=1)
    return AutoTokenizer.from_pretrained(str(folder))


def test_chat_template_with_the_generation_prompt_and_a_system_prompt(chat_tok):
    text = render(chat_tok, "What is 2 + 3?", "Show your work.")
    assert text == (f"{START}system\nShow your work.{END}\n{START}user\nWhat is 2 + 3?{END}\n{START}assistant\n")
    # a conversation keeps its own system message; the configured one is not added twice
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}]
    assert render(chat_tok, convo, "Show your work.").count(f"{START}system") == 1
    assert "Be brief." in render(chat_tok, convo, "Show your work.")
    # the markers are single special tokens, and encoding adds nothing around them
    ids = encode(chat_tok, text)
    assert ids[0] == chat_tok.convert_tokens_to_ids(START) and ids.count(chat_tok.convert_tokens_to_ids(END)) == 2


def test_plain_text_when_off_or_without_a_template(chat_tok):
    assert render(chat_tok, "2 + 3?", "Show your work.", chat_template=False) == "Show your work.\n\n2 + 3?"
    char = build_tokenizer()
    assert render(char, "2+3=") == "2+3=", "the embedded task's prompts are unchanged"
    with pytest.raises(RenderError, match="no chat template"):
        render(char, "2+3=", chat_template=True)
    with pytest.raises(RenderError, match="list of"):
        messages([{"role": "user"}])


def test_plain_text_keeps_the_tokenizers_bos_once():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["Question: 2 plus 3? Answer: 5"] * 20,
                             trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>", "</s>", "<unk>"]))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>")
    text = render(tok, "Question: 2 plus 3? Answer:")
    ids, start = prompt_completion_ids(tok, text, " 5")
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids[:start] == tok("Question: 2 plus 3? Answer:")["input_ids"], "the tokenizer's own encoding of it"
    _, _, completion = encode_pairs(tok, [text], [" 5"])
    assert completion[0].sum().item() == len(ids) - start, "the reward model scores exactly the completion + EOS"
