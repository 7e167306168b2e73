"""How a prompt row becomes what the policy's engine sees (`rollout.chat_template`).

- `auto`: the policy tokenizer's own chat template with the generation prompt, where it has one (instruct
  models); plain prompt text where it has none (the toy world, base models);
- `none`: plain prompt text (a row's messages are read as their readable prompt);
- a Jinja file path or an inline template: that template, with the generation prompt.

Templated prompts are rendered to token ids here and handed to vLLM as ids, so the template's own BOS is the only
one, and the learner trains on exactly the ids the engine saw (they come back in the `rollouts` table). A row
without messages is sent as one user turn. Plain text goes to the engine as text (vLLM adds the tokenizer's
special tokens, as training on raw prompts always did).

A local judge (`critic.chat_template`, same settings) reads its whole prompt as one user turn of its own template,
and its label is the first token of the assistant's reply (`user_turn_ids`).
"""
from __future__ import annotations

from pathlib import Path

PLAIN = None  # no template: the prompt text as it is


class ChatTemplateError(ValueError):
    """A chat-template setting names a file that does not exist."""


def resolve_template(setting: str, tokenizer, key: str = "rollout.chat_template") -> str | None:
    """The template to render prompts with (PLAIN for none); `key` names the setting in errors."""
    if setting == "none":
        return PLAIN
    if setting == "auto":
        return tokenizer.chat_template or PLAIN
    return template_text(setting, key)


def template_text(setting: str, key: str) -> str:
    """An inline Jinja template as it is, or the text of the template file it names (`key` names the setting)."""
    if "{{" in setting or "{%" in setting:
        return setting
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ChatTemplateError(f"{key}: no such template file {setting!r} (nor an inline Jinja template)")
    return path.read_text()


def conversation(row: dict) -> list[dict]:
    return list(row.get("messages") or [{"role": "user", "content": row["prompt"]}])


def engine_input(tokenizer, row: dict, template: str | None):
    """A vLLM prompt for `row`: its text (PLAIN) or the token ids of the rendered conversation."""
    if template is PLAIN:
        return row["prompt"]
    ids = tokenizer.apply_chat_template(conversation(row), chat_template=template, add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return {"prompt_token_ids": [int(i) for i in ids]}


def prompt_length(tokenizer, row: dict, template: str | None) -> int:
    """Tokens the engine will see for `row` (what must fit in the context with the response)."""
    prompt = engine_input(tokenizer, row, template)
    return len(prompt["prompt_token_ids"]) if isinstance(prompt, dict) else len(tokenizer.encode(prompt))


def user_turn_ids(tokenizer, text: str, template: str | None) -> list[int]:
    """Token ids of `text` as what a judge reads: plain (PLAIN, with the tokenizer's special tokens), or one user
    turn rendered with the chat template and the generation prompt, so the label is the assistant's first token."""
    if template is PLAIN:
        return tokenizer.encode(text)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], chat_template=template,
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    return [int(i) for i in ids]
