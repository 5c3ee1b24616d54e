"""Independent dense float64 reference for the subspace merge methods (SEMANTICS §3c), for the tests only.

Written from the definitions in docs/SEMANTICS §3, §3c alone, without looking at the package's implementation:
every function works on whole DENSE m×n task vectors (numpy float64), forms every SVD and polar factor of the
dense matrices directly, and never streams, factors or chunks anything. It is slow and obvious on purpose.

Conventions (from the definitions):
- τᵢ is already scaled (τᵢ = sᵢ Bᵢ Aᵢ in the base tensor's layout); uᵢ = wᵢ τᵢ.
- "SVD of X" is the thin SVD truncated to X's numerical rank: singular values > σ₁ · max(X.shape) · 2⁻⁵²
  (numpy's `matrix_rank` rule), X's own shape.
- The polar factor of X = Y S Zᵀ (that truncated SVD) is Y Zᵀ.
- Trimming keeps the ⌊density · numel⌋ largest |x|; at the threshold the lower flat (row-major) index wins.
- DARE needs the package's counter-based RNG, so the DARE bases are not implemented here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

EPS = 2.0**-52


def as_dense(x: Any) -> np.ndarray:
    """A float64 numpy copy of a torch tensor or array-like."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.array(x, dtype=np.float64)


# --------------------------------------------------------------------------------------------------------------
# Linear algebra helpers
# --------------------------------------------------------------------------------------------------------------


