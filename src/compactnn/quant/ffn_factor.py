"""The math of FFN's ternary factorization, as pure functions on tensors (no modules).

``W ~ U diag(d) V^T`` with ternary ``U``, ``V``: the greedy, back-fitted alternating
factorization (:func:`ternary_factorize`), the least-squares scales on calibration statistics
(:func:`joint_scales`), the exact coordinate-descent refit of the codes (:func:`refit_codes`),
the error-propagated target, and the byte accounting behind the rank budget
(:func:`allocate_ranks`). The method itself (config, layers, artifact hook) is
:mod:`compactnn.quant.ffn`; its docstring gives the equations.
"""

from __future__ import annotations

import math

import torch


def best_ternary(z: torch.Tensor) -> torch.Tensor:
    """The ternary ``t`` maximising ``(t^T z)^2 / |t|_0``: signs of the top ``k`` of ``|z|``.

    Example:
        >>> best_ternary(torch.tensor([3.0, -0.1, -2.0])).tolist()
        [1.0, 0.0, -1.0]
    """
    mag, order = z.abs().sort(descending=True)
    k = torch.arange(1, z.numel() + 1, dtype=z.dtype)
    k_best = int((mag.cumsum(0).pow(2) / k).argmax()) + 1
    t = torch.zeros_like(z)
    keep = order[:k_best]
    t[keep] = torch.sign(z[keep])
    return t


