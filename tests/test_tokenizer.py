"""The tokenizer stage on the real tiny models: chat template, token ids, context check and prefix block hashes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deployments.contracts import ChatTurn, Prepared
from deployments.errors import ContextLengthExceeded, InvalidValue, ModelNotFound
from deployments.tokenizer import TokenizerCore, TokenizerSpec, block_hashes, isolated, resolve_max_tokens


@pytest.fixture(scope="module")
def core(tiny_models: dict[str, Path]) -> TokenizerCore:
    return TokenizerCore([TokenizerSpec(name, path, 256) for name, path in tiny_models.items()], block_size=16)


def test_chat_template_is_qwens_chatml_and_tokenized_once(core: TokenizerCore, tiny_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    prepared = core.chat(
        "qwen3-next-tiny", [ChatTurn("system", "Vær kort."), ChatTurn("user", "Hvad er æ, ø og å?")], 8
    )
    text = AutoTokenizer.from_pretrained(str(tiny_models["qwen3-next-tiny"])).decode(list(prepared.token_ids))
    assert text == (
        "<|im_start|>system\nVær kort.<|im_end|>\n"
        "<|im_start|>user\nHvad er æ, ø og å?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"  # Qwen3.5's: the assistant's turn opens its thinking
    )
    assert prepared.prompt_tokens == len(prepared.token_ids) and prepared.max_tokens == 8


def test_danish_round_trips_through_the_tokenizer(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["qwen3-moe-tiny"]))
    text = "Blåbærgrød på Ærø, Øresund og Åbenrå"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_default_max_tokens_is_the_rest_of_the_context(core: TokenizerCore) -> None:
    prepared = core.completion("qwen3-moe-tiny", [[1, 2, 3, 4]], None)[0]
    assert prepared.max_tokens == 256 - 4


def test_context_overflow_is_a_typed_400(core: TokenizerCore) -> None:
    with pytest.raises(ContextLengthExceeded) as info:
        core.completion("qwen3-moe-tiny", [list(range(10, 250))], 100)
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    assert "240 in the prompt, 100 for the completion" in info.value.message
    with pytest.raises(ContextLengthExceeded):
        core.chat("qwen3-next-tiny", [ChatTurn("user", "ord " * 400)], None)


def test_unknown_model_and_bad_token_ids(core: TokenizerCore) -> None:
    with pytest.raises(ModelNotFound):
        core.chat("gpt-4o", [ChatTurn("user", "x")], None)
    with pytest.raises(InvalidValue):
        core.completion("qwen3-moe-tiny", [[10**6]], 4)
    with pytest.raises(InvalidValue):
        core.completion("qwen3-moe-tiny", [""], 4)


def test_block_hashes_share_prefixes_and_ignore_partial_blocks() -> None:
    a = block_hashes(list(range(40)), 16)
    b = block_hashes([*range(32), 99, 98, 97, 96, 95, 94, 93, 92], 16)
    assert len(a) == 2 and a == b  # the third block is partial in both, so only two full blocks hash
    c = block_hashes([1000, *range(1, 40)], 16)
    assert c[0] != a[0] and c[1] != a[1]  # a different first block changes every later (chained) hash


def test_resolve_max_tokens_bounds() -> None:
    assert resolve_max_tokens(10, 5, 20, "prompt") == 5
    with pytest.raises(ContextLengthExceeded):
        resolve_max_tokens(20, None, 20, "prompt")
    with pytest.raises(ContextLengthExceeded):
        resolve_max_tokens(10, 11, 20, "prompt")


def test_each_organisation_gets_its_own_prefix_cache_and_routing_keys() -> None:
    def prompt(last: int, owner: str) -> Prepared:
        tokens = [*range(100, 164), last]  # four shared blocks, then one token of its own
        return isolated(Prepared("m", tuple(tokens), block_hashes(tokens, 16), 8), owner)

    a1, a2, b = prompt(1, "org-a"), prompt(2, "org-a"), prompt(1, "org-b")
    assert a1.cache_salt == a2.cache_salt != b.cache_salt
    assert a1.cache_salt is not None and "org-a" not in a1.cache_salt  # a digest, not the organisation's name
    assert a1.block_hashes == a2.block_hashes  # one organisation's shared prefix still routes to one replica
    assert not set(a1.block_hashes) & set(b.block_hashes)  # another's identical prompt never matches it
    assert a1.token_ids == b.token_ids and a1.max_tokens == b.max_tokens


def test_a_conversation_the_chat_template_refuses_is_a_400_that_quotes_nothing(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Real templates refuse some conversations (Qwen's: no user turn); that is the client's mistake, not a 5xx."""
    model = tmp_path / "strict"
    shutil.copytree(tiny_models["qwen3-next-tiny"], model)
    template = model / "chat_template.jinja"
    refusal = (
        "{%- if messages[-1]['role'] != 'user' %}"
        "{{ raise_exception('Last turn was: ' + messages[-1]['content']) }}{%- endif %}"
    )
    template.write_text(refusal + template.read_text())
    strict = TokenizerCore([TokenizerSpec("strict", model, 256)], block_size=16)
    assert strict.chat("strict", [ChatTurn("user", "Hej")], 4).prompt_tokens > 0
    with pytest.raises(InvalidValue) as refused:
        strict.chat("strict", [ChatTurn("user", "Hej"), ChatTurn("assistant", "hemmelig-kanariefugl")], 4)
    assert refused.value.param == "messages" and "kanariefugl" not in refused.value.message