def numerical_rank_svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of x truncated to its numerical rank: (U m×ρ, s (ρ,), Vt ρ×n), s descending."""
    x = np.asarray(x, dtype=np.float64)
    m, n = x.shape
    if x.size == 0:
        return np.zeros((m, 0)), np.zeros(0), np.zeros((0, n))
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    if s.size == 0 or s[0] == 0.0:
        return np.zeros((m, 0)), np.zeros(0), np.zeros((0, n))
    tol = s[0] * max(m, n) * EPS
    rank = int(np.count_nonzero(s > tol))
    return u[:, :rank], s[:rank], vt[:rank, :]


def numerical_rank(x: np.ndarray) -> int:
    """The number of singular values > σ₁ · max(shape) · 2⁻⁵²."""
    return numerical_rank_svd(x)[1].size


def polar_factor(x: np.ndarray) -> np.ndarray:
    """Y Zᵀ from the numerical-rank thin SVD x = Y S Zᵀ (same shape as x)."""
    y, _, zt = numerical_rank_svd(x)
    return y @ zt


# --------------------------------------------------------------------------------------------------------------
# Entry-wise methods of SEMANTICS §3 on dense tensors (used as knots bases and in core space)
# --------------------------------------------------------------------------------------------------------------


def trim(x: np.ndarray, density: float | None) -> np.ndarray:
    """Keep the ⌊density·numel⌋ largest |x| (ties at the threshold: lower flat index first), zero the rest."""
    x = np.asarray(x, dtype=np.float64)
    if density is None or density >= 1.0:
        return x.copy()
    flat = x.reshape(-1)
    k = int(density * flat.size)
    if k <= 0:
        raise ValueError(f"density {density} keeps no entry of {flat.size}")
    index = np.arange(flat.size)
    order = np.lexsort((index, -np.abs(flat)))  # primary: larger |x| first; secondary: lower index first
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[:k]] = True
    return np.where(keep, flat, 0.0).reshape(x.shape)


def linear(vectors: Sequence[np.ndarray], weights: Sequence[float], normalize: bool = True) -> np.ndarray:
    """Σ wᵢτᵢ / Σ wᵢ (normalize) or Σ wᵢτᵢ."""
    total = sum(float(w) * np.asarray(v, dtype=np.float64) for v, w in zip(vectors, weights))
    if normalize:
        denominator = float(sum(weights))
        if denominator == 0.0:
            raise ValueError("linear with normalize: the sum of the weights is 0")
        return total / denominator
    return total


def task_arithmetic(vectors: Sequence[np.ndarray], weights: Sequence[float], lam: float = 1.0) -> np.ndarray:
    """λ · Σ wᵢτᵢ."""
    return lam * sum(float(w) * np.asarray(v, dtype=np.float64) for v, w in zip(vectors, weights))


def magnitude_prune(vectors: Sequence[np.ndarray], weights: Sequence[float], densities: Sequence[float | None],
                    lam: float = 1.0) -> np.ndarray:
    """TIES step (1) (trim), then λ · Σ wᵢtᵢ."""
    return lam * sum(float(w) * trim(v, d) for v, w, d in zip(vectors, weights, densities))


def ties(vectors: Sequence[np.ndarray], weights: Sequence[float], densities: Sequence[float | None],
         sign: str = "sum", normalize: bool = True, lam: float = 1.0) -> np.ndarray:
    """TIES: trim, uᵢ = wᵢtᵢ, elect γ (0 → +1), disjoint merge over agreeing non-zero uᵢ, Σ|wᵢ| divisor, λ."""
    updates = np.stack([float(w) * trim(v, d) for v, w, d in zip(vectors, weights, densities)])
    if sign == "sum":
        vote = updates.sum(axis=0)
    elif sign == "count":
        vote = np.sign(updates).sum(axis=0)
    else:
        raise ValueError(f"unknown sign rule {sign!r}")
    gamma = np.where(vote >= 0, 1.0, -1.0)
    agree = (updates != 0) & (np.sign(updates) == gamma)
    total = np.where(agree, updates, 0.0).sum(axis=0)
    if not normalize:
        return lam * total
    abs_w = np.abs(np.asarray(weights, dtype=np.float64)).reshape(-1, *([1] * (updates.ndim - 1)))
    divisor = np.where(agree, abs_w, 0.0).sum(axis=0)
    safe = np.where(divisor > 0, divisor, 1.0)
    return lam * np.where(divisor > 0, total / safe, 0.0)


def run_base(base: str, vectors: Sequence[np.ndarray], weights: Sequence[float], params: Mapping[str, Any],
             densities: Sequence[float | None]) -> np.ndarray:
    """One of the §3 methods (not DARE) on the given 'task vectors'."""
    lam = float(params.get("lambda", 1.0))
    if base == "linear":
        return linear(vectors, weights, bool(params.get("normalize", True)))
    if base == "task_arithmetic":
        return task_arithmetic(vectors, weights, lam)
    if base == "magnitude_prune":
        return magnitude_prune(vectors, weights, densities, lam)
    if base == "ties":
        return ties(vectors, weights, densities, str(params.get("sign", "sum")), bool(params.get("normalize", True)), lam)
    if base in ("dare_ties", "dare_linear"):
        raise NotImplementedError("DARE needs the package's counter-based RNG; not in the dense reference")
    raise ValueError(f"unknown base method {base!r}")


# --------------------------------------------------------------------------------------------------------------
# SEMANTICS §3c on dense task vectors
# --------------------------------------------------------------------------------------------------------------


def _updates(taus: Sequence[Any], weights: Sequence[float]) -> list[np.ndarray]:
    return [float(w) * as_dense(t) for t, w in zip(taus, weights)]


def tsv_m(taus: Sequence[Any], weights: Sequence[float], alpha: float = 1.0) -> np.ndarray:
    """TSV-M: per-adapter SVD of uᵢ keeping kᵢ = min(rank(uᵢ), ⌊min(m,n)/T⌋) triplets; stack; polar factors of
    the stacked U and V; alpha · U⊥ Σ V⊥ᵀ."""
    updates = _updates(taus, weights)
    m, n = updates[0].shape
    cap = min(m, n) // len(updates)
    us, ss, vs = [], [], []
    for u in updates:
        left, sigma, right_t = numerical_rank_svd(u)
        k = min(sigma.size, cap)
        us.append(left[:, :k])
        ss.append(sigma[:k])
        vs.append(right_t[:k, :].T)
    big_u, sigma, big_v = np.hstack(us), np.concatenate(ss), np.hstack(vs)
    if sigma.size == 0:
        return np.zeros((m, n))
    return alpha * (polar_factor(big_u) * sigma) @ polar_factor(big_v).T


def iso_c(taus: Sequence[Any], weights: Sequence[float], alpha: float = 1.0) -> np.ndarray:
    """Iso-C: S = Σ uᵢ = U Σ Vᵀ (rank ρ); alpha · mean(ρ nonzero σ) · U Vᵀ."""
    total = sum(_updates(taus, weights))
    left, sigma, right_t = numerical_rank_svd(total)
    if sigma.size == 0:
        return np.zeros(total.shape)
    return alpha * float(sigma.mean()) * (left @ right_t)


def iso_cts(taus: Sequence[Any], weights: Sequence[float], alpha: float = 1.0,
            common_fraction: float = 0.8) -> np.ndarray:
    """Iso-CTS: k_c = ⌊cf·ρ⌋ common triplets of S = Σuᵢ, k_s = ⌊(ρ−k_c)/T⌋ top triplets of each residual
    uᵢ − U_cU_cᵀuᵢ; polar factors of U* = [U_c, Ũ…], V* = [V_c, Ṽ…]; alpha · mean(selected σ) · U*⊥ V*⊥ᵀ."""
    updates = _updates(taus, weights)
    total = sum(updates)
    left, sigma, right_t = numerical_rank_svd(total)
    rho = sigma.size
    if rho == 0:
        return np.zeros(total.shape)
    k_c = int(np.floor(common_fraction * rho))
    k_s = (rho - k_c) // len(updates)
    u_c, s_c, v_c = left[:, :k_c], sigma[:k_c], right_t[:k_c, :].T
    us, ss, vs = [u_c], [s_c], [v_c]
    if k_s > 0:
        for u in updates:
            residual = u - u_c @ (u_c.T @ u)
            r_left, r_sigma, r_right_t = numerical_rank_svd(residual)
            k = min(k_s, r_sigma.size)
            us.append(r_left[:, :k])
            ss.append(r_sigma[:k])
            vs.append(r_right_t[:k, :].T)
    big_u, selected, big_v = np.hstack(us), np.concatenate(ss), np.hstack(vs)
    if selected.size == 0:
        return np.zeros(total.shape)
    return alpha * float(selected.mean()) * (polar_factor(big_u) @ polar_factor(big_v).T)


def knots(taus: Sequence[Any], weights: Sequence[float], base: str, params: Mapping[str, Any] | None = None,
          per_adapter_densities: Sequence[float | None] | None = None, seed: int = 0,
          tensor_name: str = "") -> np.ndarray:
    """KnOTS: SVD of [τ₁ … τ_T] = U Σ [Z₁ … Z_T]; run `base` on the representations ΣZᵢ (density counts their
    entries); merged delta U · Z. `seed` / `tensor_name` would key DARE's mask, which is not implemented here."""
    del seed, tensor_name
    params = dict(params or {})
    dense = [as_dense(t) for t in taus]
    m, n = dense[0].shape
    count = len(dense)
    densities = list(per_adapter_densities) if per_adapter_densities is not None else [params.get("density")] * count
    left, sigma, _ = numerical_rank_svd(np.hstack(dense))
    if sigma.size == 0:
        return np.zeros((m, n))
    # ΣZᵢ is the i-th n-column block of Σ Vᵀ; as τᵢ = U·ΣZᵢ with orthonormal U, it is also Uᵀτᵢ, which is how it is
    # computed here: an adapter with τᵢ = 0 then has a representation of exact zeros (the SVD's Σ Vᵀ block would
    # carry ~1e-32 noise, and TIES counts any non-zero uᵢ in its divisor).
    representations = [left.T @ t for t in dense]
    return left @ run_base(base, representations, weights, params, densities)


