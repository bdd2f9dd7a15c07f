"""Engine placement bundles derived from tensor x pipeline parallel sizes."""

from __future__ import annotations

from pathlib import Path

from config.placement import engine_placement
from config.schema import ModelConfig


def model(**fields: object) -> ModelConfig:
    return ModelConfig(name="m", path=Path("m"), **fields)  # type: ignore[arg-type]


def test_cpu_single_process_engine_is_one_bundle() -> None:
    placement = engine_placement(model(engine_num_cpus=1.0))
    assert placement.bundles == ({"CPU": 1.0},) and placement.strategy == "STRICT_PACK"


def test_gpu_tensor_parallel_packs_on_one_node() -> None:
    placement = engine_placement(model(accelerator="gpu", tensor_parallel_size=8))
    assert len(placement.bundles) == 8 and placement.total == {"CPU": 1.0, "GPU": 8.0}
    assert placement.strategy == "STRICT_PACK"


def test_gpu_pipeline_stages_may_span_nodes() -> None:
    placement = engine_placement(model(accelerator="gpu", tensor_parallel_size=8, pipeline_parallel_size=2))
    assert placement.total["GPU"] == 16.0 and placement.strategy == "PACK"
