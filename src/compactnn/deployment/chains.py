"""Patterns of a deployed graph that the plan runner runs as one kernel call.

Each function looks at one node of an ``fx.GraphModule`` from ``compactnn.deploy`` and returns
the nodes of a chain the direct kernels take whole (a global pool and its quantize, a
quantize and the small convolution it feeds, a layer and its Hardswish, a squeeze-excitation
gate and its tail, a depthwise convolution and the 1x1 convolutions around it), or None.
Pure graph reads: nothing is changed; the runner (:mod:`compactnn.deployment.runner`) decides
what to emit. Each function checks the graph's structure first and asks for the compiled
extension (:func:`~compactnn.kernels.bitconv.available`, which builds it on first use) only
once a chain is found, so a graph without such a chain never triggers the build here.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from compactnn.deployment.depthwise import dw_block_fits
from compactnn.deployment.direct import small_conv_fits, squeeze_fits
from compactnn.deployment.hardswish import hardswish_fits
from compactnn.deployment.lowbit import QuantizeGrid
from compactnn.deployment.onednn import Int8Conv2d, Quantize
from compactnn.kernels import bitconv


def global_pool(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The ``AdaptiveAvgPool2d(1)`` that ``node`` is: the module, or (torchvision's MobileNetV2
    calls the function) ``F.adaptive_avg_pool2d(x, 1)`` / ``(x, (1, 1))`` as a module."""
    if node.op == "call_module":
        pool = gm.get_submodule(node.target)
        if type(pool) is nn.AdaptiveAvgPool2d and pool.output_size in (1, (1, 1)):
            return pool
        return None
    if node.op != "call_function" or node.target is not F.adaptive_avg_pool2d:
        return None
    size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    if len(node.args) + len(node.kwargs) != 2 or size not in (1, (1, 1), [1, 1]):
        return None
    return nn.AdaptiveAvgPool2d(1)


def _quantize_user(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The only user of ``node`` when it is a quantize module called on ``node`` alone."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or user.args != (node,) or user.kwargs:
        return None
    return user if type(gm.get_submodule(user.target)) in (Quantize, QuantizeGrid) else None


def pooled_quantize(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The quantize node that is the only user of global-average-pool ``node``, if any."""
    if global_pool(gm, node) is None:
        return None
    quant = _quantize_user(gm, node)
    return quant if quant is not None and bitconv.available() else None


def fusable_quantize(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The small convolution node that is the only user of quantize ``node``, if any."""
    if node.op != "call_module" or len(node.users) != 1:
        return None
    if type(gm.get_submodule(node.target)) not in (Quantize, QuantizeGrid):
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or len(user.args) != 1 or user.args[0] is not node or user.kwargs:
        return None
    conv = gm.get_submodule(user.target)
    same_grid = tuple(gm.get_submodule(node.target).qp[:2]) == tuple(getattr(conv, "x_qp", ()))
    return user if same_grid and small_conv_fits(conv) else None


def _only_conv(gm: fx.GraphModule, node: Any) -> Int8Conv2d | None:
    """The int8 convolution that ``node`` calls, if it is one."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or node.kwargs:
        return None
    m = gm.get_submodule(node.target)
    return m if isinstance(m, Int8Conv2d) else None


def _depthwise_shape(m: Int8Conv2d) -> bool:
    """Whether ``m`` has a depthwise convolution's shape (one channel per group in and out;
    no extension needed to tell)."""
    o, c = m.w_int8.shape[:2]
    return c == 1 and m.groups == o


def dw_block_chain(
    gm: fx.GraphModule, node: fx.Node
) -> tuple[fx.Node | None, fx.Node, fx.Node | None] | None:
    """``(expand, node, project)`` when depthwise convolution ``node`` runs as one pass with the
    1x1 convolution whose codes are its only input (``expand``, used by nothing else) and the
    one that is its only user (``project``), either None where there is none
    (:func:`~compactnn.deployment.depthwise.dw_block_fits`); None when neither exists."""
    dw = _only_conv(gm, node)
    if dw is None or len(node.args) != 1 or not _depthwise_shape(dw):
        return None
    expand = node.args[0]
    if _only_conv(gm, expand) is None or len(expand.users) != 1 or len(expand.args) != 1:
        expand = None
    project = next(iter(node.users)) if len(node.users) == 1 else None
    if _only_conv(gm, project) is None or project.args[0] is not node:
        project = None
    if (expand is not None or project is not None) and not bitconv.available():
        return None
    if expand is not None and not dw_block_fits(gm.get_submodule(expand.target), dw, None):
        expand = None
    if project is not None and not dw_block_fits(None, dw, gm.get_submodule(project.target)):
        project = None
    return None if expand is None and project is None else (expand, node, project)


def hardswish_chain(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """For convolution or linear layer ``node`` whose only user is a Hardswish: that node, and
    the quantize that is the Hardswish's only user (or None); None when they cannot run as one
    kernel."""
    if node.op != "call_module" or len(node.users) != 1:
        return None
    act = next(iter(node.users))
    if act.op != "call_module" or act.args != (node,) or act.kwargs:
        return None
    if type(gm.get_submodule(act.target)) is not nn.Hardswish:
        return None
    if not bitconv.available() or not hardswish_fits(gm.get_submodule(node.target)):
        return None
    return act, _quantize_user(gm, act)


def gate_chain(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """For Hardsigmoid ``node`` (a squeeze-excitation gate) whose only user multiplies it into
    a map that a quantization alone reads: (the multiply, the quantize, the map's node)."""
    if node.op != "call_module" or len(node.users) != 1:
        return None
    if type(gm.get_submodule(node.target)) is not nn.Hardsigmoid or len(node.args) != 1:
        return None
    mul = next(iter(node.users))
    if mul.op != "call_function" or mul.target not in (operator.mul, torch.mul) or mul.kwargs:
        return None
    if len(mul.args) != 2 or node not in mul.args:
        return None
    x = mul.args[1] if mul.args[0] is node else mul.args[0]
    if not isinstance(x, fx.Node) or x is node:
        return None
    quant = _quantize_user(gm, mul)
    return None if quant is None or not bitconv.available() else (mul, quant, x)


def squeeze_chain(
    gm: fx.GraphModule, gate: fx.Node, x: fx.Node, pooled: dict
) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """For the Hardsigmoid ``gate`` of a squeeze-excitation tail on map ``x``: (the pool's
    fused quantize, fc1, fc2) when ``quantize(pool(x)) -> fc1 -> fc2 -> gate`` is a chain of
    single users that :func:`~compactnn.deployment.direct.squeeze_fits`; else None."""
    fc2 = gate.args[0]
    if not isinstance(fc2, fx.Node) or fc2.op != "call_module" or len(fc2.users) != 1:
        return None
    if len(fc2.args) != 1 or fc2.kwargs or not isinstance(fc2.args[0], fx.Node):
        return None
    fc1 = fc2.args[0]
    if fc1.op != "call_module" or len(fc1.users) != 1 or len(fc1.args) != 1 or fc1.kwargs:
        return None
    poolq = fc1.args[0]
    if not isinstance(poolq, fx.Node) or poolq not in pooled or len(poolq.users) != 1:
        return None
    pool = poolq.args[0]
    if not isinstance(pool, fx.Node) or pool.args[:1] != (x,):
        return None
    m1, m2 = gm.get_submodule(fc1.target), gm.get_submodule(fc2.target)
    if not (isinstance(m1, Int8Conv2d) and isinstance(m2, Int8Conv2d)):
        return None
    return (poolq, fc1, fc2) if squeeze_fits(m1, m2) else None
