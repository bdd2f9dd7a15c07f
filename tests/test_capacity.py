"""Production profiles for Qwen3.5-397B-A17B: they load, their vLLM arguments exist in vLLM, their figures are the
capacity arithmetic's (checked by hand here too), and `anker plan` prints cost against revenue.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from cluster.capacity import cost_plan, figures, kv_bytes_per_token, linear_state_bytes_per_sequence, replica_plan
from config.settings import PROFILES_DIR, load_config

PROFILES = sorted(PROFILES_DIR.glob("qwen35-397b-*.yaml"))
ANKER = str(Path(sys.executable).parent / "anker")


def test_there_are_the_three_production_shapes() -> None:
    shapes = {p.stem.removeprefix("qwen35-397b-") for p in PROFILES}
    assert shapes == {"fp8-h200-tp8", "fp8-h200-dp8-ep", "bf16-h100x2-tp8-pp2"}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_figures_are_written_beside_it(profile: Path) -> None:
    model = load_config(profile, {}).models[0]
    text = profile.read_text()
    for line in figures(model):
        assert line in text, f"{profile.name} is out of step: regenerate its figures ({line})"
    assert model.residency == "dk" and model.min_replicas >= 1 and model.accelerator == "gpu"


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_vllm_arguments_exist_in_this_vllm(profile: Path) -> None:
    from vllm.config.speculative import MTPModelTypes
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    model = load_config(profile, {}).models[0]
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert set(model.engine_args) <= fields, set(model.engine_args) - fields
    assert model.engine_args["speculative_config"]["method"] in MTPModelTypes.__args__
    assert model.serving.reasoning_parser in ReasoningParserManager.list_registered()
    assert model.serving.tool_call_parser in ToolParserManager.list_registered()


def test_figures_by_hand() -> None:
    bf16 = load_config(PROFILES[0], {}).models[0]  # bf16-h100x2-tp8-pp2
    assert bf16.facts is not None
    # 15 full-attention layers x 2 KV heads x 256 dims x (K and V) x 2 bytes
    assert kv_bytes_per_token(bf16.facts) == 15 * 2 * 256 * 2 * 2 == 30_720
    # 45 Gated DeltaNet layers x 64 value heads x 128 x 128 x 2 bytes = 90 MiB
    assert linear_state_bytes_per_sequence(bf16.facts) == 45 * 64 * 128 * 128 * 2 == 90 * 2**20
    plan = replica_plan(bf16)
    assert (plan.gpus, plan.nodes, plan.weights_gb) == (16, 2, 794.0)
    assert plan.weights_per_gpu_gb == pytest.approx(794 / 16)
    # 80 GiB x 0.9 - 6 GiB reserve - 49.6 GB weights, times 16 GPUs
    assert plan.kv_cache_gib == pytest.approx((80 * 0.9 - 6) * 16 - 794e9 / 2**30, rel=1e-9)


def test_cost_against_revenue() -> None:
    tp8 = load_config(PROFILES[2], {}).models[0]  # fp8-h200-tp8, 28 DKK per GPU-hour
    plan = cost_plan(tp8, 2, Decimal(10_000), Decimal(1_000), Decimal("0.5"))
    assert (plan.gpus, plan.nodes) == (16, 2)
    assert plan.cost_per_hour_dkk == Decimal("448.00")  # 16 x 28
    # per hour: 36M input tokens, 18M uncached x 6 + 18M cached x 3 DKK / 1M, and 3.6M output x 45 DKK / 1M
    assert plan.revenue_per_hour_dkk == Decimal("108.00") + Decimal("54.00") + Decimal("162.00")


def test_anker_plan_prints_the_plan() -> None:
    out = subprocess.run(
        [ANKER, "plan", "--config", str(PROFILES[2]), "--input-tokens-per-s", "10000", "--output-tokens-per-s", "1000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "qwen3.5-397b-a17b" in out.stdout and "8 GPUs" in out.stdout
    assert "floor   1 replica(s): 8 GPUs on 1 node(s), 224.00 DKK/hour" in out.stdout  # 8 x 28 DKK
    assert "ceiling 4 replica(s): 32 GPUs on 4 node(s), 896.00 DKK/hour" in out.stdout
    assert "324.00 DKK/hour" in out.stdout
