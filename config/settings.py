"""Loading a profile: the YAML file, then ``ANKER_*`` environment overrides, resolved here and nowhere else, then
validation against ``config.schema``. Deployments receive the parsed objects and never read the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.schema import AnkerConfig, ConfigError

PROFILES_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = PROFILES_DIR / "local.yaml"
ENV_PREFIX = "ANKER_"


def _coerce_env_value(raw: str) -> Any:
    # YAML scalars: numbers, booleans and null parse as such; anything else stays a string.
    return yaml.safe_load(raw) if raw.strip() else raw


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = tree
    for i, key in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[int(key)]
            continue
        node = node.setdefault(key, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"environment override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
    last = path[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


# Short names for the overrides people use most; anything else is ANKER__SECTION__FIELD (models by index).
SHORT_OVERRIDES = {
    "ANKER_DATA_DIR": ["data_dir"],
    "ANKER_DATABASE_URL": ["database_url"],
    "ANKER_SECRETS_DIR": ["secrets_dir"],
    "ANKER_HOST": ["server", "host"],
    "ANKER_PORT": ["server", "port"],
    "ANKER_RAY_NUM_CPUS": ["ray", "num_cpus"],
}


def apply_env_overrides(raw: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    for var, path in SHORT_OVERRIDES.items():
        if var in environ:
            _set_path(raw, path, _coerce_env_value(environ[var]))
    for var, value in sorted(environ.items()):
        if var.startswith(ENV_PREFIX + "_") and len(var) > len(ENV_PREFIX) + 1:
            path = [p.lower() for p in var[len(ENV_PREFIX) + 1 :].split("__")]
            try:
                _set_path(raw, path, _coerce_env_value(value))
            except (IndexError, ValueError) as exc:
                raise ConfigError(f"environment override {var}: no such entry ({exc})") from exc
    return raw


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def config_path_from_env(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("ANKER_CONFIG", str(DEFAULT_PROFILE)))


def load_config(path: Path | str | None = None, environ: dict[str, str] | None = None) -> AnkerConfig:
    """Reads the YAML file, applies ``ANKER_*`` overrides, validates, and makes ``data_dir`` absolute.

    Raises ``ConfigError`` naming the file and each bad field; never returns a half-valid config.
    """
    env = dict(os.environ if environ is None else environ)
    source = Path(path) if path is not None else config_path_from_env(env)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {source}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {source} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source} must be a mapping at the top level")
    raw = apply_env_overrides(raw, env)
    try:
        config = AnkerConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(source))) from exc
    return config.model_copy(update={"data_dir": config.data_dir.expanduser().resolve()})
