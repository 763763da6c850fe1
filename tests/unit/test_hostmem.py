"""Keeping freed host memory: a training step stops page-faulting its temporaries in again."""
from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import resource, sys
import numpy as np
from hpdl.hostmem import keep_freed_memory
from hpdl.models import build_model
from hpdl.trainer import loss_and_grads
if sys.argv[1] == "kept":
    assert keep_freed_memory()
model = build_model("cnn")
params = model.init(0)
rng = np.random.default_rng(0)
x, y = rng.standard_normal((64, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 64)
for _ in range(2):
    loss_and_grads(model.layers, params, x, y, (0,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    loss_and_grads(model.layers, params, x, y, (0,))
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


def faults_per_step(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, check=True)
    return int(out.stdout)


def test_kept_memory_removes_the_page_faults_of_a_training_step():
    """A cnn step of 64 rows page-faults thousands of times under glibc's defaults (its freed
    temporaries go back to the kernel) and almost never once keep_freed_memory() applied."""
    default, kept = faults_per_step("default"), faults_per_step("kept")
    assert default > 1000
    assert kept < default / 50
