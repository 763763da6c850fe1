"""Run output: JSON-lines metrics, the progress bar, and the final RESULT line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class Metrics:
    """Appends one JSON object per line; a no-op without a path (and on non-zero ranks)."""

    def __init__(self, path: str = "", enabled: bool = True):
        self.file = None
        if path and enabled:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)
        self.t0 = time.perf_counter()

    def write(self, **record: Any) -> None:
        if self.file:
            record.setdefault("time", round(time.perf_counter() - self.t0, 4))
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


def progress(total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step",
                mininterval=1.0, dynamic_ncols=True, file=sys.stderr)


def print_result(result: dict[str, Any]) -> None:
    """The machine-readable last line of a run."""
    print("RESULT " + json.dumps(result), flush=True)
