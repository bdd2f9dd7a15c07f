"""The tokenizer/router stage: chat template and tokenization once per request, context check, prefix block hashes.

It returns token ids for the engine and hashes for routing; it never generates, never sits in the streaming path,
and never logs or returns any text of the prompt (errors carry counts and field names only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from opentelemetry.trace import SpanKind
from ray import serve

from deployments.contracts import ChatTurn, Prepared
from deployments.errors import AnkerError, ContextLengthExceeded, InvalidValue, ModelNotFound
from deployments.router import block_hashes
from deployments.server.salt import cache_salt, salt
from observability import tracing


@dataclass(frozen=True)
class TokenizerSpec:
    """What the stage needs to know of one model."""

    name: str
    path: Path
    max_model_len: int


def isolated(prepared: Prepared, owner: str) -> Prepared:
    """The prompt in ``owner``'s own prefix cache: vLLM's ``cache_salt`` and block hashes mixed with the same salt,
    so that the request router follows the salted cache."""
    mix = int.from_bytes(salt(owner)[:8], "little")
    return replace(prepared, cache_salt=cache_salt(owner), block_hashes=tuple(h ^ mix for h in prepared.block_hashes))


def resolve_max_tokens(prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """The completion budget: what the client asked for, or the rest of the context; never past the context."""
    if prompt_tokens >= max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{prompt_tokens} tokens, leaving no room for the completion. Please reduce the length of the prompt.",
            param,
        )
    if max_tokens is None:
        return max_model_len - prompt_tokens
    if prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
            "Please reduce the length of the prompt or the completion.",
            param,
        )
    return max_tokens


class TokenizerCore:
    """Plain class with the stage's logic, so it is testable without Ray; the deployment below wraps it."""

    def __init__(self, specs: Sequence[TokenizerSpec], block_size: int) -> None:
        from transformers import AutoTokenizer

        self._block_size = block_size
        self._specs = {spec.name: spec for spec in specs}
        self._tokenizers: dict[str, Any] = {spec.name: AutoTokenizer.from_pretrained(str(spec.path)) for spec in specs}

    def _spec(self, model: str) -> TokenizerSpec:
        spec = self._specs.get(model)
        if spec is None:
            raise ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.", "model")
        return spec

    def vocab_size(self, model: str) -> int:
        return len(self._tokenizers[self._spec(model).name])

    def _prepared(self, spec: TokenizerSpec, token_ids: list[int], max_tokens: int | None, param: str) -> Prepared:
        budget = resolve_max_tokens(len(token_ids), max_tokens, spec.max_model_len, param)
        return Prepared(
            model=spec.name,
            token_ids=tuple(token_ids),
            block_hashes=block_hashes(token_ids, self._block_size),
            max_tokens=budget,
        )

    def chat(self, model: str, turns: Sequence[ChatTurn], max_tokens: int | None) -> Prepared:
        spec = self._spec(model)
        messages = [{"role": t.role, "content": t.content, **({"name": t.name} if t.name else {})} for t in turns]
        try:
            rendered = self._tokenizers[model].apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except TemplateError:
            # The model's template refused the conversation (its `raise_exception`, e.g. roles out of order). Its
            # text is the template author's and may quote a message: it is not passed on.
            raise InvalidValue(
                "The messages do not fit this model's chat template (for example, roles in an order it does not "
                "accept).",
                "messages",
            ) from None
        token_ids = list(rendered["input_ids"] if isinstance(rendered, dict) else rendered)
        return self._prepared(spec, token_ids, max_tokens, "messages")

    def completion(self, model: str, prompts: Sequence[str | Sequence[int]], max_tokens: int | None) -> list[Prepared]:
        spec = self._spec(model)
        tokenizer = self._tokenizers[model]
        vocab = len(tokenizer)
        prepared = []
        for prompt in prompts:
            if isinstance(prompt, str):
                token_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
            else:
                token_ids = list(prompt)
                bad = next((t for t in token_ids if not 0 <= t < vocab), None)
                if bad is not None:
                    raise InvalidValue(f"Token id {bad} is out of the model's vocabulary (0..{vocab - 1}).", "prompt")
            if not token_ids:
                raise InvalidValue("The prompt is empty.", "prompt")
            prepared.append(self._prepared(spec, token_ids, max_tokens, "prompt"))
        return prepared


@serve.deployment(name="Tokenizer")
class Tokenizer:
    """Ray Serve deployment around ``TokenizerCore``. Returns errors as values: a client's mistake is not a crash."""

    def __init__(self, specs: list[TokenizerSpec], block_size: int) -> None:
        tracing.configure("anker-tokenizer")
        self._core = TokenizerCore(specs, block_size)

    def prepare_chat(
        self, model: str, turns: list[ChatTurn], max_tokens: int | None, trace: tracing.Carrier | None = None
    ) -> Prepared | AnkerError:
        result = self._traced(model, trace, lambda: [self._core.chat(model, turns, max_tokens)])
        return result if isinstance(result, AnkerError) else result[0]

    def prepare_completion(
        self,
        model: str,
        prompts: list[str | list[int]],
        max_tokens: int | None,
        trace: tracing.Carrier | None = None,
    ) -> list[Prepared] | AnkerError:
        return self._traced(model, trace, lambda: self._core.completion(model, prompts, max_tokens))

    @staticmethod
    def _traced(
        model: str, trace: tracing.Carrier | None, prepare: Callable[[], list[Prepared]]
    ) -> list[Prepared] | AnkerError:
        """Runs ``prepare`` in the request's ``tokenizer.prepare`` span; a client's mistake comes back as a value."""
        with tracing.span("tokenizer.prepare", trace, SpanKind.SERVER, {"anker.model": model}) as current:
            try:
                prepared = prepare()
            except AnkerError as error:
                current.set_attribute("anker.error_code", error.code or "error")
                return error
            tracing.set_attributes(current, {"anker.prompt_tokens": sum(p.prompt_tokens for p in prepared)})
            return prepared
