"""The Newton-Schulz maths of Muon: the quintic iteration, its FLOPs, the update scale, batched/chunked use.

    X0 = G / (||G||_F + eps)        (wide orientation: rows r <= cols s)
    X  <- a X + (b A + c A^2) X,    A = X X^T,  (a, b, c) = (3.4445, -4.7750, 2.0315),  5 times
    ~ the orthogonal factor U V^T of G = U S V^T
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of the quintic p(x) = a x + b x^3 + c x^5
NS_METHODS = ("iterate", "gram")
SCALINGS = ("moonlight", "keller", "none")


def newton_schulz(
    g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32, eps: float = 1e-7, method: str = "auto"
) -> torch.Tensor:
    """Approximate orthogonal factor of g by the quintic Newton-Schulz iteration.

    method "iterate" runs the iteration above; "gram" runs the same iteration on the r x r Gram matrix
    (X_k = Q_k X0, Q_{k+1} = P_k Q_k, A_{k+1} = P_k A_k P_k with P_k = a I + b A_k + c A_k^2) and multiplies
    X0 once at the end -- equal in exact arithmetic, fewer FLOPs when s >> r. "auto" picks the cheaper one,
    "gram" only in fp32/fp64 (low-precision Gram iterations drift).
    g: [..., m, n] (leading dims are a batch of same-shape matrices) -> [..., m, n] in `dtype`.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs matrices [..., m, n]; got shape {tuple(g.shape)}")
    if method == "auto":
        method = ns_method(g.size(-2), g.size(-1), steps, dtype)
    if method not in NS_METHODS:
        raise ValueError(f"newton_schulz method={method!r}; choose one of {NS_METHODS} or 'auto'")
    a, b, c = NS_COEFFS
    tall = g.size(-2) > g.size(-1)
    x = g.to(dtype)
    if tall:
        x = x.mT
    batch_shape = x.shape[:-2]
    x = x.reshape(-1, x.size(-2), x.size(-1))  # [K, r, s], r <= s
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    if method == "iterate":
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)  # A = X X^T  [K, r, r]
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
            x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    else:
        x = torch.bmm(gram_polynomial(torch.bmm(x, x.mT), steps), x)  # X_steps = Q_steps X_0
    x = x.reshape(*batch_shape, x.size(-2), x.size(-1))
    return x.mT if tall else x


def gram_polynomial(gram: torch.Tensor, steps: int) -> torch.Tensor:
    """Q_steps of the Gram form from A_0 = X0 X0^T [K, r, r]: Q_{k+1} = P_k Q_k, A_{k+1} = P_k A_k P_k."""
    a, b, c = NS_COEFFS
    q = None
    for k in range(steps):
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        poly.diagonal(dim1=-2, dim2=-1).add_(a)  # P_k = a I + b A_k + c A_k^2
        q = poly if q is None else torch.bmm(poly, q)  # Q_{k+1} = P_k Q_k
        if k < steps - 1:
            gram = torch.bmm(poly, torch.bmm(gram, poly))  # A_{k+1} = P_k A_k P_k
    return q


def newton_schulz_flops(m: int, n: int, steps: int = 5, method: str = "iterate") -> int:
    """FLOPs (2 per multiply-add) of newton_schulz on one [m, n] matrix, r = min(m, n), s = max(m, n).

    iterate: steps * (4 r^2 s + 2 r^3); gram: 4 r^2 s + (8 steps - 6) r^3.
    """
    r, s = min(m, n), max(m, n)
    if method == "iterate":
        return steps * (4 * r * r * s + 2 * r**3)
    if method == "gram":
        return 4 * r * r * s + (8 * steps - 6) * r**3
    raise ValueError(f"newton_schulz_flops method={method!r}; choose one of {NS_METHODS}")


def ns_method(m: int, n: int, steps: int, dtype: torch.dtype) -> str:
    """The cheaper form for an [m, n] matrix: "gram" only in fp32/fp64."""
    if dtype not in (torch.float32, torch.float64):
        return "iterate"
    return min(NS_METHODS, key=lambda method: newton_schulz_flops(m, n, steps, method))


def update_scale(rule: str, m: int, n: int) -> float:
    """Multiplier on the orthogonalised update of an [m, n] (out, in) matrix.

    moonlight: 0.2 * sqrt(max(m, n)) (update RMS 0.2, matching a typical Adam step);
    keller: sqrt(max(1, m / n)); none: 1.
    """
    if rule == "moonlight":
        return 0.2 * math.sqrt(max(m, n))
    if rule == "keller":
        return math.sqrt(max(1.0, m / n))
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown Muon scaling {rule!r}; choose one of {SCALINGS}")


def orthogonalize_chunks(
    mats: Sequence[torch.Tensor], chunks: Sequence[int], steps: Sequence[int], methods: Sequence[str],
    dtype: torch.dtype, eps: float = 1e-7,
) -> list[torch.Tensor]:
    """Newton-Schulz of each [m, n] matrix, its rows split into `chunks` equal blocks orthogonalised apart.

    Blocks are taken in the wide orientation (a [1344, 384] and a [384, 1344] matrix alike). Plain-iteration
    blocks of one wide shape are stacked into one batched call; Gram-form blocks of one r share the r x r
    iteration (gram_polynomial) whatever their s. Returns each matrix's [m, n] result in `dtype`.
    """
    blocks = []  # (matrix index, block index, wide block in dtype, tall)
    for i, (mat, k) in enumerate(zip(mats, chunks)):
        for j, block in enumerate(mat.chunk(k) if k > 1 else [mat]):
            tall = block.size(0) > block.size(1)
            blocks.append((i, j, (block.mT if tall else block).to(dtype), tall))
    out: dict[tuple[int, int], torch.Tensor] = {}
    buckets: dict[tuple, list[int]] = {}
    for b, (i, _, wide, _) in enumerate(blocks):
        shape_key = wide.size(0) if methods[i] == "gram" else tuple(wide.shape)
        buckets.setdefault((methods[i], shape_key, steps[i]), []).append(b)
    for (method, _, n_steps), members in buckets.items():
        if method == "iterate":
            orth = newton_schulz(torch.stack([blocks[b][2] for b in members]), n_steps, dtype, eps, "iterate")
        else:
            x0 = [w / (torch.linalg.matrix_norm(w) + eps) for w in (blocks[b][2] for b in members)]
            q = gram_polynomial(torch.stack([x @ x.mT for x in x0]), n_steps)  # [K, r, r]
            orth = [q_k @ x for q_k, x in zip(q, x0)]
        for b, o in zip(members, orth):
            i, j, _, tall = blocks[b]
            out[i, j] = o.mT if tall else o
    return [torch.cat([out[i, j] for j in range(k)]) if k > 1 else out[i, 0] for i, k in enumerate(chunks)]
