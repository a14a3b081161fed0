"""Reading back what the rank harnesses (tests/integration/qwen_*_harness.py) wrote for a plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def load_runs(work: Path, plan: dict[str, Any]) -> dict[str, tuple[dict[str, np.ndarray], list[dict[str, Any]]]]:
    """Per layout of ``plan``: (the output rank's ``result.npz`` arrays, every rank's ``rank<r>.json``)."""
    runs = {}
    for layout in plan["layouts"]:
        d = work / layout["name"]
        with np.load(d / "result.npz") as data:
            results = {k: data[k] for k in data.files}
        runs[layout["name"]] = (results, [json.loads((d / f"rank{r}.json").read_text())
                                          for r in range(layout["world"])])
    return runs
