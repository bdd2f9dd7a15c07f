"""The serving-cost benchmark (loadtests/serving_cost.py) runs small: vLLM's own app and an engine replica's over one
engine with the instant double, every answer checked and every one of Anker's in the ledger, and reports both."""

from __future__ import annotations

from pathlib import Path

from loadtests import serving_cost


def test_the_benchmark_serves_both_apps_and_reports_each_answer_kind(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "serving-cost.md"
    models_dir = next(iter(tiny_models.values())).parent
    argv = ["--rounds", "1", "--requests", "6", "--concurrency", "2", "--models-dir", str(models_dir)]
    assert serving_cost.main([*argv, "--report", str(out)]) == 0
    rows = [line for line in out.read_text(encoding="utf-8").splitlines() if line.startswith("| ")][2:]
    assert [row.split(" | ")[0] for row in rows] == ["| whole (JSON)", "| streamed"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        vllm, anker = (float(cell.split(" ")[0]) for cell in cells[1:3])
        assert vllm > 0 and anker > 0, row
