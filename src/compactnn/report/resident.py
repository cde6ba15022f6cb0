"""Resident memory of each report row's delivered model, measured in a fresh process.

A row's memory is that of the form its latency column times: the float row on the float
path that won (fp32 eager, bf16 autocast, ONNX Runtime fp32, ...), a deployed CNN as
``compactnn.deploy(load(artifact), backend=<the row's backend>)``, a transformer as
``load(artifact, kernels=True)`` (what ``to_kernels`` gives), a plain float (e.g.
channel-pruned) model on its float path, a simulated row as the simulated model. Each is
built from the saved artifact by a builder of this module in a child process
(:func:`compactnn.measure.memory.resident_memory`): :func:`setup` loads the input batch and the
float skeleton first, and :data:`PRELOAD` imports the heavy libraries for every row alike, so
neither counts as the model's. Nothing a child reads is unpickled: the batch and the float
model's tensors are safetensors files, and the float model is rebuilt by a trusted
constructor its record names (:func:`float_record`: classes of ``torch.nn`` / ``compactnn``,
an allow-listed Hugging Face architecture, or the MODEL the user named).

Example:
    >>> how = memory_job("cnn", "w8a8", "oneDNN int8", deployed, "ort-fp32")  # doctest: +SKIP
    >>> how                                                                    # doctest: +SKIP
    ('deploy', 'onednn')
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import call_model
from compactnn.errors import first_line
from compactnn.measure import memory
from compactnn.measure.float_paths import BF16, COMPILE, EAGER, ORT, ORT_FUSED
from compactnn.report.delivery import FLOAT_PATH_NAMES, PROBE_PRUNED, SIMULATED

HERE = "compactnn.report.resident"
# imported in every child before its first reading, for every row alike, so that libraries
# are not counted as the model's memory: deploy pulls in torch._dynamo (~1,600 modules:
# sympy, scipy...), the ONNX Runtime backend the ONNX exporter, transformer rows transformers
PRELOAD = (
    "onnx",
    "onnxruntime",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "torch._dynamo",
    "torch.export",
    "compactnn",
    "compactnn.export.artifact",
    "compactnn.export.onnx",
    "compactnn.export.ort",
    "compactnn.deployment",
    "compactnn.kernels.swap",
    "compactnn.measure.float_paths",
)


def installed_preload() -> tuple[str, ...]:
    """:data:`PRELOAD` without the modules whose package is not installed (optional extras)."""
    import importlib.util

    return tuple(m for m in PRELOAD if importlib.util.find_spec(m.split(".")[0]) is not None)


DELIVERIES = ("float", "deploy", "kernels", "float-path", "as-is")
WORKERS = 2  # children measured at once (memory is per process; the timings are over)


def memory_job(
    kind: str, recipe: str, runtime: str, delivered: Any, float_path: str
) -> tuple[str, str | None]:
    """How a row's delivered model is rebuilt for the measurement: ``(delivery, detail)``.

    ``("float", path)``: the float model on float path ``path`` (the float row);
    ``("deploy", backend)``; ``("kernels", None)``; ``("float-path", path)``: a plain float
    compressed model on its float path; ``("as-is", None)``: simulated or probe-pruned.

    Example:
        >>> memory_job("cnn", "w2a4", "simulated", None, "ort-fp32")
        ('as-is', None)
        >>> memory_job("cnn", "ch50", "ONNX Runtime fp32", None, "fp32-eager")
        ('float-path', 'ort-fp32')
    """
    if recipe == "float":
        return "float", float_path
    if runtime in (SIMULATED, PROBE_PRUNED):
        return "as-is", None
    if getattr(delivered, "is_deployed", False):
        return "deploy", delivered.backend
    if kind == "transformer" or hasattr(delivered, "_compactnn_kernels"):
        return "kernels", None
    path = {name: key for key, name in FLOAT_PATH_NAMES.items()}.get(runtime)
    if path is None:
        raise ValueError(f"no builder for a row that runs on {runtime!r}")
    return "float-path", path


def float_form(model: nn.Module, path: str, example: Any, threads: int | None) -> nn.Module:
    """``model`` on the float path named ``path`` (``"fp32-eager"``, ``"ort-fp32"``, ...),
    built as :func:`compactnn.measure.float_paths.float_contenders` builds it."""
    from compactnn.measure.float_paths import Bf16Autocast, compiled, ort_float

    model = model.eval()
    if path == EAGER:
        return model
    if path == BF16:
        return Bf16Autocast(model)
    if path in (ORT, ORT_FUSED):
        return ort_float(model, example, threads, fused=path == ORT_FUSED)
    if path == COMPILE:
        return compiled(model, example)
    raise ValueError(f"unknown float path {path!r}")


# A child never unpickles: the float model travels as a safetensors file of its tensors whose
# metadata names a trusted constructor (``RECORD``), the batch as a safetensors file.
RECORD, BATCH = "compactnn.rebuild", "compactnn.batch"
TRUSTED = ("torch.nn", "compactnn")  # packages whose nn.Module classes a record may name
_INTERNAL = frozenset(vars(nn.Module()))  # what nn.Module.__init__ sets up itself


def _is_trusted(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in TRUSTED)


def trusted_class(name: str) -> type:
    """The ``nn.Module`` class ``"module:Qualname"`` names, only from :data:`TRUSTED`.

    Raises:
        ValueError: another package, or not an ``nn.Module`` subclass.
    """
    import importlib

    module, _, qualname = name.partition(":")
    if not _is_trusted(module):
        raise ValueError(f"class {name!r} is not from {' or '.join(TRUSTED)}")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{name!r} is not an nn.Module class")
    return cls


def to_plain(value: Any, where: str) -> Any:
    """``value`` as JSON data: None, bool, int, float, str, and lists, tuples, str-keyed dicts
    and torch dtypes of them (tagged so that :func:`from_plain` gives them back).

    Example:
        >>> to_plain((3, [1, "same"], torch.float16), "m.x")
        {'tuple': [3, [1, 'same'], {'dtype': 'float16'}]}
    """
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [to_plain(v, where) for v in value]
    if type(value) in (tuple, torch.Size):
        return {"tuple": [to_plain(v, where) for v in value]}
    if type(value) is dict and all(type(k) is str for k in value):
        return {"dict": {k: to_plain(v, where) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    raise ValueError(f"{where} holds a {type(value).__name__}, which is not plain data")


def from_plain(data: Any) -> Any:
    """The value :func:`to_plain` wrote (a ``torch.Size`` comes back as a tuple)."""
    if isinstance(data, list):
        return [from_plain(v) for v in data]
    if not isinstance(data, dict):
        return data
    ((tag, inner),) = data.items()
    if tag == "tuple":
        return tuple(from_plain(v) for v in inner)
    if tag == "dict":
        return {k: from_plain(v) for k, v in inner.items()}
    if tag == "dtype" and isinstance(getattr(torch, inner, None), torch.dtype):
        return getattr(torch, inner)
    raise ValueError(f"not a plain value: {data!r:.80}")


def _alone(t: torch.Tensor, storages: set[int]) -> torch.Tensor:
    """``t`` detached, copied only when safetensors could not write it as it is: not
    contiguous, not filling its storage, or on a storage (in ``storages``, updated) that an
    earlier tensor was written from."""
    t, storage = t.detach(), t.untyped_storage()
    whole = t.is_contiguous() and storage.nbytes() == t.numel() * t.element_size()
    if whole and storage.data_ptr() not in storages:
        storages.add(storage.data_ptr())
        return t
    return t.clone().contiguous()


def _write(path: Path, tensors: dict[str, torch.Tensor], key: str, record: Any) -> None:
    """``tensors`` to the safetensors file ``path`` (atomically), ``record`` as JSON in its
    metadata under ``key``."""
    import json

    from safetensors.torch import save_file

    from compactnn.export.fs import atomic_write

    meta = {key: json.dumps(record)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def module_tree(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(record, tensors)``: every module of ``model`` as data (class, plain attributes,
    parameter / buffer keys into ``tensors``, children), shared tensors and modules once.

    Raises:
        ValueError: a class outside :data:`TRUSTED`, a hook, a non-plain attribute or a
            tensor that is not a CPU tensor or parameter (the reason names the module).
    """
    nodes: list[dict[str, Any]] = []
    seen: dict[int, int] = {}
    keys: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def key(t: torch.Tensor, where: str) -> str:
        if type(t) not in (torch.Tensor, nn.Parameter) or t.device.type != "cpu":
            raise ValueError(f"{where} is a {type(t).__name__} on {t.device}")
        if id(t) not in keys:
            keys[id(t)] = str(len(keys))
            tensors[keys[id(t)]] = _alone(t, storages)
        return keys[id(t)]

    def visit(m: nn.Module, where: str) -> int:
        if id(m) in seen:
            return seen[id(m)]
        cls = type(m)
        name = f"{cls.__module__}:{cls.__qualname__}"
        if not _is_trusted(cls.__module__) or "<" in cls.__qualname__:
            raise ValueError(f"{where} is a {name}, not a class of {' or '.join(TRUSTED)}")
        if any(v for k, v in vars(m).items() if "hook" in k and k in _INTERNAL):
            raise ValueError(f"{where} ({name}) has hooks")
        seen[id(m)] = len(nodes)
        node: dict[str, Any] = {"class": name, "training": m.training}
        nodes.append(node)
        attrs = {k: v for k, v in vars(m).items() if k not in _INTERNAL}
        node["attrs"] = {k: to_plain(v, f"{where}.{k}") for k, v in attrs.items()}
        node["params"] = {
            n: None if p is None else [key(p, f"{where}.{n}"), p.requires_grad]
            for n, p in m._parameters.items()
        }
        node["buffers"] = {
            n: None if b is None else key(b, f"{where}.{n}") for n, b in m._buffers.items()
        }
        node["volatile"] = sorted(m._non_persistent_buffers_set)
        node["children"] = {
            n: None if c is None else visit(c, f"{where}.{n}") for n, c in m._modules.items()
        }
        return seen[id(m)]

    visit(model, type(model).__name__)
    return {"route": "modules", "nodes": nodes}, tensors


