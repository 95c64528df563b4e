"""The native C++ library shared by the selection kernel and the exchange.

``csrc/bucket_topk.cpp`` (in :mod:`distk.selection`) is compiled on first use with the
system C++ compiler (``-O3 -march=native -fopenmp``) into ``$DISTK_CACHE_DIR`` (default
``~/.cache/distk``), keyed by a hash of the source, the flags and the machine, and loaded
with ``ctypes`` (which releases the GIL during calls). A file lock makes concurrent ranks
build it once. It holds the CPU first stage of bucketed top-k (used by
:mod:`distk.selection.cpu_kernel`) and a memset (:func:`zero_`, used by
:mod:`distk.comm.exchange`). This module sits below both layers so that the
communication layer does not import the selection layer.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["load", "zero_"]

_SOURCE = Path(__file__).parent / "selection" / "csrc" / "bucket_topk.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_library: ctypes.CDLL | None = None
_failed: str | None = None


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distk"
    return Path(os.environ.get("DISTK_CACHE_DIR", default))


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(
        source + " ".join([compiler, *_FLAGS, platform.machine(), platform.node()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"bucket_topk_{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    out = Path(tmp) / target.name
                    result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(out)],
                                            capture_output=True, text=True)
                    if result.returncode != 0:
                        raise RuntimeError(f"{compiler} failed:\n{result.stderr[-2000:]}")
                    os.replace(out, target)
    library = ctypes.CDLL(str(target))
    fn = library.distk_bucket_candidates
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_void_p]
    library.distk_zero.restype = None
    library.distk_zero.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    return library


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; ``None`` if it cannot be built."""
    global _library, _failed
    if _library is None and _failed is None:
        try:
            _library = _build()
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the reference
            _failed = str(exc)
            warnings.warn(f"distk: the CPU top-k kernel could not be built, using the slower "
                          f"PyTorch reference instead ({_failed.splitlines()[0]})",
                          RuntimeWarning, stacklevel=3)
    return _library


# A memory helper for the exchange's dense result. Below this many bytes the ctypes call
# costs more than it saves.
_NATIVE_MIN_BYTES = 1 << 20


def zero_(x: torch.Tensor) -> torch.Tensor:
    """``x.zero_()``, with the C library's memset for large contiguous CPU tensors (it
    skips reading every cache line before writing it)."""
    nbytes = x.numel() * x.element_size()
    if x.device.type == "cpu" and x.is_contiguous() and nbytes >= _NATIVE_MIN_BYTES:
        library = load()
        if library is not None:
            library.distk_zero(x.data_ptr(), nbytes)
            return x
    return x.zero_()
