"""One in-place edit of an ONNX graph shared by the ONNX Runtime rewrites of this package."""

from __future__ import annotations

from typing import Any


def replace_nodes(graph: Any, nodes: list[Any], dropped: set[str]) -> None:
    """Make ``nodes`` the nodes of ``graph`` (in place) and remove the initializers named in
    ``dropped`` that no node reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    read = {n for node in nodes for n in node.input}
    keep = [i for i in graph.initializer if i.name not in dropped or i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)
