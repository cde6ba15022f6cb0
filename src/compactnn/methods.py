"""Imports every method file once, so each registers its handler. Add a method here."""

from compactnn.prune import channel, dns, gradual, magnitude, nm, sparsegpt, wanda  # noqa: F401
from compactnn.quant import (  # noqa: F401
    adaround,
    awq,
    biascorr,
    bireal,
    bitsplit,
    brecq,
    cle,
    dorefa,
    gptq,
    gptq_tune,
    inq,
    lsq,
    pact,
    qdrop,
    reactnet,
    rtn,
    smoothquant,
    ste,
    ttq,
    twn,
    xnor,
)
