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

import torch

from compactnn.core.calib import model_dtype
from compactnn.core.provenance import CALIB_KEY, FLOAT_KEY, scored_on_calibration
from compactnn.errors import CompactnnError, first_line, name_list, user_stacklevel
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
    digests: dict[str, str] = {}  # float-model digest -> first artifact recording it
    for p, h in zip(paths, headers, strict=True):
        if (d := float_digest(h)) is not None:
            digests.setdefault(d, p)
    if len(digests) > 1:
        (d1, p1), (d2, p2) = list(digests.items())[:2]
        raise CompactnnError(
            f"the artifacts come from different float models ({p1!r}: float-model SHA-256 "
            f"{d1[:16]}...; {p2!r}: {d2[:16]}...); a report compares compressions of one "
            "model: pass the artifacts of one model only, or report them apart."
        )
    return headers


def float_digest(header: dict[str, Any]) -> str | None:
    """The SHA-256 of the float model's state dict that compress recorded
    (``extra.float_model.sha256``), or None (an artifact made before it was recorded)."""
    record = header.get("extra", {}).get(FLOAT_KEY)
    digest = record.get("sha256") if isinstance(record, dict) else None
    return digest if isinstance(digest, str) and digest else None


def _file_digest(header: dict[str, Any]) -> bool:
    key = source_key(header)
    return key is not None and bool(key[1])


def given_as(source: dict[str, Any] | None) -> str:
    """How the user named the float model, for messages: ``--model M --weights w.safetensors``
    from the command line's record, else ``the model given``."""
    if not source or not source.get("model"):
        return "the model given"
    text = f"--model {str(source['model'])[:120]}"
    if source.get("weights"):
        text += f" --weights {Path(str(source['weights'])).name[:120]}"
    return text


def check_float_model(
    artifacts: Sequence[str | os.PathLike],
    headers: Sequence[dict[str, Any]],
    model: Any,
    given: str = "the model given",
) -> None:
    """Refuse an artifact whose recorded float-model digest is not ``model``'s (its numbers
    against this float model would mean nothing), naming both; warn once, naming them, when
    artifacts record no digest (older ones), since the check could not be made.

    Raises:
        CompactnnError: ``artifact 'b/w8a8' was made from another float model (SHA-256 ...)
            than the model given (SHA-256 ...): ...``
    """
    from compactnn.core.provenance import state_sha256

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the model compressed
    pairs = list(zip(artifacts, headers, strict=True))
    recorded = [(str(p), float_digest(h)) for p, h in pairs]
    if any(d is not None for _, d in recorded) and (mine := state_sha256(model)) is not None:
        for path, digest in recorded:
            if digest is not None and digest != mine:
                raise CompactnnError(
                    f"artifact {path!r} was made from another float model (state SHA-256 "
                    f"{digest[:16]}...) than {given} (SHA-256 {mine[:16]}...): compared with "
                    "it, its numbers would mean nothing; pass the float model (weights) it was "
                    "made from, or report it apart."
                )
    # a weights file's SHA-256 (command line, streamed) is checked where the file is given
    missing = [str(p) for p, h in pairs if float_digest(h) is None and not _file_digest(h)]
    if missing:
        warnings.warn(
            f"{name_list([repr(p) for p in missing], 4)} "
            f"record{'s' if len(missing) == 1 else ''} no float-model digest (made before "
            f"compactnn recorded one): could not check that "
            f"{'it was' if len(missing) == 1 else 'they were'} made from {given}.",
            stacklevel=user_stacklevel(),
        )


def calibration_text(header: dict[str, Any]) -> str:
    """What an artifact records of its calibration data, in a few words.

    Example:
        >>> calibration_text({"extra": {"calibration": {"samples": 3, "batches": 1,
        ...     "inputs_sha256": "f5d96335c84b7e96"}}})
        '3 samples in 1 batch (inputs SHA-256 f5d96335...)'
    """
    extra = header.get("extra", {})
    free, record = extra.get("calibration_data"), extra.get(CALIB_KEY)
    if isinstance(free, dict) and free.get("data") == "data-free":
        return f"{free.get('images')} generated images (data-free, {free.get('method')})"
    if not isinstance(record, dict):
        return "not recorded"
    n = record.get("batches")
    threads = record.get("torch_threads")  # artifacts of session 34's first commits
    return (
        f"{record.get('samples')} samples in {n} batch{'' if n == 1 else 'es'} (inputs "
        f"SHA-256 {str(record.get('inputs_sha256'))[:8]}...)"
        + (f", {threads} torch threads" if threads is not None else "")
    )


def calibration_note(labelled: Sequence[tuple[str, dict[str, Any]]]) -> str | None:
    """A note when the rows (``(label, header)``) were calibrated on different data (other
    samples, or data one does not record), listing each; None when they agree."""

    def data_of(header: dict[str, Any]) -> str:  # the data, threads aside
        record = header.get("extra", {}).get(CALIB_KEY)
        if isinstance(record, dict) and "calibration_data" not in header.get("extra", {}):
            return f"{record.get('samples')} {record.get('inputs_sha256')}"
        return calibration_text(header)

    if len({data_of(h) for _, h in labelled}) < 2:
        return None
    texts = [(label, calibration_text(h)) for label, h in labelled]
    listing = "; ".join(f"{label}: {text}" for label, text in texts)
    return f"Rows calibrated on different data: {listing}."


def own_calibration_note(
    extra: dict[str, Any], inputs: Any, model: Any, whose: str = "artifact's"
) -> str | None:
    """A note when ``inputs`` (every sample scored) are the calibration inputs the artifact
    records (``extra``: its ``extra``; :func:`~compactnn.core.provenance.scored_on_calibration`,
    cast to ``model``'s dtype as compress casts them): its activation ranges were fitted to
    them, so its score there may be better than on other data. None otherwise.

    Example:
        >>> own_calibration_note({}, None, None) is None
        True
    """
    record = extra.get(CALIB_KEY) if isinstance(extra, dict) else None
    dtype = model_dtype(model) if isinstance(model, torch.nn.Module) else None
    if not scored_on_calibration(record, inputs, dtype):
        return None
    return (
        f"scored on the {whose} own calibration inputs ({record['samples']} samples): the "
        "score may be flattered; score held-out data"
    )


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
        if option.startswith("--model") and float_digest(header) is not None:
            check_float_model([path], [header], model, option)  # same class, other weights
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