def modules_from(record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The model :func:`module_tree` recorded: each module made by its trusted class's
    ``__new__`` and ``nn.Module.__init__`` (no code of the record runs), its attributes,
    tensors and children set as recorded."""
    nodes, built, params = record["nodes"], {}, {}

    def make(i: int) -> nn.Module:
        if i in built:
            return built[i]
        node = nodes[i]
        cls = trusted_class(node["class"])
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        built[i] = m
        m.__dict__.update({k: from_plain(v) for k, v in node["attrs"].items()})
        m.training = bool(node["training"])
        for name, entry in node["params"].items():
            if entry is not None and entry[0] not in params:
                params[entry[0]] = nn.Parameter(tensors[entry[0]], requires_grad=entry[1])
            m._parameters[name] = None if entry is None else params[entry[0]]
        for name, k in node["buffers"].items():
            m._buffers[name] = None if k is None else tensors[k]
        m._non_persistent_buffers_set.update(node["volatile"])
        for name, j in node["children"].items():
            m._modules[name] = None if j is None else make(j)
        return m

    return make(0)


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``model``'s state dict as distinct tensors and ``{alias: key}`` for tied ones."""
    tensors, aliases, first, storages = {}, {}, {}, set()
    for name, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())
        if ident in first and t.numel():
            aliases[name] = first[ident]
            continue
        first[ident] = name
        tensors[name] = _alone(t, storages)
    return tensors, aliases


