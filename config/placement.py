"""Placement of engine replicas: the Ray placement-group bundles one replica needs, derived from TP x PP x DP, the
node shape and the model's data residency.

Pure functions of the model config, shared by the deployment builder, capacity plans and cluster definitions;
nothing here talks to Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from config.naming import REGION_LABEL
from config.schema import ModelConfig

Strategy = Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"]


@dataclass(frozen=True)
class EnginePlacement:
    bundles: tuple[dict[str, float], ...]
    strategy: Strategy
    label_selector: dict[str, str] | None = None  # every bundle must land on nodes with these labels
    nodes: int = 1  # nodes one replica spans at the least, given the node shape

    @property
    def total(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for bundle in self.bundles:
            for resource, amount in bundle.items():
                totals[resource] = totals.get(resource, 0.0) + amount
        return totals


def engine_placement(model: ModelConfig) -> EnginePlacement:
    """One bundle per engine worker: TP x PP x DP of them.

    The first bundle also holds the replica actor (its CPUs). On GPUs each worker gets one GPU. A replica that fits
    in one node packs strictly (tensor-parallel and expert-parallel traffic stays on NVLink); a larger one (pipeline
    stages over nodes) packs, filling whole nodes. On CPU one process runs the whole engine. A model with
    ``residency`` places every bundle on nodes labelled with its region.
    """
    workers = model.workers_per_replica
    selector = {REGION_LABEL: model.residency} if model.residency is not None else None
    if model.accelerator == "cpu":
        return EnginePlacement(
            bundles=({"CPU": model.engine_num_cpus},) + ({"CPU": model.engine_num_cpus},) * (workers - 1),
            strategy="STRICT_PACK",
            label_selector=selector,
        )
    first = {"CPU": model.engine_num_cpus, "GPU": 1.0}
    rest = ({"GPU": 1.0},) * (workers - 1)
    nodes = math.ceil(workers / model.hardware.gpus_per_node)
    strategy: Strategy = "STRICT_PACK" if nodes == 1 else "PACK"
    return EnginePlacement(bundles=(first, *rest), strategy=strategy, label_selector=selector, nodes=nodes)
