"""The notes ``compactnn eval`` writes under its table about what was measured: a deployed
row's quality next to the simulated model's, and scoring on the calibration inputs."""

from __future__ import annotations

from typing import Any

from compactnn.measure import fmt_quality


def simulated_note(
    row: dict[str, Any], simulated: float | None, cause: str | None = None
) -> str | None:
    """One line when the deployed ``row``'s quality differs from the simulated model's;
    ``cause``: why, from what ran (``delivery.rounding_cause``; default: integer kernels).

    Example:
        >>> row = {"metric": "top1", "quality": 93.41, "runtime": "ONNX Runtime int8"}
        >>> simulated_note(row, 92.86)[:80]
        'simulated model (the fake-quantized one compress and train build): 92.86% top-1;'
    """
    from compactnn.report.delivery import INTEGER_ROUNDING  # the application: loaded here

    if simulated is None or row["quality"] is None or simulated == row["quality"]:
        return None
    metric = row["metric"]
    name = " top-1" if metric == "top1" else f" {metric}"
    return (
        "simulated model (the fake-quantized one compress and train build): "
        f"{fmt_quality(metric, simulated)}{name}; deployed ({row['runtime']}): "
        f"{fmt_quality(metric, row['quality'])}: {cause or INTEGER_ROUNDING}"
    )


def calibration_scored_note(
    extra: dict[str, Any], inputs: Any, model: Any, artifact: bool
) -> str | None:
    """One line when ``inputs`` (the scored ``--data`` inputs) are the calibration inputs
    the compressed model records (``extra``: its ``info_of(...)["extra"]``; ``model``: the
    float model, whose dtype compress cast them to); ``artifact``: an artifact directory,
    else a model compressed in memory (``--recipe``)."""
    from compactnn.report.sources import own_calibration_note  # the application: loaded here

    whose = "artifact's" if artifact else "compressed model's"
    return own_calibration_note(extra, inputs, model, whose) if inputs is not None else None
