"""NVRTC (the compiler behind cupy.RawModule) through ctypes: kernels/*.cu built as CuPy builds them, no GPU needed."""
from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

# What CuPy 14's compiler adds to a RawModule's options besides the architecture (cupy/cuda/compiler.py).
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


def find_library() -> str | None:
    """libnvrtc from the nvidia-cuda-nvrtc wheel (the `test` extra) or a CUDA toolkit, else None."""
    spec = importlib.util.find_spec("nvidia")
    wheel_dirs = [Path(d) for d in (spec.submodule_search_locations or [])] if spec else []
    candidates = [lib for d in wheel_dirs for lib in sorted(d.glob("cu*/lib/libnvrtc.so.*"))]
    candidates += sorted(Path("/usr/local/cuda/lib64").glob("libnvrtc.so*"))
    return str(candidates[0]) if candidates else None


class Nvrtc:
    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def _check(self, status: int) -> None:
        if status:
            raise RuntimeError(self.lib.nvrtcGetErrorString(status).decode())

    def compile(self, source: str, name: str, options: tuple[str, ...]) -> tuple[bool, str, int]:
        """(compiled, the compiler's log, bytes of CUBIN) for `source` under `options`."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None))
        try:
            argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            status = self.lib.nvrtcCompileProgram(prog, len(options), argv)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
            log = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, log))
            cubin = ctypes.c_size_t()
            if status == 0:
                self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin)))
            return status == 0, log.value.decode(errors="replace"), cubin.value
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))
