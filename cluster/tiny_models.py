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

# Qwen3.5's chat format (ChatML with its tool and thinking conventions), so that vLLM's `qwen3` reasoning parser
# and `qwen3_coder` tool parser read the tiny models' output as they read the production model's:
# - tools are described in the system turn, each `<function>` with its `<name>`, `<description>` and
#   `<parameters>`, and the model is told to answer a call as
#   `<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n</function>\n</tool_call>`;
# - an assistant turn's tool calls are written back in that form (arguments by name; a value that is not text as
#   JSON), and its reasoning in a `<think>` block only after the last user turn, as Qwen3.5 keeps it;
# - tool results go back in the user's turn, each in `<tool_response>`; consecutive ones share one turn;
# - the assistant's turn opens a `<think>` block, or an empty one with `enable_thinking: false`.
CHAT_TEMPLATE = (
    # text(): a message's content, as a string or as OpenAI's content parts.
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is iterable -%}{%- for part in content if part.type == 'text' -%}{{- part.text -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set tools = tools if tools is defined and tools else [] -%}"
    "{%- set first_system = messages | length > 0 and messages[0].role == 'system' -%}"
    "{%- set ns = namespace(last_user=-1, user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    # The system turn: the client's system message, then the tools.
    "{%- if first_system or tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if first_system -%}{{- text(messages[0].content) -}}{%- endif -%}"
    "{%- if tools -%}"
    "{%- if first_system -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call these functions:\\n\\n<tools>' -}}"
    "{%- for entry in tools -%}"
    "{%- set f = entry.function if entry.function is defined else entry -%}"
    "{{- '\\n<function>\\n<name>' ~ f.name ~ '</name>' -}}"
    "{%- if f.description -%}{{- '\\n<description>' ~ (f.description | trim) ~ '</description>' -}}{%- endif -%}"
    "{%- set params = f.parameters if f.parameters is mapping else {} -%}"
    "{{- '\\n<parameters>' -}}"
    "{%- for name, field in (params.properties if params.properties is mapping else {}) | items -%}"
    "{{- '\\n<parameter>\\n<name>' ~ name ~ '</name>' -}}"
    "{%- if field.type is defined -%}{{- '\\n<type>' ~ (field.type | string) ~ '</type>' -}}{%- endif -%}"
    "{%- if field.description is defined -%}"
    "{{- '\\n<description>' ~ (field.description | trim) ~ '</description>' -}}"
    "{%- endif -%}"
    "{{- '\\n</parameter>' -}}"
    "{%- endfor -%}"
    "{%- if params.required -%}{{- '\\n<required>' ~ (params.required | tojson) ~ '</required>' -}}{%- endif -%}"
    "{{- '\\n</parameters>\\n</function>' -}}"
    "{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nTo call a function, answer with the call and nothing after it, in this form:\\n'"
    " '<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>' -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    # The turns.
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{%- set ns.user = loop.index0 -%}{%- endif -%}"
    "{%- if loop.first and first_system -%}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' ~ text(m.content) ~ '\\n</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- set reasoning = m.reasoning_content or m.reasoning or '' -%}"
    "{%- if reasoning and ns.user == ns.last_user -%}"
    "{{- '<think>\\n' ~ (reasoning | trim) ~ '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- set content = text(m.content) | trim -%}"
    "{{- content -}}"
    "{%- for call in m.tool_calls or [] -%}"
    "{%- set c = call.function if call.function is defined else call -%}"
    "{%- if not loop.first or content -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n<function=' ~ c.name ~ '>\\n' -}}"
    "{%- if c.arguments is mapping -%}"
    "{%- for key, value in c.arguments | items -%}"
    "{{- '<parameter=' ~ key ~ '>\\n' ~ (value if value is string else value | tojson) ~ '\\n</parameter>\\n' -}}"
    "{%- endfor -%}"
    "{%- elif c.arguments -%}{{- c.arguments ~ '\\n' -}}"
    "{%- endif -%}"
    "{{- '</function>\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' ~ m.role ~ '\\n' ~ text(m.content) ~ '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    # The assistant's turn, thinking unless asked not to.
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
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
