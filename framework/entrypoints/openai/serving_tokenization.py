"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's shapes)."""

from __future__ import annotations

from framework.entrypoints.openai.chat_template import render_chat
from framework.entrypoints.openai.errors import invalid_request
from framework.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from framework.entrypoints.openai.serving_engine import OpenAIServing


class ServingTokenization(OpenAIServing):
    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise invalid_request("give exactly one of prompt and messages", "prompt")
        if request.messages is not None:
            text = render_chat(self.tokenizer, request.messages, self.chat_template, request.add_generation_prompt)
            tokens = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            tokens = self.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=self.model.max_model_len, tokens=tokens)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        vocab = self.model.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise invalid_request(f"token id {bad[0]} is out of range: the vocabulary has {vocab} tokens", "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(request.tokens))