def core_space(factors: Sequence[tuple[Any, Any]], weights: Sequence[float], method: str,
               params: Mapping[str, Any] | None = None,
               per_adapter_densities: Sequence[float | None] | None = None) -> np.ndarray:
    """`space: core` for ties / magnitude_prune. `factors` are (Pᵢ m×rᵢ, Qᵢ rᵢ×n) with τᵢ = PᵢQᵢ (Pᵢ = sᵢBᵢ).
    V_P: left singular vectors of [P₁ … P_T]; V_Q: right singular vectors of [Q₁; …; Q_T] (numerical rank
    each); Mᵢ = V_Pᵀ τᵢ V_Q; the method's entry-wise steps on the Mᵢ give M; merged delta V_P M V_Qᵀ."""
    params = dict(params or {})
    ps = [as_dense(p) for p, _ in factors]
    qs = [as_dense(q) for _, q in factors]
    count = len(ps)
    densities = list(per_adapter_densities) if per_adapter_densities is not None else [params.get("density")] * count
    v_p = numerical_rank_svd(np.hstack(ps))[0]
    v_q = numerical_rank_svd(np.vstack(qs))[2].T
    cores = [v_p.T @ (p @ q) @ v_q for p, q in zip(ps, qs)]
    if method not in ("ties", "magnitude_prune"):
        raise NotImplementedError(f"core space reference covers ties and magnitude_prune, not {method!r}")
    merged = run_base(method, cores, weights, params, densities)
    return v_p @ merged @ v_q.T


def factored_task_vectors(factors: Sequence[tuple[Any, Any, float]]) -> list[np.ndarray]:
    """Dense τᵢ = scale · left @ right in float64 from (left, right, scale) triples."""
    return [float(scale) * (as_dense(left) @ as_dense(right)) for left, right, scale in factors]
