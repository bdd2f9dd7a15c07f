"""The models one base URL serves: ``/v1/models``' cards, a key's view of them, and a name's check.

The control application lists the models through it (``deployments/control.py``), and each engine replica's app
gives its own card.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from deployments.billing.governance import check_model_allowed, model_allowed
from deployments.errors import ModelNotFound
from deployments.keys import KeyRecord


def model_card(name: str, created: int, owned_by: str, max_model_len: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by, "max_model_len": max_model_len}


@dataclass(frozen=True)
class ServedModel:
    name: str
    max_model_len: int
    owned_by: str
    created: int
    region: str = "dk"


class ModelCatalog:
    def __init__(self, models: Sequence[ServedModel]) -> None:
        self.models = {m.name: m for m in models}

    def list_models(self, key: KeyRecord) -> dict[str, Any]:
        """The models this key may call (all of them unless its allow-list says otherwise)."""
        return {
            "object": "list",
            "data": [
                model_card(m.name, m.created, m.owned_by, m.max_model_len)
                for m in self.models.values()
                if model_allowed(key.allowed_models, m.name, m.region)
            ],
        }

    def get_model(self, name: str, key: KeyRecord) -> dict[str, Any]:
        m = self.allowed(name, key)
        return model_card(m.name, m.created, m.owned_by, m.max_model_len)

    def model(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            # Not a served name, so it is the client's own text: not repeated (zero data retention).
            raise ModelNotFound.unnamed()
        return model

    def allowed(self, name: str, key: KeyRecord) -> ServedModel:
        model = self.model(name)
        check_model_allowed(key, model.name, model.region)
        return model
