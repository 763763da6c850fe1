"""cupy._core._routines_linalg for tests/fakegpu: the float32 matmul compute type, remembered only."""
from __future__ import annotations

COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_TF32 = 0, 4
_types: dict = {}


def get_compute_type(dtype) -> int:
    return _types.get(dtype, COMPUTE_TYPE_DEFAULT)


def set_compute_type(dtype, compute_type: int) -> None:
    _types[dtype] = compute_type