def float_record(
    model: nn.Module, source: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(record, tensors)`` from which :func:`rebuild_float` makes ``model`` again in another
    process without unpickling anything, by the first route that fits:

    * ``"modules"``: every module's class is in :data:`TRUSTED` (:func:`module_tree`);
    * ``"hf"``: a Hugging Face architecture ``compactnn.load`` rebuilds from a header, then
      its state;
    * ``"source"``: ``source`` (``{"model", "weights", "trust_pickle"}``: the MODEL the user
      named, as :func:`compactnn.model_io.resolve_model` takes it), then its state.

    Raises:
        ValueError: no route fits (why, per route).
    """
    from compactnn.export.hf import HF_ARCHITECTURES, hf_header

    try:
        return module_tree(model)
    except ValueError as exc:
        why = [str(exc)]
    hf = hf_header(model)
    if hf is not None and hf["class"] in HF_ARCHITECTURES:
        tensors, aliases = _state(model)
        return {"route": "hf", "hf": hf, "aliases": aliases}, tensors
    why.append(f"not a Hugging Face architecture compactnn rebuilds ({type(model).__name__})")
    if source and source.get("model"):
        tensors, aliases = _state(model)
        keep = {k: source.get(k) for k in ("model", "weights", "trust_pickle")}
        return {"route": "source", "source": keep, "aliases": aliases}, tensors
    raise ValueError(
        "the float model cannot be rebuilt in a fresh process without unpickling: "
        + "; ".join(why)
        + "; pass the MODEL it came from (compactnn report --model / source=)"
    )


def rebuild_float(path: str) -> nn.Module:
    """The float model :func:`save_inputs` saved in ``path`` (a safetensors file whose
    metadata is a :func:`float_record`), in eval mode. Nothing of ``path`` is unpickled; only
    a ``.pt`` MODEL the user named with ``trust_pickle`` is, as the parent loaded it."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        record = json.loads((f.metadata() or {})[RECORD])
    tensors = load_file(path)
    if record["route"] == "modules":
        return modules_from(record, tensors).eval()
    if record["route"] == "hf":
        from compactnn.export.hf import skeleton_from_header

        header = {"extra": {"hf": record["hf"]}}
        model = skeleton_from_header(Path(path).parent, header)
    elif record["route"] == "source":
        from compactnn.model_io import resolve_model

        model = resolve_model(
            record["source"]["model"],
            weights=record["source"].get("weights"),
            trust_pickle=bool(record["source"].get("trust_pickle")),
        ).model
    else:
        raise ValueError(f"unknown rebuild route {record['route']!r} in {path!r}")
    tensors.update({alias: tensors[k] for alias, k in record["aliases"].items()})
    model.load_state_dict(tensors, strict=True)
    del tensors
    return model.eval()


def save_batch(path: Path, batch: Any) -> None:
    """Write ``batch`` (a tensor, or a tuple, list or str-keyed dict of tensors) to the
    safetensors file ``path``, its form in the metadata (:func:`load_batch`)."""
    if isinstance(batch, torch.Tensor):
        form, items = "tensor", {"0": batch}
    elif isinstance(batch, (tuple, list)):
        form, items = type(batch).__name__, {str(i): t for i, t in enumerate(batch)}
    elif isinstance(batch, dict) and all(isinstance(k, str) for k in batch):
        form, items = "dict", dict(batch)
    else:
        raise ValueError(f"an input batch of {type(batch).__name__} cannot be saved as tensors")
    if bad := [k for k, t in items.items() if not isinstance(t, torch.Tensor)]:
        raise ValueError(f"input batch entry {bad[0]!r} is not a tensor")
    tensors = {k: t.detach().cpu().clone().contiguous() for k, t in items.items()}
    _write(path, tensors, BATCH, {"form": form, "keys": list(items)})


def load_batch(path: str) -> Any:
    """The batch :func:`save_batch` wrote, in its form."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = json.loads((f.metadata() or {})[BATCH])
    tensors = load_file(path)
    items = [tensors[k] for k in meta["keys"]]
    if meta["form"] == "tensor":
        return items[0]
    if meta["form"] == "dict":
        return dict(zip(meta["keys"], items, strict=True))
    return tuple(items) if meta["form"] == "tuple" else items


def setup(batch_path: str, skeleton_path: str | None = None) -> dict[str, Any]:
    """What a builder needs that is not the model, loaded before the first reading: the
    input batch and the float skeleton (:func:`rebuild_float`), both from safetensors."""
    context = {"batch": load_batch(batch_path)}
    if skeleton_path is not None:
        context["skeleton"] = rebuild_float(skeleton_path)
    return context


def build(
    context: dict[str, Any], artifact: str, delivery: str, detail: str | None, threads: int
) -> Any:
    """A row's delivered model, rebuilt from its saved ``artifact`` as :func:`memory_job`
    says, as a zero-argument call of it on the batch returning its output (a
    ``resident_memory`` builder).

    ``"float"``: ``artifact`` is the float model :func:`save_inputs` saved (not a skeleton:
    it is the model measured); the others load the compactnn artifact into the skeleton.
    """
    import compactnn

    batch = context["batch"]
    if delivery == "float":
        model = rebuild_float(artifact)
        return partial(call_model, float_form(model, detail, batch, threads), batch)
    if delivery == "kernels":
        fast = compactnn.load(artifact, context.get("skeleton"), kernels=True)
        return partial(call_model, fast, batch)
    qmodel = compactnn.load(artifact, model=context["skeleton"])
    if delivery == "deploy":
        fast = compactnn.deploy(qmodel, backend=detail, example=batch, time_float=False)
    elif delivery == "float-path":
        fast = float_form(qmodel, detail, batch, threads)
    elif delivery == "as-is":
        fast = qmodel
    else:
        raise ValueError(f"unknown delivery {delivery!r}; one of {DELIVERIES}")
    del qmodel  # only what the delivered model keeps counts
    return partial(call_model, fast, batch)


def save_inputs(
    folder: Path, model: nn.Module, batch: Any, source: dict[str, Any] | None = None
) -> tuple[str, str]:
    """Save the float ``model`` (skeleton and float row: its tensors and a
    :func:`float_record`) and ``batch`` as safetensors files in ``folder``; returns their
    paths. ``source``: the MODEL the user named, for a model of other classes.

    Raises:
        ValueError: the model cannot be rebuilt without unpickling, or ``batch`` holds
            something other than tensors.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model_path, batch_path = folder / "float.safetensors", folder / "batch.safetensors"
    record, tensors = float_record(model, source)
    _write(model_path, tensors, RECORD, record)
    save_batch(batch_path, batch)
    return str(model_path), str(batch_path)


def job(artifact: str, delivery: str, detail: str | None, inputs: tuple) -> dict[str, Any]:
    """The child's arguments: ``artifact`` (the saved float model for ``"float"``), how it is
    delivered (:func:`memory_job`) and the ``inputs`` :func:`save_inputs` saved."""
    model_path, batch_path = inputs
    floating = delivery == "float"
    return {
        "artifact": model_path if floating else artifact,
        "delivery": delivery,
        "detail": detail,
        "batch": batch_path,
        "skeleton": None if floating else model_path,
    }


def row_job(
    row: dict[str, Any], kind: str, delivered: Any, float_path: str, out: Path, inputs: tuple
) -> dict[str, Any]:
    """The child's arguments for ``row`` (a demo row: ``recipe``, ``runtime``, ``artifact``
    relative to ``out``): :func:`job` with the row's delivery (:func:`memory_job`)."""
    delivery, detail = memory_job(kind, row["recipe"], row["runtime"], delivered, float_path)
    return job(str(out / row["artifact"]), delivery, detail, inputs)


def measure_job(job: dict[str, Any], threads: int) -> tuple[dict[str, int], str | None]:
    """Measure one row's job (:func:`row_job`) in a fresh process; returns ``(fields,
    note)``: the fields for the row (``resident_bytes``: RSS added; ``resident_anon_bytes``:
    its anonymous part), or ``({}, note)`` saying why it was not measured."""
    try:
        mem = memory.resident_memory(
            f"{HERE}:build",
            [job["artifact"], job["delivery"], job["detail"], threads],
            preload=installed_preload(),
            threads=threads,
            setup=f"{HERE}:setup",
            setup_args=[job["batch"], job["skeleton"]],
        )
    except Exception as exc:  # a failed measurement is a note, never a failed report
        return {}, f"resident memory not measured: {type(exc).__name__}: {first_line(exc, 300)}"
    return {"resident_bytes": mem.added, "resident_anon_bytes": mem.anon_added}, None


def measure_rows(pairs: list[tuple[dict[str, Any], dict[str, Any]]], threads: int) -> None:
    """Fill ``resident_bytes`` / ``resident_anon_bytes`` of each ``(row, job)``,
    :data:`WORKERS` children at a time; a failed measurement becomes a note on its row."""
    with ThreadPoolExecutor(WORKERS) as pool:
        done = list(pool.map(lambda pair: measure_job(pair[1], threads), pairs))
    for (row, _), (fields, note) in zip(pairs, done, strict=True):
        row.update(fields)
        if note:
            row["notes"].append(note)


def temporary_folder() -> tempfile.TemporaryDirectory:
    """A private folder for the float models and batches (safetensors) the children read."""
    return tempfile.TemporaryDirectory(prefix="compactnn-resident-")
