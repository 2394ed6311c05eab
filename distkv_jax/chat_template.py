"""Chat messages -> prompt token ids, for `/v1/chat/completions` (no JAX).

The prompt is the model's own chat template (Hugging Face `chat_template.jinja`
or `tokenizer_config.json`), or a `--chat_template FILE` override, rendered by
the tokenizer with `add_generation_prompt=True`: exactly the ids
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives.
Every bad input is a `ValueError` whose message names the offending field, so
a server can answer it with a 400.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")

NO_TEMPLATE = ("this model has no chat template (tokenizer_config.json / chat_template.jinja); "
               "pass --chat_template FILE")


def load_chat_template(arg: str | None) -> str | None:
    """The `--chat_template` flag: a Jinja file's text, or None (the model's own)."""
    if not arg:
        return None
    if not os.path.isfile(arg):
        raise ValueError(f"--chat_template={arg!r}: no such file")
    with open(arg, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"--chat_template={arg!r}: the file is empty")
    return text


def _content_text(content: Any, where: str) -> str:
    """A message's content as one string: a string, or a list of text parts
    (joined with newlines, as vLLM does for string-content templates)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: must be a string or a list of content parts, "
                         f"got {type(content).__name__}")
    if not content:
        raise ValueError(f"{where}: must not be an empty list")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, Mapping):
            raise ValueError(f"{at}: must be an object, got {type(part).__name__}")
        kind = part.get("type")
        if kind != "text":
            raise ValueError(f"{at}.type={kind!r}: unsupported content part type "
                             "(only 'text' parts are supported)")
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{at}.text: must be a string, got {type(text).__name__}")
        texts.append(text)
    return "\n".join(texts)


def validate_messages(messages: Any) -> list[dict]:
    """OpenAI chat `messages` -> plain `{"role", "content": str[, "name"]}` dicts
    for the template; other keys must be null (tool calls are not supported)."""
    if not isinstance(messages, list):
        raise ValueError(f"messages: must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages: must not be empty")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise ValueError(f"{where}: must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role={role!r}: must be one of {', '.join(ROLES)}")
        if msg.get("content") is None:
            raise ValueError(f"{where}.content: missing (a string or a list of text parts)")
        clean = {"role": role, "content": _content_text(msg["content"], f"{where}.content")}
        for key in ("name", "tool_call_id"):  # optional strings some templates print
            if msg.get(key) is not None:
                if not isinstance(msg[key], str):
                    raise ValueError(f"{where}.{key}: must be a string, "
                                     f"got {type(msg[key]).__name__}")
                clean[key] = msg[key]
        for key in sorted(set(msg) - {"role", "content", "name", "tool_call_id"}):
            # clients echo back null fields (refusal, tool_calls); a set one
            # would change the conversation, so it is refused, not dropped
            if msg[key] is not None:
                raise ValueError(f"{where}.{key}: not supported by this server")
        out.append(clean)
    return out


def chat_prompt_ids(tokenizer: Any, messages: list[dict],
                    chat_template: str | None = None) -> list[int]:
    """The prompt ids for validated `messages`: the template (override, else the
    tokenizer's) rendered with the generation prompt and tokenized without
    adding special tokens (the template writes them)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(NO_TEMPLATE)
    import jinja2

    try:
        # return_dict=False: transformers 5 otherwise returns a BatchEncoding.
        ids = tokenizer.apply_chat_template(messages, chat_template=chat_template,
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
    except (jinja2.TemplateError, TypeError) as e:
        # A template's own raise_exception (e.g. on a role order it refuses),
        # a syntax error or a type error while rendering: the request's fault.
        raise ValueError(f"chat template: {e}") from e
    if isinstance(ids, Mapping):  # a version that ignores return_dict
        ids = ids["input_ids"]
    return [int(t) for t in ids]
