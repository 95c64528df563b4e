"""CPU fast path of the first stage: an OpenMP C++ kernel (``csrc/bucket_topk.cpp``).

The kernel is compiled on first use with the system C++ compiler (``-O3 -march=native
-fopenmp``) into ``$DISTK_CACHE_DIR`` (default ``~/.cache/distk``), keyed by a hash of
the source, the flags and the machine, and loaded with ``ctypes`` (which releases the
GIL during the call). A file lock makes concurrent ranks build it once. Where it cannot
be built (no compiler), :func:`bucket_candidates_cpu` returns ``None`` and the caller
uses the reference, after a one-time warning.
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

_SOURCE = Path(__file__).parent / "csrc" / "bucket_topk.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
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


def can_fuse_add(x: torch.Tensor, add: torch.Tensor) -> bool:
    """Whether the kernel can add ``add`` to ``x`` in place while selecting."""
    return (x.dtype == add.dtype == torch.float32 and x.shape == add.shape
            and x.device.type == add.device.type == "cpu"
            and x.is_contiguous() and add.is_contiguous())


def bucket_candidates_cpu(x: torch.Tensor, buckets: int, k_per_bucket: int,
                          interleaved: bool = True, by_magnitude: bool = True,
                          floor: torch.Tensor | None = None,
                          refill: bool = False,
                          add: torch.Tensor | None = None) -> torch.Tensor | None:
    """First stage on a contiguous 2-D CPU tensor; same result as
    ``reference.bucket_candidates_reference``. ``None`` when the kernel is unavailable
    (then ``x`` is untouched).
    ``refill``: a bucket left with an empty slot under ``floor`` is redone without it
    (then the result is that of no floor at all).
    ``add``: fuse error feedback: ``x += add`` in place in the same pass, selecting on
    the sum (``x`` and ``add`` contiguous fp32 of one shape; see :func:`can_fuse_add`)."""
    library = load()
    if library is None:
        return None
    if add is not None and not can_fuse_add(x, add):
        raise ValueError(f"add needs x and add contiguous fp32 CPU tensors of one shape, got "
                         f"x {x.dtype} {tuple(x.shape)}, add {add.dtype} {tuple(add.shape)}")
    if x.dtype not in _DTYPE_CODES:
        # fp16 converts to fp32 exactly; fp64 scores are compared at fp32 precision, as
        # in the reference.
        x = x.float()
    x = x.contiguous()
    rows, n = x.shape
    kept = min(k_per_bucket, -(-n // buckets))
    out = torch.empty(rows, buckets, kept, dtype=torch.int64)
    if floor is not None:
        floor = floor.to(torch.int32).contiguous()
    # Small inputs: thread start-up costs more than the work.
    threads = 1 if rows * n < (1 << 16) else torch.get_num_threads()
    code = library.distk_bucket_candidates(
        x.data_ptr(), _DTYPE_CODES[x.dtype], rows, n, n, buckets, kept,
        int(interleaved), int(by_magnitude), None if floor is None else floor.data_ptr(),
        int(refill), out.data_ptr(), threads, None if add is None else add.data_ptr())
    if code != 0:
        raise RuntimeError(f"distk CPU kernel failed with code {code}")
    return out


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
