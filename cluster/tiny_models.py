"""Builds the tiny, deterministic, random-weight models that the local profile serves.

Owns the model architectures, the locally trained byte-level BPE tokenizer and the ChatML template; it never
downloads anything and never runs inference.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Arch = Literal["qwen3-next", "qwen3-moe"]
ARCHES: tuple[Arch, ...] = ("qwen3-next", "qwen3-moe")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TARGET_VOCAB = 2048
MAX_POSITIONS = 4096
SEED = 20261124

# ChatML, as Qwen models use it: a system turn when given, then the turns, then an open assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Training text for the tokenizer: English and Danish (with æ, ø, å), code and numbers, so that the merges cover
# what the API will see in tests and demos. It is data, not content from any request.
_CORPUS_LINES = (
    "Anker is a sovereign language model platform that runs open-weight models on the operator's own GPUs.",
    "Every request is billed in Danish kroner per million tokens; cached input costs half of uncached input.",
    "Prompts and completions exist only while a request runs, never in a log line, a span or the ledger.",
    "The quick brown fox jumps over the lazy dog while the engine streams tokens to the client.",
    "Hello, world! How are you today? I am fine, thank you. What is the weather like in Copenhagen?",
    "Ræven løb over den grønne bro, og på den anden side stod en gammel mølle ved åen.",
    "Blåbærgrød med fløde er en dansk ret; æbleskiver spises til jul med gløgg og flødeskum.",
    "Kommunen behandler personoplysninger efter databeskyttelsesforordningen og opbevarer intet indhold.",
    "Hvad koster det? Prisen er seks kroner for en million input-tokens og femogfyrre for output.",
    "Øresund, Ålborg, Århus, Næstved, Søborg, Hillerød, Køge og Frederiksværk ligger i Danmark.",
    "Jeg hedder Åse, og jeg bor i en lille by på Fyn med min hund, min kat og tre høns.",
    "Sæt kursen mod nord; vinden fra øst bærer duften af tang og salt fra havet.",
    "Systemet skalerer på kødybde, og en replika mistes aldrig uden at regnskabet holder.",
    "def generate(prompt_ids: list[int], max_tokens: int = 16) -> str:\n    return decode(sample(prompt_ids))",
    "for i in range(10):\n    print(i * 2, i ** 2, {'key': 'value', 'n': i})",
    'curl -s http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer $KEY" -d \'{"model": "x"}\'',
    "0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 128 256 512 1024 2048 4096 2026-11-24 12:00:00 3.00 6.00 45.00",
    "You are a helpful assistant. Answer briefly and precisely. Du er en hjælpsom assistent. Svar kort.",
    "The system prompt is shared by many requests, so its prefix blocks stay in the cache of one replica.",
    "Tensor parallel, pipeline parallel and expert parallel replicas serve a mixture of experts model.",
)


@dataclass(frozen=True)
class BuiltModel:
    path: Path
    arch: Arch
    vocab_size: int
    num_parameters: int


def _corpus() -> list[str]:
    # Each line alone and pairs of lines joined: more pairs for BPE to merge, still fully deterministic.
    lines = list(_CORPUS_LINES)
    joined = [f"{a} {b}" for a in lines for b in lines[:6]]
    return lines + joined


def train_tokenizer(out_dir: Path) -> int:
    """Trains a byte-level BPE tokenizer on the built-in corpus, saves it in HF format, returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return int(tokenizer.get_vocab_size())


def _config(arch: Arch, vocab_size: int, eos_ids: list[int], pad_id: int) -> object:
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,  # vLLM's CPU kernels need head dims >= 64
        max_position_embeddings=MAX_POSITIONS,
        moe_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        bos_token_id=None,
        torch_dtype="bfloat16",
    )
    if arch == "qwen3-next":
        from transformers import Qwen3NextConfig

        return Qwen3NextConfig(
            **common,
            # Three Gated-DeltaNet (linear attention) layers, then one gated full-attention layer: Qwen3-Next's 3:1.
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            linear_conv_kernel_dim=4,
            shared_expert_intermediate_size=64,
            architectures=["Qwen3NextForCausalLM"],
        )
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**common, architectures=["Qwen3MoeForCausalLM"])


def build_model(out: Path, arch: Arch = "qwen3-next") -> BuiltModel:
    """Writes a complete HF checkpoint (config, safetensors weights, tokenizer, chat template) to ``out``.

    The same arch always gives the same bytes: the tokenizer is trained on a fixed corpus and the weights are drawn
    from a fixed seed. The directory is written next to ``out`` and renamed into place, so a crash leaves nothing.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHES)}")
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        vocab_size = train_tokenizer(staging)
        tok = PreTrainedTokenizerFast.from_pretrained(str(staging))
        eos_ids = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
        pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
        config = _config(arch, vocab_size, eos_ids, pad_id)

        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                param.normal_(mean=0.0, std=0.02)
        model.save_pretrained(str(staging), safe_serialization=True)
        GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id).save_pretrained(str(staging))
        (staging / "anker_model.json").write_text(
            json.dumps({"arch": arch, "seed": SEED, "built_by": "anker model build"}, indent=2) + "\n"
        )
        num_parameters = sum(p.numel() for p in model.parameters())
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuiltModel(path=out, arch=arch, vocab_size=vocab_size, num_parameters=num_parameters)


def is_built(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer.json").is_file() and any(path.glob("*.safetensors"))
