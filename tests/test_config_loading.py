"""The config: defaults load, environment overrides resolve at load time, bad files fail naming the field."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from config.schema import OMP_BIND_ENV, ConfigError, omp_bind_cpus
from config.settings import load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "anker.yaml"
    path.write_text(text)
    return path


MINIMAL = "models:\n  - name: m\n    path: /models/m\n"


def test_default_profile_serves_both_tiny_models_side_by_side() -> None:
    config = load_config(environ={})
    assert [m.name for m in config.models] == ["qwen3-next-tiny", "qwen3-moe-tiny"]
    assert {m.build for m in config.models} == {"qwen3-next", "qwen3-moe"}
    assert config.server.host == "127.0.0.1" and config.server.port == 8000
    assert config.ray.gcs_port != 6379 and config.ray.dashboard_host == "127.0.0.1"
    assert config.data_dir.is_absolute()
    prices = config.models[0].prices
    assert (prices.input_uncached_dkk_per_mtok, prices.input_cached_dkk_per_mtok, prices.output_dkk_per_mtok) == (
        Decimal("6.00"),
        Decimal("3.00"),
        Decimal("45.00"),
    )


def test_env_overrides_short_and_nested(tmp_path: Path) -> None:
    env = {
        "ANKER_PORT": "8123",
        "ANKER_DATA_DIR": str(tmp_path / "data"),
        "ANKER__SERVER__HOST": "0.0.0.0",
        "ANKER__MODELS__1__MAX_REPLICAS": "3",
        "ANKER__MODELS__0__ENGINE_ARGS__MAX_NUM_SEQS": "4",
    }
    config = load_config(environ=env)
    assert config.server.port == 8123 and config.server.host == "0.0.0.0"
    assert config.data_dir == (tmp_path / "data").resolve()
    assert config.models[1].max_replicas == 3 and config.models[0].engine_args["max_num_seqs"] == 4
    assert config.model_path(config.models[0]) == config.data_dir / "models" / "qwen3-next-tiny"


def test_config_file_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    assert [m.name for m in load_config(environ={"ANKER_CONFIG": str(path)}).models] == ["m"]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("models: []\n", "models"),
        (MINIMAL + "    min_replicas: 0\n", "models.0.min_replicas"),
        (MINIMAL + "    max_replicas: 0\n", "models.0.max_replicas"),
        (MINIMAL + "    tensor_paralel_size: 2\n", "models.0.tensor_paralel_size"),
        (MINIMAL + "    prices: {output_dkk_per_mtok: -1}\n", "models.0.prices.output_dkk_per_mtok"),
        (MINIMAL + "    engine_args: {max_model_len: 9}\n", "models.0"),
        (MINIMAL + "server: {port: 70000}\n", "server.port"),
        (MINIMAL + "ray: {gcs_port: 6379}\n", "ray.gcs_port"),
        (MINIMAL + "ray: {gcs_port: 12000}\n", "ray"),
        (MINIMAL + "server: {port: 8500}\n", "server"),  # Serve's fallback proxy's default port
        (MINIMAL + "  - name: m\n    path: /x\n", "(top level)"),
    ],
)
def test_bad_files_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert f"  {field}:" in str(info.value), str(info.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "models: [\n"), environ={})


def test_bad_env_override_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ANKER__MODELS__5__PATH"):
        load_config(write(tmp_path, MINIMAL), environ={"ANKER__MODELS__5__PATH": "/x"})


def test_prices_are_exact(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "    prices: {input_uncached_dkk_per_mtok: 0.1}\n"), environ={})
    assert config.models[0].prices.input_uncached_dkk_per_mtok == Decimal("0.1")  # not 0.1000000000000000055...


def test_cpu_workers_cores_are_their_own(tmp_path: Path) -> None:
    """The local profile pins the head beside the workers' core; a worker bound inside the head's CPUs is refused."""
    config = load_config(environ={})
    head = set(config.ray.cpu_affinity or ())
    assert head and all(head.isdisjoint(omp_bind_cpus(m.engine_env[OMP_BIND_ENV])) for m in config.models)
    pinned = "ray: {cpu_affinity: [1, 3]}\n" + MINIMAL + "    engine_env: {VLLM_CPU_OMP_THREADS_BIND: '%s'}\n"
    assert load_config(write(tmp_path, pinned % "0|2"), environ={}).ray.cpu_affinity == [1, 3]
    with pytest.raises(ConfigError, match=r"VLLM_CPU_OMP_THREADS_BIND '0-3' shares CPUs \[1, 3\]"):
        load_config(write(tmp_path, pinned % "0-3"), environ={})
    assert omp_bind_cpus("0-2,5|7") == {0, 1, 2, 5, 7} and omp_bind_cpus("auto") == omp_bind_cpus("nobind") == set()
