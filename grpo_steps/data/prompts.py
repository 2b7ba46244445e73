"""How a prompt becomes the policy's input text: one rendering, used by every stage that reads prompts.

A prompt in the data is a string or a conversation: a list of `{"role", "content"}` messages, as TRL accepts.
`render` turns it into the exact text the policy sees before its completion:

* with a chat template (the tokenizer's, `data.chat_template: auto`, or forced with `true`): the conversation,
  `data.system_prompt` first when set and the conversation has none, rendered with `add_generation_prompt`,
  so the text ends where the assistant's answer starts;
* without one (`false`, or a tokenizer that has none): the system prompt, a blank line, and the prompt (the
  messages' contents joined by blank lines), preceded by the tokenizer's BOS token when it adds one.

The rendered text is tokenized with `add_special_tokens=False` everywhere (grpo_steps/grpo/tokens.py):
whatever special tokens the model expects are already in it, never twice (TRL's rule for chat templates).
sft, train_reward, grpo and evaluate all render through here, so the reward model scores the same prompt the
policy answered, and validate counts prompt tokens on the rendered text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from grpo_steps.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Prompt = str | list[dict[str, str]]
ChatTemplate = Literal["auto"] | bool


class RenderError(UserError, ValueError):
    """A prompt that cannot be rendered as asked (no chat template, a malformed conversation)."""


def messages(prompt: Prompt, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The prompt as a conversation: a string becomes one user message; the system prompt comes first
    unless the conversation has its own."""
    if isinstance(prompt, str):
        conversation = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(_is_message(m) for m in prompt):
        conversation = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise RenderError(f"a prompt is a string or a list of {{role, content}} messages, not {prompt!r:.120}")
    if system_prompt and conversation[0]["role"] != "system":
        conversation.insert(0, {"role": "system", "content": system_prompt})
    return conversation


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: ChatTemplate = "auto") -> bool:
    if chat_template is True and not has_chat_template(tokenizer):
        raise RenderError("data.chat_template is true, but the policy's tokenizer has no chat template "
                          f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__})")
    return has_chat_template(tokenizer) if chat_template == "auto" else bool(chat_template)


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def render(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, system_prompt: str | None = None,
           chat_template: ChatTemplate = "auto") -> str:
    """The text the policy sees before its completion (see the module docstring)."""
    return render_all(tokenizer, [prompt], system_prompt, chat_template)[0]


def render_all(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], system_prompt: str | None = None,
               chat_template: ChatTemplate = "auto") -> list[str]:
    """`render` for many prompts; whether to use the template, and the tokenizer's BOS, are decided once."""
    conversations = [messages(p, system_prompt) for p in prompts]
    if uses_chat_template(tokenizer, chat_template):
        return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    bos = tokenizer.bos_token if _adds_bos(tokenizer) else ""
    return [bos + "\n\n".join(m["content"] for m in c) for c in conversations]