def rank_one_scale(r: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``d = u^T R v / (|u|_0 |v|_0)`` (0 when either factor is empty)."""
    n = (u != 0).sum() * (v != 0).sum()
    return (u @ r @ v) / n if n > 0 else r.new_zeros(())


def fit_rank_one(r: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sweeps: int = 3):
    """Alternate the exact ternary ``u`` and ``v`` steps on residual ``r``; returns
    ``(u, v, d)``. Starts from ``(u, v)`` and never lowers ``(u^T r v)^2 / (|u|_0 |v|_0)``."""
    for _ in range(sweeps):
        u = best_ternary(r @ v) if (v != 0).any() else u
        v = best_ternary(r.T @ u) if (u != 0).any() else v
    return u, v, rank_one_scale(r, u, v)


def joint_scales(
    w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, h: torch.Tensor | None = None
) -> torch.Tensor:
    """All of ``d`` by least squares: ``(U^T U * V^T H V) d = diag(U^T W H V)`` (``H = I``:
    the weight reconstruction; ``H = X^T X``: the layer's outputs on calibration data)."""
    u64, v64, w64 = u.double(), v.double(), w.double()
    hv = v64 if h is None else h.double() @ v64  # (K, r)
    gram = (u64.T @ u64) * (v64.T @ hv)
    rhs = ((u64.T @ w64) * hv.T).sum(1)
    ridge = 1e-9 * gram.diagonal().mean().clamp(min=1e-30)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.lstsq(gram + ridge * eye, rhs.unsqueeze(1)).solution.squeeze(1).float()


def factor_error(w, u, v, d) -> float:
    return float((w - (u * d) @ v.T).pow(2).sum())


def ternary_factorize(
    w: torch.Tensor, rank: int, iters: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """``W ~ U diag(d) V^T`` with ternary ``U`` ``(out, r)``, ``V`` ``(K, r)``.

    Returns ``(U, V, d, history)``: ``history`` holds the squared reconstruction error after
    the greedy pass and after each back-fitting sweep (non-increasing), then after the joint
    least-squares refit of ``d``.
    """
    w = w.detach().float()
    out, k = w.shape
    u, v, d = w.new_zeros(out, rank), w.new_zeros(k, rank), w.new_zeros(rank)
    resid = w.clone()
    for j in range(rank):  # greedy: start each term from the residual's top singular pair
        _, _, vh = torch.linalg.svd(resid, full_matrices=False)
        v0 = best_ternary(vh[0])
        u[:, j], v[:, j], d[j] = fit_rank_one(resid, best_ternary(resid @ v0), v0)
        resid -= d[j] * torch.outer(u[:, j], v[:, j])
    history = [factor_error(w, u, v, d)]
    for _ in range(iters):  # back-fitting sweeps
        for j in range(rank):
            partial = resid + d[j] * torch.outer(u[:, j], v[:, j])
            u[:, j], v[:, j], d[j] = fit_rank_one(partial, u[:, j], v[:, j], sweeps=1)
            resid = partial - d[j] * torch.outer(u[:, j], v[:, j])
        history.append(factor_error(w, u, v, d))
        if history[-2] - history[-1] <= 1e-7 * history[0]:
            break
    d = joint_scales(w, u, v)
    history.append(factor_error(w, u, v, d))
    return u, v, d, history


def output_error(w: torch.Tensor, what: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)``: the layer's output error on inputs with ``H``."""
    e = (w - what).double()
    return float(((e @ h.double()) * e).sum())


def _round_ternary(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``argmin_t c t^2 - 2 z t`` over ``t in {-1, 0, 1}`` (``c > 0``)."""
    return (z / c).clamp(-1, 1).round()


def refit_codes(
    w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, d: torch.Tensor, h: torch.Tensor,
    sweeps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:  # fmt: skip
    """Refit the ternary codes and ``d`` to the layer's outputs: exact coordinate descent on
    ``E = tr((W - U D V^T) H (W - U D V^T)^T)``, ``H = X^T X`` of the calibration inputs.

    Each code ``t`` of ``V`` (then of ``U``) in turn takes the minimiser over ``{-1, 0, 1}``
    of the one-dimensional quadratic ``E(t) = c t^2 - 2 z t + const``: for ``V_jk`` with
    ``a_k = d_k u_k`` and residual ``R = W - U D V^T``, ``c = |a_k|^2 H_jj`` and
    ``z = a_k^T (R H)_j + c V_jk``; rows of ``U`` are independent (``B = D V^T``,
    ``G = B H B^T``: ``c = G_kk``, ``z = (W H B^T - U G)_ik + c U_ik``). Then ``d`` by least
    squares (:func:`joint_scales`). Every step is exact over its block, so ``E`` never
    increases. Returns ``(U, V, d, history)``: ``E`` before and after each sweep.
    """
    w64, h64 = w.double(), h.double()
    u, v, d = u.double().clone(), v.double().clone(), d.double().clone()
    history = [output_error(w64, (u * d) @ v.T, h64)]
    for _ in range(sweeps):
        a = u * d  # (out, r)
        rh = (w64 - a @ v.T) @ h64  # (out, K)
        norms = a.pow(2).sum(0)  # (r,)
        for j in range(v.shape[0]):
            for k in range(v.shape[1]):
                c = norms[k] * h64[j, j]
                if c <= 0:
                    continue
                t = _round_ternary(a[:, k] @ rh[:, j] + c * v[j, k], c)
                delta = t - v[j, k]
                if delta != 0:
                    v[j, k] = t
                    rh -= delta * torch.outer(a[:, k], h64[j])
        b = d.unsqueeze(1) * v.T  # (r, K)
        g = b @ h64 @ b.T  # (r, r)
        target = w64 @ h64 @ b.T  # (out, r)
        for k in range(u.shape[1]):  # all rows of U at once
            if g[k, k] <= 0:
                continue
            z = target[:, k] - u @ g[:, k] + g[k, k] * u[:, k]
            u[:, k] = _round_ternary(z, g[k, k])
        d = joint_scales(w64, u, v, h64).double()
        history.append(output_error(w64, (u * d) @ v.T, h64))
    return u.float(), v.float(), d.float(), history


def propagated_target(
    w: torch.Tensor, h_qq: torch.Tensor, h_qf: torch.Tensor, damp: float = 0.01
) -> torch.Tensor:
    """The weight whose outputs on the compressed model's inputs best match the float ones.

    With ``X_q`` the layer's inputs after the already-compressed layers and ``X_f`` the float
    model's, ``||X_q W_hat^T - X_f W^T||^2 = ||W_hat - W*||^2_(H_qq) + const`` for
    ``W* = W H_fq H_qq^-1`` (``H_qq = X_q^T X_q``, ``H_qf = X_q^T X_f``), computed damped as
    ``W* = W + W (H_fq - H_qq) (H_qq + l I)^-1`` (``l``: ``damp`` times the mean diagonal), so
    ``W* = W`` when nothing upstream changed.
    """
    h, w64 = h_qq.double(), w.double()
    lam = damp * h.diagonal().mean().clamp(min=1e-12)
    reg = h + lam * torch.eye(h.shape[0], dtype=h.dtype)
    return (w64 + torch.linalg.solve(reg, (h_qf.double() - h) @ w64.T).T).float()


def stored_bytes(out: int, k: int, rank: int) -> int:
    """Bytes the two ternary layers store: 2-bit codes, float16 ``d`` and unit scales."""
    return math.ceil(2 * rank * k / 8) + math.ceil(2 * out * rank / 8) + 2 * rank + 2 * out


def rtn_bytes(out: int, k: int, bits: float) -> int:
    """What ``w<bits>`` round-to-nearest stores for a layer: codes, fp16 scale and a zero."""
    return math.ceil(bits * out * k / 8) + 3 * out


def rank_for_budget(out: int, k: int, bits: float) -> int:
    """The largest rank whose stored bytes fit ``w<bits>`` round-to-nearest's (>= 1)."""
    target = rtn_bytes(out, k, bits)
    rank = 1
    while rank < 2 * min(out, k) and stored_bytes(out, k, rank + 1) <= target:
        rank += 1
    return rank


def truncation_errors(
    w: torch.Tensor, rank: int, iters: int, h: torch.Tensor | None
) -> list[float]:
    """Relative output error ``E_r / E_0`` of the first ``r`` terms of one rank-``rank``
    factorization of ``w``, ``d`` refit per ``r`` (``H = I`` without calibration data)."""
    h = torch.eye(w.shape[1], dtype=torch.float64) if h is None else h.double()
    u, v, _, _ = ternary_factorize(w, rank, iters)
    total = max(output_error(w, torch.zeros_like(w), h), 1e-30)
    errors = []
    for r in range(1, rank + 1):
        d = joint_scales(w, u[:, :r], v[:, :r], h)
        errors.append(output_error(w, (u[:, :r] * d) @ v[:, :r].T, h) / total)
    return errors


def allocate_ranks(
    errors: dict[str, list[float]], costs: dict[str, list[int]], budget: int
) -> dict[str, int]:
    """Ranks under a whole-model byte ``budget``, greedily: every layer starts at rank 1, then
    the layer whose next rank lowers its relative output error most per byte gets it, while
    the total fits (``errors[n][r - 1]``, ``costs[n][r - 1]``: error and bytes at rank r).

    Example:
        >>> allocate_ranks({"a": [0.5, 0.1], "b": [0.5, 0.4]}, {"a": [1, 2], "b": [1, 2]}, 3)
        {'a': 2, 'b': 1}
    """
    ranks = dict.fromkeys(errors, 1)
    spent = sum(costs[n][0] for n in errors)
    while True:
        best, best_gain = None, 0.0
        for n, r in ranks.items():
            if r < len(errors[n]) and spent + costs[n][r] - costs[n][r - 1] <= budget:
                gain = (errors[n][r - 1] - errors[n][r]) / max(costs[n][r] - costs[n][r - 1], 1)
                if gain > best_gain:
                    best, best_gain = n, gain
        if best is None:
            return ranks
        spent += costs[best][ranks[best]] - costs[best][ranks[best] - 1]
        ranks[best] += 1
