"""Exact single-query top-k over a float16 gallery: one pass, memory-bandwidth bound.

Why: one query over 60,502 x 128 float32 is a matrix-vector product (31 MB read) followed
by a top-k over 60,502 scores; the top-k alone (np.partition) costs ~0.5 ms. Here the
gallery is stored as float16 (half the bytes read) and one C loop converts, multiplies
(float32 accumulation) and keeps a k-heap, so no score vector is ever written.

The C kernel is compiled once per machine with the system C compiler (``cc``) into a cache
folder (``$XDG_CACHE_HOME/visual-search`` or ``~/.cache/visual-search``; override with
``VISUAL_SEARCH_CACHE``). Without a compiler `available()` is False and callers fall back to
the float32 numpy path (same results, ~1.1x faiss IndexFlatIP instead of ~0.7x).

Accuracy rule (unit vectors q, g): storing g in float16 moves each coordinate by at most
2^-11 relative (2^-25 absolute below float16's normal range), so a score moves by at most
2^-11 * sum|q_i g_i| + 128 * 2^-25 + float32 summation error <= 5.1e-4. Two gallery items
whose float32 scores differ by more than ``ORDER_MARGIN`` = 2 x 5.5e-4 = 1.1e-3 are ranked
in the same order by the float16 scores.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
from pathlib import Path
import platform
import shutil
import subprocess
import tempfile
import threading

import numpy as np

from dataio import fileio

logger = logging.getLogger(__name__)

# float32 score gap beyond which the float16 scores keep the float32 order (module docstring)
ORDER_MARGIN = 1.1e-3

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__F16C__) && defined(__FMA__) && defined(__AVX2__)
#include <immintrin.h>
#define HAVE_F16C 1
#endif

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else {  /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) { bits = sign | 0x7f800000 | (man << 13); }
    else { bits = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float f; memcpy(&f, &bits, 4); return f;
}

static float dot_row(const uint16_t *g, const float *q, int d) {
    int i = 0; float s = 0.f;
#ifdef HAVE_F16C
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= d; i += 16) {
        __m256 g0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + i)));
        __m256 g1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + i + 8)));
        a0 = _mm256_fmadd_ps(g0, _mm256_loadu_ps(q + i), a0);
        a1 = _mm256_fmadd_ps(g1, _mm256_loadu_ps(q + i + 8), a1);
    }
    __m256 a = _mm256_add_ps(a0, a1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    s = _mm_cvtss_f32(h);
#endif
    for (; i < d; i++) s += half_to_float(g[i]) * q[i];
    return s;
}

/* min-heap on (score, then larger index = worse): the root is the worst kept item */
static int worse(float sa, int64_t ia, float sb, int64_t ib) {
    return sa < sb || (sa == sb && ia > ib);
}

static void sift_down(float *hs, int64_t *hi, int k, int p) {
    for (;;) {
        int l = 2 * p + 1, r = l + 1, m = p;
        if (l < k && worse(hs[l], hi[l], hs[m], hi[m])) m = l;
        if (r < k && worse(hs[r], hi[r], hs[m], hi[m])) m = r;
        if (m == p) return;
        float ts = hs[p]; hs[p] = hs[m]; hs[m] = ts;
        int64_t ti = hi[p]; hi[p] = hi[m]; hi[m] = ti;
        p = m;
    }
}

/* The k best rows of g [n, d] (float16) by inner product with q, unordered; returns how
   many were found (min(n, k)). Rows come in index order, so a row equal to the worst kept
   score never displaces it: equal scores keep the lower index, the project's tie rule. */
int64_t topk_f16(const uint16_t *g, int64_t n, int d, const float *q, int k,
                 float *out_s, int64_t *out_i) {
    int64_t m = n < k ? n : k;
    for (int64_t r = 0; r < m; r++) { out_s[r] = dot_row(g + r * d, q, d); out_i[r] = r; }
    for (int p = (int)m / 2 - 1; p >= 0; p--) sift_down(out_s, out_i, (int)m, p);
    for (int64_t r = m; r < n; r++) {
        float s = dot_row(g + r * d, q, d);
        if (s > out_s[0]) { out_s[0] = s; out_i[0] = r; sift_down(out_s, out_i, (int)m, 0); }
    }
    return m;
}
"""

_lock = threading.Lock()
_lib: list = []  # [ctypes library or None], loaded once


def _cache_dir() -> Path:
    if os.environ.get("VISUAL_SEARCH_CACHE"):
        return Path(os.environ["VISUAL_SEARCH_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "visual-search"


def _cpu_flags() -> str:
    # -march=native ties the binary to this CPU: the cache key names the CPU's features
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile() -> Path:
    """The kernel's shared library, compiled into the cache folder on first use."""
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    key = hashlib.sha256("\0".join([_SOURCE, *flags, platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"fastscan-{key}.so"
    if target.is_file():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc) on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "fastscan.c", Path(tmp) / "fastscan.so"
        src.write_text(_SOURCE)
        subprocess.run([compiler, *flags, str(src), "-o", str(out)], check=True, capture_output=True, timeout=120)
        # atomic: concurrent first uses (demo workers, torchrun ranks) never load a half-written file
        fileio.atomic_write(target, lambda f: f.write(out.read_bytes()))
    return target


def _load():
    with _lock:
        if not _lib:
            try:
                lib = ctypes.CDLL(str(_compile()))
                lib.topk_f16.restype = ctypes.c_int64
                lib.topk_f16.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_int64,
                    ctypes.c_int,
                    ctypes.c_void_p,
                    ctypes.c_int,
                    ctypes.c_void_p,
                    ctypes.c_void_p,
                ]
                _lib.append(lib)
            except (OSError, subprocess.SubprocessError) as exc:
                logger.warning("float16 search kernel unavailable (%s); exact search uses the float32 numpy path", exc)
                _lib.append(None)
    return _lib[0]


def available() -> bool:
    """Whether the compiled kernel can be used on this machine (compiles it on first call)."""
    return _load() is not None


def topk_f16(gallery16: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows of ``gallery16`` (float16 [N, D], C-contiguous) by inner product
    with ``query`` (float32 [D]), ranked: score descending, equal scores by lower index.

    Returns ``(scores float32 [m], indices int64 [m])``, m = min(k, N). Scores are the float16
    rows' inner products accumulated in float32 (see ``ORDER_MARGIN`` for what that means).
    """
    lib = _load()
    if lib is None:
        raise RuntimeError("the float16 kernel is unavailable; check fastscan.available() first")
    g = gallery16
    if g.dtype != np.float16 or g.ndim != 2 or not g.flags.c_contiguous:
        raise ValueError(f"gallery must be C-contiguous float16 [N, D], got {g.dtype} {g.shape}")
    q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
    if len(q) != g.shape[1]:
        raise ValueError(f"query dimension {len(q)} != gallery dimension {g.shape[1]}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = np.empty(k, dtype=np.float32)
    i = np.empty(k, dtype=np.int64)
    m = lib.topk_f16(g.ctypes.data, len(g), g.shape[1], q.ctypes.data, k, s.ctypes.data, i.ctypes.data)
    s, i = s[:m], i[:m]
    order = np.lexsort((i, -s))  # heap order -> ranking order (ties by lower index)
    return s[order], i[order]
