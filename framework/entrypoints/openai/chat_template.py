"""Chat messages -> prompt text, with the tokenizer's chat template or ``--chat-template``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from framework.entrypoints.openai.errors import invalid_request, unsupported
from framework.entrypoints.openai.protocol import ChatMessage

# OpenAI's "developer" messages are system messages for chat templates.
_ROLE_FOR_TEMPLATE = {"developer": "system"}


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """``--chat-template``: a file holding a Jinja template, or the template itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # e.g. a template too long to be a file name
        pass
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def message_text(message: ChatMessage, index: int) -> str:
    """The text of a message: a string, or its text parts joined by newlines."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise unsupported("messages", f"messages[{index}]: content part type {part.type!r} (only text parts)")
        texts.append(part.text)
    return "\n".join(texts)


def render_chat(tokenizer: Any, messages: list[ChatMessage], template: Optional[str], add_generation_prompt: bool) -> str:
    """The prompt text of a conversation; 400 when there is no template or it refuses the messages."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise invalid_request(
            "the model's tokenizer has no chat template; start the server with --chat-template", "messages"
        )
    conversation = [
        {"role": _ROLE_FOR_TEMPLATE.get(m.role, m.role), "content": message_text(m, i)} for i, m in enumerate(messages)
    ]
    try:
        return tokenizer.apply_chat_template(
            conversation, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as exc:  # jinja raises many kinds (raise_exception in templates)
        raise invalid_request(f"the chat template cannot render these messages: {exc}", "messages") from exc
