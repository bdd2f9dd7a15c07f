"""Load shapes, one locustfile each (``step.py``, ``spike.py``, ``soak.py``), parameterised by environment variables.

Locust runs the first shape it finds in the files given to ``-f``: add exactly one of these files to the users'
locustfile, or the whole folder with ``--class-picker`` to choose in the web UI.
"""

from __future__ import annotations

import os


def env_int(name: str, default: int) -> int:
    """An integer parameter from the environment, with its default; a malformed value stops the run."""
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {value!r}") from None
