"""Imports every method file once, so each registers its handler. Add a method here."""

from compactnn.prune import channel, dns, gradual, magnitude, nm, sparsegpt, wanda  # noqa: F401
from compactnn.quant import (  # noqa: F401
    adaround,
    awq,
    bias_correction,
    bireal,
    bitsplit,
    brecq,
    cle,
    dorefa,
    gptq,
    inq,
    lsq,
    pact,
    qdrop,
    reactnet,
    rtn,
    smoothquant,
    ste,
    ttq,
    tune,
    twn,
    xnor,
)
