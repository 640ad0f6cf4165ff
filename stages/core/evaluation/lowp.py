"""Exact inner-product top-k with a low-precision first pass, where the hardware rewards it.

A GPU, or a CPU with AVX-512 BF16 or AMX, multiplies bf16 / fp16 several times faster than float32; an
AVX2-only CPU multiplies them ~250x slower. So the precision is chosen at run time by timing a product of
each (:func:`choose_precision`), never assumed. The search (:func:`certified_topk`) stays exact:

1. ``S~ = low(Q) low(X)^T`` in bf16 / fp16, and a bound ``E_ij = c ||q_i|| ||x_j|| + a`` on ``|S~ - S|``
   from the rounding of the inputs, the float32 accumulation and the rounding of the output (``c`` and
   ``a`` in :func:`rounding_bound`);
2. ``L_i``, the k-th largest lower bound ``S~ - E`` of row i: the exact k-th best score is at least ``L_i``,
   so every entry of the exact top-k has an upper bound ``S~ + E >= L_i``: that set is the certified
   shortlist, whatever its depth;
3. the shortlist re-scored in float32 and its top-k taken; a query whose shortlist is deeper than
   ``max_depth`` is searched exactly in float32 instead (the certificate then costs nothing but time).

The final selection runs through faiss' own heaps fed in ascending id order, so the ids and the tie order
are a flat index's; the scores are float32 dot products (their last digits may differ from a GEMM's).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np

from stages.core.evaluation.faiss_lib import heap_topk

LOW_DTYPES = ("bf16", "fp16")
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}
FP16_MAX = 6.0e4  # fp16 overflows at 65,504: larger inputs never take the fp16 path
MIN_SPEEDUP = 2.0  # a low precision must multiply at least this much faster to pay for the re-scoring
# Rows of the screening product: bf16 on an AVX2-only CPU takes ~8 ms for it (50 ms at 256 rows, x4 repeats).
SCREEN_ROWS = 128


def _torch_dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def rounding_bound(precision: str, dim: int) -> tuple[float, float]:
    """``(c, a)`` with ``|fl(low(q) . low(x)) - q . x| <= c ||q|| ||x|| + a * (max|q| + max|x|)``.

    Inputs rounded to ``precision`` (unit roundoff u: 2u + u^2 relative to sum |q_i x_i| <= ||q|| ||x||),
    accumulated in float32 (dim 2^-24 of the same, with a 10% margin), the output rounded to ``precision``
    (u again, of a value at most (1 + u)^2 ||q|| ||x||); ``a`` covers fp16's subnormals (an absolute error of
    2^-25 per rounded input)."""
    u = UNIT_ROUNDOFF[precision]
    c = (2 * u + u * u) + 1.1 * dim * 2.0**-24 * (1 + u) ** 2 + u * (1 + u) ** 2
    a = dim * 2.0**-24 if precision == "fp16" else 0.0
    return c, a


@functools.lru_cache(maxsize=8)
def choose_precision(device: str = "cpu", dim: int = 512, min_speedup: float = MIN_SPEEDUP, n: int = 2048) -> str:
    """The fastest of float32 and the low precisions this device multiplies, by their rates on an
    ``n x dim`` by ``dim x n`` product (best of 3 after a warm-up); a low precision only when at least
    ``min_speedup`` times faster than float32. A precision is first timed on a 128-row product, so a slow
    one (bf16 on an AVX2-only CPU: ~250x slower on some) costs milliseconds, not the full probe. Cached per
    process."""
    import torch

    dev = torch.device(device)

    def rate(name: str, rows: int) -> float:
        x = torch.randn(rows, dim, device=dev).to(_torch_dtype(name))
        y = torch.randn(dim, rows, device=dev).to(_torch_dtype(name))
        best = float("inf")
        for _ in range(4):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            x @ y
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return 2 * rows * rows * dim / best

    fp32 = rate("fp32", SCREEN_ROWS)
    names = [name for name in LOW_DTYPES if dev.type == "cuda" or name == "bf16"]
    promising = [name for name in names if rate(name, SCREEN_ROWS) >= min_speedup * fp32 / 2]
    if not promising:
        return "fp32"
    fp32 = rate("fp32", n)
    rates = {name: rate(name, n) for name in promising}
    name = max(rates, key=rates.__getitem__)
    return name if rates[name] >= min_speedup * fp32 else "fp32"


def certified_topk(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    precision: str,
    *,
    device: str = "cpu",
    max_depth: int = 1024,
    block: int = 1024,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores, ids, fallbacks): every query's exact ``k`` best database rows by inner product, found by a
    ``precision`` first pass with a certified shortlist (module docstring); ``fallbacks`` counts the queries
    whose shortlist was deeper than ``max_depth`` and were searched exactly in float32."""
    import torch

    if precision not in LOW_DTYPES:
        raise ValueError(f"precision must be one of {LOW_DTYPES}, got {precision!r}")
    dev = torch.device(device)
    q32 = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(dev)
    x32 = torch.from_numpy(np.ascontiguousarray(database, dtype=np.float32)).to(dev)
    n, dim = x32.shape
    k = min(k, n)
    if precision == "fp16" and max(q32.abs().max().item(), x32.abs().max().item()) > FP16_MAX:
        precision = "bf16"  # fp16 would overflow
    c, a = rounding_bound(precision, dim)
    absolute = a * (q32.abs().max().item() + x32.abs().max().item())
    low = _torch_dtype(precision)
    xl = x32.to(low)
    qn, xn = q32.norm(dim=1), x32.norm(dim=1)
    out_s = torch.empty(len(q32), k, device=dev)
    out_i = torch.empty(len(q32), k, dtype=torch.int64, device=dev)
    fallbacks = 0
    flags = _exact_reductions(dev)
    try:
        for q0 in range(0, len(q32), block):
            q = q32[q0 : q0 + block]
            approx = (q.to(low) @ xl.T).float()
            err = c * qn[q0 : q0 + block, None] * xn[None, :] + absolute
            floor = torch.topk(approx - err, k, dim=1).values[:, -1:]
            upper = approx + err
            depth = (upper >= floor).sum(dim=1)
            deep = depth > max_depth
            fine = torch.nonzero(~deep).flatten()
            if len(fine):
                d = int(depth[fine].max())
                cand = torch.topk(upper[fine], d, dim=1).indices  # holds every entry with upper >= floor
                cand = torch.sort(cand, dim=1).values  # ascending ids, as a flat index feeds its heaps
                exact = torch.bmm(x32[cand], q[fine, :, None]).squeeze(-1)
                s, i = heap_topk(exact.cpu().numpy(), cand.cpu().numpy(), k)
                out_s[q0 + fine], out_i[q0 + fine] = torch.from_numpy(s).to(dev), torch.from_numpy(i).to(dev)
            rows = torch.nonzero(deep).flatten()
            if len(rows):
                fallbacks += len(rows)
                full = (q[rows] @ x32.T).cpu().numpy()
                s, i = heap_topk(full, np.broadcast_to(np.arange(n), full.shape), k)
                out_s[q0 + rows], out_i[q0 + rows] = torch.from_numpy(s).to(dev), torch.from_numpy(i).to(dev)
    finally:
        _restore_reductions(flags)
    return out_s.cpu().numpy(), out_i.cpu().numpy(), fallbacks


def _exact_reductions(dev: Any) -> tuple[bool, bool] | None:
    """cuBLAS may accumulate fp16 / bf16 products in reduced precision, which the bound does not cover:
    turned off for the search (and restored after)."""
    import torch

    if dev.type != "cuda":
        return None
    m = torch.backends.cuda.matmul
    flags = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    return flags


def _restore_reductions(flags: tuple[bool, bool] | None) -> None:
    import torch

    if flags is not None:
        m = torch.backends.cuda.matmul
        m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = flags
