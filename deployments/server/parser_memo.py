"""vLLM's parser engines, built per request without redoing per request what depends only on the tokenizer.

vLLM 0.32 builds a parser engine (``vllm/parser/engine``) for each request, up to five times a request on the chat
path (the renderer's request adjustment, the reasoning and the tool adapters, the reasoning-token count of a whole
answer). Each build walks every special token of the tokenizer, compiles a pattern for each that the parser's grammar
does not name (so that the lexer drops it) and derives a lexer shape from them: a third of what a chat completion
costs the replica's serving layer, the same every time. That work is ``_build_drop_info(config, tokenizer)``, a
function of its two arguments, and what it returns the engine only reads (``LexerShape`` is documented as shared).

``install`` remembers it per (config, tokenizer) pair: the grammar configs are cached by their makers, the tokenizer
lives as long as its engine. It changes nothing the parsers output. If vLLM's internals move, it does nothing and
says so.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

logger = logging.getLogger(__name__)

MAX_PAIRS = 64  # (config, tokenizer) pairs remembered: a replica has a few of each; a parser that builds its config
# per request would only cycle through these


class DropInfoMemo:
    """``_build_drop_info`` remembered per (config, tokenizer), by identity: the memo holds both, so an id is never
    reused while its entry lives."""

    def __init__(self, build: Any, max_pairs: int = MAX_PAIRS) -> None:
        self.build = build
        self.max_pairs = max_pairs
        self._memo: OrderedDict[tuple[int, int], tuple[Any, Any, Any]] = OrderedDict()
        self._lock = threading.Lock()  # vLLM's tokenizer pool and the event loop may both build parsers
        self.hits = 0

    def __call__(self, config: Any, tokenizer: Any) -> Any:
        key = (id(config), id(tokenizer))
        with self._lock:
            held = self._memo.get(key)
            if held is not None and held[0] is config and held[1] is tokenizer:
                self._memo.move_to_end(key)
                self.hits += 1
                return held[2]
        built = self.build(config, tokenizer)
        with self._lock:
            self._memo[key] = (config, tokenizer, built)
            while len(self._memo) > self.max_pairs:
                self._memo.popitem(last=False)
        return built


def _module() -> Any:
    try:
        from vllm.parser.engine import streaming_parser_engine
    except ImportError:
        return None
    return streaming_parser_engine


def install() -> DropInfoMemo | None:
    """Remember drop info in this process (idempotent); the memo in force, or None when vLLM has no such step."""
    module = _module()
    build = getattr(module, "_build_drop_info", None)
    if build is None:
        logger.warning("anker: vLLM's parser engine changed; its per-request build is not memoised")
        return None
    if isinstance(build, DropInfoMemo):
        return build
    memo = DropInfoMemo(build)
    module._build_drop_info = memo
    return memo


def uninstall() -> None:
    """vLLM's own per-request build again (the serving-cost benchmark measures vLLM's app as vLLM ships it)."""
    module = _module()
    build = getattr(module, "_build_drop_info", None)
    if isinstance(build, DropInfoMemo):
        module._build_drop_info = build.build
