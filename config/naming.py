"""Naming rules: the names of Serve applications, deployments and node labels derived from the config, defined
once so that the builder, the CLI, alerts, compliance documents and tests agree.
"""

from __future__ import annotations

import re

from config.schema import ModelConfig

APP_NAME = "anker"  # the control application, at "/"
BILLING_DEPLOYMENT = "Billing"
REGION_LABEL = "anker/region"  # the Ray node label a region's nodes carry (KubeRay: rayStartParams labels)


def deployment_suffix(model_name: str) -> str:
    """A Ray Serve deployment name part derived from a served model name."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", model_name)


ENGINE_DEPLOYMENT_PREFIX = "Engine-"


def engine_deployment_name(model: ModelConfig) -> str:
    return ENGINE_DEPLOYMENT_PREFIX + deployment_suffix(model.name)


def router_deployment_name(model: ModelConfig) -> str:
    """The ingress request router of a model's own application (when the model may scale out)."""
    return f"Router-{deployment_suffix(model.name)}"


def model_route_prefix(model_name: str) -> str:
    """The internal route prefix of a model's own Serve application (HAProxy dispatches to it by the body's model)."""
    return "/models/" + deployment_suffix(model_name)


MODEL_APP_PREFIX = "model-"


def model_app_name(model_name: str) -> str:
    """The Serve application of a model's own engine replicas (one per model)."""
    return MODEL_APP_PREFIX + deployment_suffix(model_name)
