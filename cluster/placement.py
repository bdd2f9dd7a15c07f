"""Placement of engine replicas: the Ray placement-group bundles one replica needs, derived from TP x PP.

Pure functions of the model config, shared by the deployment builder and (later) capacity planning; nothing here
talks to Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cluster.config import ModelConfig

Strategy = Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"]


@dataclass(frozen=True)
class EnginePlacement:
    bundles: tuple[dict[str, float], ...]
    strategy: Strategy

    @property
    def total(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for bundle in self.bundles:
            for resource, amount in bundle.items():
                totals[resource] = totals.get(resource, 0.0) + amount
        return totals


def engine_placement(model: ModelConfig) -> EnginePlacement:
    """One bundle per engine worker: TP x PP of them.

    The first bundle also holds the replica actor (its CPUs). On GPUs each worker gets one GPU; tensor-parallel
    workers of one pipeline stage must share a node (NVLink), so a single stage packs strictly, while several
    stages may span nodes. On CPU one process runs the whole engine, so TP x PP = 1 is one bundle.
    """
    workers = model.tensor_parallel_size * model.pipeline_parallel_size
    if model.accelerator == "cpu":
        return EnginePlacement(
            bundles=({"CPU": model.engine_num_cpus},) + ({"CPU": model.engine_num_cpus},) * (workers - 1),
            strategy="STRICT_PACK",
        )
    first = {"CPU": model.engine_num_cpus, "GPU": 1.0}
    rest = ({"GPU": 1.0},) * (workers - 1)
    strategy: Strategy = "STRICT_PACK" if model.pipeline_parallel_size == 1 else "PACK"
    return EnginePlacement(bundles=(first, *rest), strategy=strategy)
