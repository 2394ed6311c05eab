"""The native CPU kernels: build, register, call. MicroAttention
(micro_attention_cpu.cc) and the bfloat16 dense layer (dense_cpu.cc).

The C++ sources are compiled into one library once per machine with the host's C++ compiler into
a cache directory ($DISTKV_CACHE, else ~/.cache/distkv_jax, as for the tiny
model; a temporary directory if that is not writable), keyed by the source,
the flags, the jaxlib version and the CPU architecture; concurrent
builders (pytest workers, the processes of a multi-host job) take a file lock
and the library appears by an atomic rename. Where no compiler is found or the
build fails, `available()` is False and `error()` says why; impl="auto" then
uses the jnp reference.
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
import threading

import jax
import jax.numpy as jnp
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = tuple(os.path.join(_HERE, name) for name in ("micro_attention_cpu.cc", "dense_cpu.cc"))
_HEADERS = tuple(os.path.join(_HERE, name) for name in ("cpu_parallel.h", "cpu_vec.h"))
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++20", "-shared", "-fPIC", "-pthread")
# $DISTKV_NATIVE_PORTABLE=1: the dense kernel's portable loop even where the
# CPU has AVX512_BF16 (its tests run it so)
PORTABLE_ENV = "DISTKV_NATIVE_PORTABLE"


def _flags() -> tuple[str, ...]:
    return _FLAGS + (("-DDISTKV_PORTABLE",) if os.environ.get(PORTABLE_ENV) == "1" else ())
_TARGETS = {jnp.dtype(jnp.float32): ("distkv_micro_attention_f32", "DistkvMicroAttentionF32"),
            jnp.dtype(jnp.bfloat16): ("distkv_micro_attention_bf16", "DistkvMicroAttentionBF16"),
            # bfloat16 bits stored as uint16 (kv_pool.storage_dtype): the same kernel
            jnp.dtype(jnp.uint16): ("distkv_micro_attention_bf16bits", "DistkvMicroAttentionBF16Bits")}
DENSE_TARGET = "distkv_dense_bf16"  # kernels/dense.py calls them
SILU_MUL_TARGET = "distkv_dense_silu_mul_bf16"
_DENSE = ((DENSE_TARGET, "DistkvDenseBF16"), (SILU_MUL_TARGET, "DistkvDenseSiluMulBF16"))

_lock = threading.Lock()
_state: dict = {}  # "lib" or "error", once tried


def _cache_dir() -> str:
    from ..models.tiny import cache_root

    return os.path.join(cache_root(), "native")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> str:
    """Path of the built library (building it if needed)."""
    import jaxlib

    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    sources = []
    for path in _SOURCES + _HEADERS:
        with open(path, "rb") as f:
            sources.append(f.read())
    flags = _flags()
    key = hashlib.sha256(b"\0".join([*sources, " ".join(flags).encode(), cxx.encode(),
                                     jaxlib.__version__.encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    out_dir = _cache_dir()
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError:  # e.g. a read-only home directory
        out_dir = os.path.join(tempfile.gettempdir(), f"distkv_jax-native-{os.getuid()}")
        os.makedirs(out_dir, exist_ok=True)
    lib = os.path.join(out_dir, f"distkv_native_{key}.so")
    if os.path.exists(lib):
        return lib
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(lib):  # another process built it meanwhile
            return lib
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [cxx, *flags, "-I", jax.ffi.include_dir(), *_SOURCES, "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            names = ", ".join(os.path.basename(p) for p in _SOURCES)
            raise RuntimeError(f"building {names} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, lib)
    return lib


def _load() -> None:
    with _lock:
        if _state:
            return
        try:
            lib = ctypes.cdll.LoadLibrary(_build())
            for target, symbol in (*_TARGETS.values(), *_DENSE):
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
            _state["lib"] = lib
        except Exception as e:  # no compiler, failed build, missing symbol
            _state["error"] = f"{type(e).__name__}: {e}"


def dense_vectorized() -> bool:
    """Whether the dense kernel was built with its AVX512_BF16 path."""
    return available() and bool(_state["lib"].DistkvDenseVectorized())


def available() -> bool:
    """Whether the native kernels are built and registered (builds them on first call)."""
    _load()
    return "lib" in _state


def error() -> str | None:
    """Why the native kernels are unavailable (None if they are available)."""
    _load()
    return _state.get("error")


def micro_attention_native(q, q_pos, k_pages, v_pages, item_tile, item_block, item_kstart, *,
                           scale: float, kv_head_offset=0):
    """micro_attention's contract (per-tile o [n_tiles, q_tile, Hkv, G, D],
    lse [n_tiles, q_tile, Hkv, G]) from the native kernel. Runs are not needed:
    every item updates its tile's online softmax directly."""
    if not available():
        raise RuntimeError(f"the native MicroAttention kernel is unavailable: {error()}")
    dtype = jnp.dtype(k_pages.dtype)
    if dtype not in _TARGETS:
        raise ValueError(f"native MicroAttention supports float32 and bfloat16 pages (or "
                         f"bfloat16 bits as uint16), got {dtype}")
    n_tiles, q_tile, num_kv, groups, head_dim = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
           jax.ShapeDtypeStruct((n_tiles, q_tile, num_kv, groups), jnp.float32))
    offset = jnp.reshape(jnp.asarray(kv_head_offset, jnp.int32), (1,))
    i32 = lambda x: jnp.asarray(x, jnp.int32).reshape(-1)  # noqa: E731
    return jax.ffi.ffi_call(_TARGETS[dtype][0], out)(
        q.astype(jnp.float32), jnp.asarray(q_pos, jnp.int32), k_pages, v_pages, i32(item_tile),
        i32(item_block), i32(item_kstart), offset, scale=np.float32(scale))

