"""Tokenizer loading and incremental detokenization."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def load_tokenizer(path: str | Path) -> Any:
    """A Hugging Face tokenizer from a local directory (never the hub)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises several kinds here
        raise ValueError(f"cannot load a tokenizer from {str(path)!r}: {exc}") from exc


def _decode_stream_class() -> Optional[type]:
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    return DecodeStream


_PRIMING_TOKENS = 6  # prompt tokens fed to the stream so the first output token decodes in context


class IncrementalDetokenizer:
    """Turns one sequence's new token ids into text deltas.

    Fast tokenizers use ``tokenizers``' ``DecodeStream`` (O(1) per token,
    holds back incomplete UTF-8); other tokenizers re-decode the output and
    emit the difference. The stream is primed with the prompt's last tokens
    so that, e.g., a SentencePiece word-start space is kept on the first
    generated word, as vLLM does.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.output_ids: list[int] = []
        self.text = ""
        stream_cls = _decode_stream_class()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend
        self._stream = None
        if stream_cls is not None and backend is not None:
            self._stream = stream_cls(skip_special_tokens=skip_special_tokens)
            for token_id in prompt_token_ids[-_PRIMING_TOKENS:]:
                self._step(token_id)

    def _step(self, token_id: int) -> str:
        try:
            return self._stream.step(self._backend, token_id) or ""
        except Exception:
            # An id the decoder cannot place (e.g. beyond the vocabulary): restart the stream.
            self._stream = _decode_stream_class()(skip_special_tokens=self.skip_special_tokens)
            return ""

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (may be empty)."""
        self.output_ids.append(token_id)
        if self._stream is not None:
            delta = self._step(token_id)
        else:
            full = self.tokenizer.decode(self.output_ids, skip_special_tokens=self.skip_special_tokens)
            if full.endswith("\ufffd"):
                return ""  # an incomplete UTF-8 character: wait for the next token
            delta = full[len(self.text) :]
        self.text += delta
        return delta
