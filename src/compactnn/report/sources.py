"""What artifacts record about their float model, and the refusals that follow from it.

A report (and ``compactnn eval``) compares compressed models with the float model they were
made from: artifacts of other float models (another class, other weights), the same
artifact twice, or a float model other than the recorded one would give numbers that mean
nothing. Each refusal is one line naming what differs and the way out.

Example:
    >>> check_artifacts(["out/w8a8", "out/w4a8"])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from compactnn.errors import CompactnnError, first_line
from compactnn.export.artifact import HEADER, artifact_exists, read_header

CHANGED_WEIGHTS = "is not the file this artifact was made from"


def source_of(header: dict[str, Any]) -> dict[str, Any]:
    """The artifact's record of its float model (``extra.source``), or ``{}``."""
    source = header.get("extra", {}).get("source")
    return source if isinstance(source, dict) else {}


def source_key(header: dict[str, Any]) -> tuple[str, str] | None:
    """What the artifact records about its float model (name and weights digest)."""
    source = source_of(header)
    if not source.get("model"):
        return None
    digest = source.get("weights_sha256") or source.get("sha256") or ""
    return str(source["model"]), str(digest)


def describe(header: dict[str, Any]) -> str:
    """The recorded float model in a few words: its name, weights file and short digest.

    Example:
        >>> describe({"extra": {"source": {"model": "m:build", "weights": "/d/w.safetensors",
        ...           "weights_sha256": "0123456789abcdef0123"}}})
        "'m:build' with weights 'w.safetensors' (SHA-256 0123456789abcdef...)"
    """
    source = source_of(header)
    text = f"{str(source.get('model'))[:120]!r}"
    if source.get("weights"):
        text += f" with weights {Path(str(source['weights'])).name[:120]!r}"
    digest = source.get("weights_sha256") or source.get("sha256")
    return text + (f" (SHA-256 {str(digest)[:16]}...)" if digest else "")


def _short_class(header: dict[str, Any]) -> str:
    return str(header.get("model_class", "?")).rsplit(".", 1)[-1][:80]


def check_artifact_path(path: str | os.PathLike) -> None:
    """Refuse a path that is no artifact, saying why: it does not exist, it is a file, it
    has no header, or its header is not a compactnn one (``read_header``'s own message).

    Raises:
        CompactnnError: naming the path and the fix.
    """
    p = Path(path)
    fix = "pass directories written by `compactnn compress` or compactnn.save."
    if not p.exists():
        raise CompactnnError(f"artifact {str(path)!r} does not exist; {fix}")
    if not p.is_dir():
        raise CompactnnError(f"{str(path)!r} is a file, not an artifact directory; {fix}")
    if not (p / HEADER).exists():
        raise CompactnnError(
            f"{str(path)!r} is not a compactnn artifact directory (no {HEADER}); {fix}"
        )
    try:
        read_header(path)  # a header that is not a compactnn one: its own message
    except CompactnnError as exc:
        raise CompactnnError(f"{first_line(exc).rstrip('.')}; {fix}") from exc
    raise CompactnnError(f"{str(path)!r}/{HEADER} is not a compactnn header; {fix}")


def check_artifacts(artifacts: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Verified headers of ``artifacts``; they must all come from one float model.

    Raises:
        CompactnnError: no artifact, a path that is not an artifact, an artifact given
            twice, or artifacts whose float models differ (class, or recorded name or
            weights digest).

    Example:
        >>> check_artifacts(["out/w8a8", "out/w4a8"])  # doctest: +SKIP
    """
    if not artifacts:
        raise CompactnnError("no artifact given: pass one or more artifact directories.")
    headers, seen = [], {}
    for path in artifacts:
        if not artifact_exists(path):
            check_artifact_path(path)
        real = os.path.realpath(path)
        if real in seen:
            raise CompactnnError(
                f"artifact {str(path)!r} is given twice (as {seen[real]!r} too): pass each "
                "artifact once."
            )
        seen[real] = str(path)
        headers.append(read_header(path))
    paths = [str(p) for p in artifacts]
    classes = {str(h.get("model_class")) for h in headers}
    if len(classes) > 1:
        pairs = zip(paths, headers, strict=True)
        listing = "; ".join(f"{p!r}: {_short_class(h)}" for p, h in pairs)
        raise CompactnnError(
            f"the artifacts need different float models ({listing}); one report takes one "
            "--model: report them apart."
        )
    keyed = [(p, h) for p, h in zip(paths, headers, strict=True) if source_key(h) is not None]
    if len({source_key(h) for _, h in keyed}) > 1:
        firsts: dict[tuple[str, str], str] = {}
        for p, h in keyed:
            firsts.setdefault(source_key(h), f"{p!r} from {describe(h)}")
        raise CompactnnError(
            f"the artifacts come from different float models ({'; '.join(firsts.values())}); "
            "a report compares compressions of one model: pass the artifacts of one model "
            "only, or report them apart."
        )
    return headers


def check_skeleton(path: str, header: dict[str, Any], model: Any, option: str) -> None:
    """Refuse a float model whose class is not the artifact's, naming the float model the
    artifact records (if any) before anything runs it on data.

    Raises:
        CompactnnError: ``'art' holds a DigitsResNet (made from 'digits-resnet'), but
            --model minilm builds a BertModel: pass --model digits-resnet.``
    """
    from compactnn.export.reader import class_fits
    from compactnn.export.validate import model_class_name

    given = model_class_name(model)
    if class_fits(str(header.get("model_class")), model):
        return
    source = source_of(header)
    made, fix = "", "the float model it was made from"
    if source.get("model"):
        made = f" (made from {describe(header)})"
        spec = str(source["model"])[:120]
        fix = f"--model {spec}" + (" --weights FILE" if source.get("kind") == "factory" else "")
    raise CompactnnError(
        f"artifact {path!r} holds a {_short_class(header)}{made}, but {option} builds a "
        f"{given.rsplit('.', 1)[-1]}: pass {fix}."
    )


def refuse_changed_weights(build: Callable[[], Any], header: dict[str, Any], why: str) -> Any:
    """``build()`` (e.g. :func:`compactnn.model_io.skeleton_for`), with its warning that the
    given weights are not the ones the artifact (``header``) was made from turned into a
    refusal naming both files (``why``: what the comparison needs); other warnings pass on.

    Raises:
        CompactnnError: ``'w.safetensors' (SHA-256 ...) is not the file this artifact was
            made from ('m:build' with weights 'w1.safetensors' (SHA-256 ...)). <why>``
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = build()
    for w in caught:
        text = str(w.message)
        if CHANGED_WEIGHTS in text:
            given = text.split(CHANGED_WEIGHTS)[0].strip()
            raise CompactnnError(f"{given} {CHANGED_WEIGHTS} ({describe(header)}). {why}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return loaded
