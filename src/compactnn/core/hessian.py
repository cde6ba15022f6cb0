"""Second-order statistics of a layer's inputs, shared by GPTQ, SparseGPT and the
block-sequential engine: the input Hessian ``X^T X`` and the damped inverse Cholesky factor
that both OBS-style solvers (GPTQ, SparseGPT) push their errors through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from compactnn.errors import CompactnnError

# Extra damping tried, as a fraction of the mean diagonal, when H is numerically singular.
DAMP_RETRIES = (0.0, 1e-4, 1e-2, 1e-1)


def layer_inputs_2d(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its weight's input dimension: ``(tokens, K)``.

    A ``Conv2d`` input ``(B, C, H, W)`` is unfolded into its ``C*kh*kw`` patches; any other
    layer reads the last dimension.

    Example:
        >>> layer_inputs_2d(nn.Linear(4, 2), torch.ones(3, 5, 4)).shape
        torch.Size([15, 4])
    """
    if isinstance(layer, nn.Conv2d):
        cols = nn.functional.unfold(  # (B, C*kh*kw, L)
            x, layer.kernel_size, layer.dilation, layer.padding, layer.stride
        )
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def accumulate_hessian(
    h: torch.Tensor | None, x: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Add ``x^T x`` of inputs ``x`` ``(..., K)`` to the running Hessian ``(K, K)``.

    Args:
        h: the sum so far, or None to start one.
        x: inputs whose last dimension is the layer's input dimension.
        dtype: accumulation dtype (float64 where many tokens are summed).

    Example:
        >>> accumulate_hessian(None, torch.ones(2, 3)).tolist()[0]
        [2.0, 2.0, 2.0]
    """
    x2 = x.detach().reshape(-1, x.shape[-1]).to(dtype)  # (tokens, K)
    xtx = x2.T @ x2
    return xtx if h is None else h + xtx


def drop_dead_inputs(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """In place: inputs that never fire (zero Hessian diagonal) get ``H_jj = 1`` and zero
    weight columns, so H stays invertible; returns their ``(K,)`` bool mask.

    Example:
        >>> h, w = torch.diag(torch.tensor([1.0, 0.0])), torch.ones(2, 2)
        >>> drop_dead_inputs(h, w).tolist(), w[:, 1].tolist()
        ([False, True], [0.0, 0.0])
    """
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return dead


def inverse_hessian_factor(h: torch.Tensor, damp: float, method: str = "GPTQ") -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, ``(K, K)``.

    When H is numerically singular even so, the damping grows (:data:`DAMP_RETRIES`, as
    fractions of the mean diagonal) before giving up.

    Args:
        h: the input Hessian ``(K, K)`` (any positive scale; not modified).
        damp: dampening, fraction of the mean diagonal.
        method: named in the error.

    Raises:
        CompactnnError: H stays singular with the largest damping.

    Example:
        >>> (inverse_hessian_factor(4 * torch.eye(2), 0.0) + 0.0).tolist()  # + 0.0: no -0.0
        [[0.5, 0.0], [0.0, 0.5]]
    """
    h = h.clone()
    diag = torch.arange(h.shape[0])
    h[diag, diag] += damp * h.diagonal().mean().clamp(min=1e-8)
    for extra in DAMP_RETRIES:
        try:
            hd = h.clone()
            hd[diag, diag] += extra * h.diagonal().mean()
            lower = torch.linalg.cholesky(hd)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise CompactnnError(
        f"{method}: the calibration Hessian is singular; give more calibration data."
    )


def hutchinson_trace(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    samples: int = 8,
    seed: int = 0,
) -> torch.Tensor:
    """Hutchinson's estimate of ``Tr(H_i)`` for each parameter block (HAWQ-V2).

    ``Tr(H) = E_v[v^T H v]`` for Rademacher ``v`` (entries +-1); ``H v`` is the gradient of
    ``g . v`` with ``g = dL/dtheta`` built with ``create_graph=True``, so no Hessian is formed.
    Attention runs on PyTorch's math kernel (the fused CPU/GPU kernels of
    ``scaled_dot_product_attention`` have no second derivative); a parameter the loss does
    not reach (a BERT pooler the loss never reads), or reaches only linearly, has trace 0.
    Another operation without a second derivative raises a one-line ``CompactnnError``.

    Args:
        loss_fn: returns a fresh scalar loss of ``params`` each call.
        params: tensors with ``requires_grad=True``; one trace per tensor (the diagonal block
            of the loss Hessian that belongs to it).
        samples: random vectors averaged.
        seed: seed of the vectors.

    Returns:
        ``(len(params),)`` float64 traces.

    Example:
        >>> w, u = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
        >>> hutchinson_trace(lambda: (w**2).sum(), [w, u], samples=2).tolist()  # H = 2 I
        [6.0, 0.0]
    """
    if samples < 1:
        raise CompactnnError(f"hutchinson_trace: samples={samples} must be at least 1.")
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(params), dtype=torch.float64)
    for _ in range(samples):
        vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype) for p in params]
        try:
            with sdpa_kernel(SDPBackend.MATH):  # twice differentiable, unlike the fused ones
                grads = torch.autograd.grad(loss_fn(), params, create_graph=True, allow_unused=True)
                used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                hvs = (
                    torch.autograd.grad(
                        [grads[i] for i in used],
                        [params[i] for i in used],
                        grad_outputs=[vs[i] for i in used],
                        allow_unused=True,
                    )
                    if used
                    else ()
                )
        except RuntimeError as exc:
            if not any(k in str(exc) for k in ("derivative for", "double backward", "twice")):
                raise
            raise CompactnnError(
                f"the Hessian trace (measure='hessian', --measure hessian) needs a model "
                f"it can differentiate twice: {str(exc).splitlines()[0]}; use measure="
                "'measured' (--measure measured)."
            ) from exc
        for i, hv in zip(used, hvs, strict=True):
            if hv is not None:
                total[i] += float((hv * vs[i]).sum())
    return total / samples
