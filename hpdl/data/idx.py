"""The IDX file format of MNIST: strict reading (plain or gzip) and writing."""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"

# IDX type codes (third magic byte) -> element type; multi-byte values are big-endian.
DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(ValueError):
    """A data file is missing, corrupt or not what it claims to be; the message names it."""


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file, plain or gzip-compressed, in native byte order."""
    return decode_idx(read_idx_bytes(path), str(path))


def read_idx_bytes(path: str | Path) -> bytes:
    """The uncompressed bytes of a file, gunzipped if it is gzip data."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return gunzip_if_gzip(data, str(path))


def gunzip_if_gzip(data: bytes, name: str) -> bytes:
    """`data` decompressed if it starts with the gzip magic, else unchanged."""
    # Detect by content, not by name: a renamed file must not be misread.
    if data[:2] != GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{name}: corrupt gzip data ({e})") from None


def decode_idx(data: bytes, name: str) -> np.ndarray:
    """Parse IDX bytes; `name` (a path or URL) is what error messages blame."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic {data[:4].hex() or 'empty'})")
    code, ndim = data[2], data[3]
    if code not in DTYPES:
        raise DataError(f"{name}: unknown IDX type code 0x{code:02x}")
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares no dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes, needs {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    payload = len(data) - header
    if payload != expected:
        kind = "truncated" if payload < expected else "over-long"
        raise DataError(
            f"{name}: {kind} IDX file: dims {dims} of {dtype.name} need {expected} bytes "
            f"of data, found {payload}"
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a writable copy in native byte order


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of `array` (the inverse of decode_idx)."""
    array = np.asarray(array)
    code = _type_code(array.dtype)
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX holds 1 to 255 dimensions, not {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(DTYPES[code], copy=False).tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write `array` as an IDX file, gzip-compressed when the name ends in .gz."""
    data = encode_idx(array)
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime=0: equal arrays give equal files
    Path(path).write_bytes(data)


def _type_code(dtype: np.dtype) -> int:
    for code, idx_dtype in DTYPES.items():
        if dtype.kind == idx_dtype.kind and dtype.itemsize == idx_dtype.itemsize:
            return code
    raise ValueError(f"IDX cannot store dtype {dtype}")
