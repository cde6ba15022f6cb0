"""Shared by the collapse-warning tests of the pruning steps."""

import warnings

import torch

import compactnn


def collapse_warnings(net, x, method: str, config):
    """Compress ``net`` with one ``method`` step on ``x``; returns the collapse warnings, the
    pruned model, and both models' argmax on ``x`` (computed here, by hand)."""
    recipe = compactnn.Recipe(method, (compactnn.Step(method, config),))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = compactnn.compress(net, recipe, calib_data=x, progress=False)
    with torch.no_grad():
        want, got = net(x).argmax(1), pruned(x).argmax(1)
    found = [str(w.message) for w in caught if "collapsed" in str(w.message)]
    return found, pruned, want, got
