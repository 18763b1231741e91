"""Where benchmarks leave their numbers: JSON (and a plot) under results/."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("results")


def save(result: dict[str, Any], json_path: str | None, default_name: str,
         plot: Callable[[dict[str, Any], Path], None] | None = None) -> Path:
    """Write result as JSON (json_path, else results/<default_name>.json) and,
    given a plot function, a PNG beside it; say where."""
    out = Path(json_path) if json_path else RESULTS_DIR / f"{default_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if plot is None:
        print(f"JSON written to {out}")
    else:
        png = out.with_suffix(".png")
        plot(result, png)
        print(f"JSON written to {out}, plot to {png}")
    return out
