"""The validation-cost benchmark (loadtests/validation_cost.py) runs, on bodies the door takes, and reports both."""

from __future__ import annotations

from pathlib import Path

from loadtests import validation_cost


def test_the_benchmark_reports_both_validations_of_each_body(tmp_path: Path) -> None:
    out = tmp_path / "validation-cost.md"
    assert validation_cost.main(["--rounds", "2", "--calls", "3", "--report", str(out)]) == 0
    table = [line for line in out.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    rows = table[2:]  # below the header and its rule
    assert [row.split(" | ")[0] for row in rows] == ["| short chat", "| agent turn (8 tools, 31 messages)"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        anker, vllm = (float(cell.split(" ")[0]) for cell in cells[2:4])
        assert anker > 0 and vllm > 0, row
