"""What the fault tests (``tests/test_stack_faults.py``) and their report (``loadtests/faults.py``) share."""

from __future__ import annotations

# The file each fault test appends its figures to (one JSON object a line), when set.
FIGURES_ENV = "ANKER_FAULT_FIGURES"
