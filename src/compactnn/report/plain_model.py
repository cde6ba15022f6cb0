"""The float model and input batch a fresh process rebuilds without unpickling anything.

:func:`float_record` describes a float model as data (its modules' trusted classes and plain
attributes, a Hugging Face architecture's header, or the MODEL the user named) plus its
tensors; :func:`rebuild_float` makes it again from that safetensors file; :func:`save_batch` /
:func:`load_batch` carry an input batch the same way (:mod:`compactnn.report.resident`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    if not _is_trusted(cls.__module__):  # a dotted path may walk out of the trusted package
        raise ValueError(f"class {name!r} is defined in {cls.__module__!r}, not a trusted package")
    return cls


def _plain_attr(cls: type, key: str) -> str:
    """``key``, if a recorded attribute may set it on an instance of ``cls``: not one of
    ``nn.Module``'s own (hooks, parameters), not a dunder, not a name of the class (its
    methods, e.g. ``forward``)."""
    if not isinstance(key, str) or key in _INTERNAL or key.startswith("__") or hasattr(cls, key):
        raise ValueError(f"attribute {key!r} of a {cls.__name__} cannot be set from a record")
    return key


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
        m.__dict__.update({_plain_attr(cls, k): from_plain(v) for k, v in node["attrs"].items()})
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
      named, as :func:`compactnn.model_io.resolve_model` takes it), then its state. The
      record keeps only ``model`` and ``weights`` (for the reader): the child rebuilds from
      the ``source`` its parent passes it (:func:`rebuild_float`), never from the file.

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
        keep = {k: source.get(k) for k in ("model", "weights")}
        return {"route": "source", "source": keep, "aliases": aliases}, tensors
    raise ValueError(
        "the float model cannot be rebuilt in a fresh process without unpickling: "
        + "; ".join(why)
        + "; pass the MODEL it came from (compactnn report --model / source=)"
    )


def rebuild_float(path: str, source: dict[str, Any] | None = None) -> nn.Module:
    """The float model :func:`~compactnn.report.resident.save_inputs` saved in ``path`` (a
    safetensors file whose metadata is a :func:`float_record`), in eval mode. Nothing of
    ``path`` is unpickled. The ``"source"`` route rebuilds the MODEL named by ``source``, the
    parent's own argument (``{"model", "weights", "trust_pickle"}``), never by the record: a
    file in the shared folder grants no trust and names no code to run; only a ``.pt`` MODEL
    the parent passed with ``trust_pickle`` is unpickled, as the parent loaded it.

    Raises:
        ValueError: an unknown route, or the ``"source"`` route without ``source``.
    """
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

        if not source or not source.get("model"):
            raise ValueError(
                f"{path!r} is rebuilt from the MODEL the user named, which the parent did not "
                "pass (source=)"
            )
        model = resolve_model(
            source["model"],
            weights=source.get("weights"),
            trust_pickle=source.get("trust_pickle") is True,
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
