"""Data: IDX reading, MNIST preparation into HDF5, and the seeded, replica-sliced Loader."""
from .idx import DataError, read_idx, write_idx
from .loader import Loader, open_split, split_size
from .prepare import check_mnist, prepare_mnist

__all__ = [
    "DataError", "Loader", "check_mnist", "open_split", "prepare_mnist", "read_idx", "split_size", "write_idx",
]
