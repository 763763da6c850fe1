"""hpdl: hyper-parallel deep learning on NumPy/CuPy and MPI."""

__version__ = "0.1.0"
