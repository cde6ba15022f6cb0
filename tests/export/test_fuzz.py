"""Seeded mutations of a saved artifact: every outcome is a bit-exact load or an ArtifactError.

Four kinds of mutation, ``COMPACTNN_FUZZ_CASES`` cases each (40 by default; ``make fuzz``
runs 600):

* ``bytes``: random byte edits, truncations and extensions of each file;
* ``header``: a header field changed, deleted, retyped or added, nested specs included;
* ``header_rehashed``: the same, or a recipe edit, with every hash and the digest recomputed,
  so the edit reaches validation (it may load, but only through the format's rules);
* ``tensors``: tensor values, dtypes, shapes and keys edited, every hash recomputed.

Never another exception type, never a hang; ``bytes`` and ``header`` edits never load with
other outputs. A loaded ``tensors`` or ``header_rehashed`` edit must still hold legal grids
(scales finite and > 0, zero points and codes on their grid).
"""

import hashlib
import json
import os
import random
import shutil
import signal
from collections import Counter

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

import compactnn
from compactnn.core.qlayers import is_quant_layer
from compactnn.errors import CompactnnError
from compactnn.export.validate import header_digest

CASES = int(os.environ.get("COMPACTNN_FUZZ_CASES", "40"))
TIME_LIMIT_S = 10


def skeleton():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A w4a8 CNN: int8 first/last convs, a pruned uint4 asymmetric middle conv (stored
    sparse), activation quantization everywhere."""
    model = skeleton()
    with torch.no_grad():
        w = model[2].weight
        w.mul_((torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.1).float())
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    q = compactnn.compress(model, "w4a8", calib_data=x, progress=False)
    root = tmp_path_factory.mktemp("fuzz") / "base"
    compactnn.save(q, root)
    header = json.loads((root / "compactnn.json").read_text())
    assert header["layers"]["2"]["format"] == "uint4-asym-channel"
    assert "2.weight.packed" in header["sparse"]  # the pruned layer is stored sparse
    files = {p.name: p.read_bytes() for p in root.iterdir()}
    with torch.no_grad():
        y = q(x)
    return files, x, y


class Hang(BaseException):
    pass


def _alarm(*_):
    raise Hang


def attempt(path, x, y):
    """``(outcome, detail)``: refused, bit-exact, different, traceback or hang."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    try:
        model = compactnn.load(path, model=skeleton())
        with torch.no_grad():
            out = model(x)
    except Hang:
        return "hang", ""
    except CompactnnError as exc:
        return "refused", str(exc)
    except Exception as exc:
        return "traceback", f"{type(exc).__name__}: {exc}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if torch.equal(out, y):
        return "bit-exact", ""
    assert_legal_grids(model)
    return "different", ""


def assert_legal_grids(model):
    for name, m in model.named_modules():
        if not is_quant_layer(m):
            continue
        qt = m.weight_spec.qtype
        assert torch.isfinite(m.weight_scale).all() and (m.weight_scale > 0).all(), name
        assert qt.qmin <= m.weight_zero.min() and m.weight_zero.max() <= qt.qmax, name
        assert qt.qmin <= m.weight_codes.min() and m.weight_codes.max() <= qt.qmax, name
        aq = m.input_quantizer
        if aq is not None:
            assert torch.isfinite(aq.scale) and aq.scale > 0, name
            assert aq.qtype.qmin <= aq.zero <= aq.qtype.qmax, name


def write(root, files):
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)


def rehash(files):
    """Recompute every file hash and the digest, so an edit reaches validation."""
    header = json.loads(files["compactnn.json"])
    if isinstance(header.get("files"), dict):
        for f in header["files"].values():
            if isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"] in files:
                data = files[f["name"]]
                f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    header["digest"] = header_digest(header)
    files["compactnn.json"] = json.dumps(header).encode()


def mutate_bytes(rng, files):
    name = rng.choice(sorted(files))
    data = bytearray(files[name])
    op = rng.choice(["flip", "flip", "truncate", "extend"])
    if op == "flip":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] = (data[i] + rng.randint(1, 255)) % 256
    elif op == "truncate":
        del data[rng.randrange(len(data)) :]
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    files[name] = bytes(data)
    return f"{op} {name}"


def random_value(rng):
    return rng.choice(
        [0, 1, -1, 2, 255, 2**40, True, False, None, "", "x", "zeros", 1.5, -0.0, 1e308, [], {},
         [1, 2], {"a": 1}, [1048576, 512], "Conv2d", "int8-sym-channel"]
    )  # fmt: skip


def _nodes(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nodes(v, (*path, i))


def mutate_header(rng, files):
    header = json.loads(files["compactnn.json"])
    path = rng.choice(list(_nodes(header))[1:])
    parent = header
    for k in path[:-1]:
        parent = parent[k]
    key, value = path[-1], parent[path[-1]]
    op = rng.choice(["set", "set", "delete", "retype", "add"])
    if op == "set":
        parent[key] = random_value(rng)
    elif op == "delete":
        del parent[key]
    elif op == "retype":
        parent[key] = rng.choice([str(value), [value], {"v": value}, bool(value), None])
    elif isinstance(value, dict):
        value["unknown_field"] = random_value(rng)
    else:
        parent[key] = {"unknown_field": value}
    files["compactnn.json"] = json.dumps(header).encode()
    return f"{op} {list(path)}"


def mutate_recipe(rng, files):
    text = files["recipe.yaml"]
    files["recipe.yaml"] = new = rng.choice(
        [b"\xff\xfe\x00bad", b"[]", b"{}", b"name: other\nsteps: []\n", b"- - - -", b"a: [",
         text.replace(b"8", b"2"), text.replace(b"rtn", b"nope"), text[: len(text) // 2]]
    )  # fmt: skip
    return f"recipe {new[:20]!r}"


def mutate_tensors(rng, files):
    tensors = load_bytes(files["model.safetensors"])
    key = rng.choice(sorted(tensors))
    t = tensors[key]
    op = rng.choice(["value", "value", "value", "dtype", "shape", "delete", "add", "rename"])
    if op == "value" and t.numel():
        flat = t.reshape(-1).clone()
        i = rng.randrange(flat.numel())
        if t.is_floating_point():
            flat[i] = rng.choice([float("nan"), float("inf"), 0.0, -1.0, 1e4, 2.0, -0.0])
        else:
            flat[i] = rng.randrange(256) if t.dtype == torch.uint8 else rng.randrange(-128, 128)
        tensors[key] = flat.reshape(t.shape)
    elif op == "dtype":
        tensors[key] = t.to(rng.choice([torch.float32, torch.float16, torch.int8, torch.uint8]))
    elif op == "shape":
        tensors[key] = rng.choice([t.reshape(-1)[:-1], torch.cat([t.reshape(-1)] * 2), t[None]])
    elif op == "delete":
        del tensors[key]
    elif op == "add":
        tensors[key + ".extra"] = t.clone()
    else:
        tensors[key + "_"] = tensors.pop(key)
    files["model.safetensors"] = save_bytes(
        {k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}
    )
    rehash(files)
    return f"{op} {key}"


def mutate_header_rehashed(rng, files):
    what = mutate_recipe(rng, files) if rng.random() < 0.25 else mutate_header(rng, files)
    rehash(files)
    return what


MUTATIONS = {
    "bytes": (mutate_bytes, 11),
    "header": (mutate_header, 12),
    "header_rehashed": (mutate_header_rehashed, 13),
    "tensors": (mutate_tensors, 14),
}


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_every_mutation_is_refused_or_loads_legally(saved, tmp_path, kind):
    files, x, y = saved
    mutate, seed = MUTATIONS[kind]
    rng = random.Random(seed)
    outcomes, examples = Counter(), {}
    for case in range(CASES):
        mutated = dict(files)
        what = mutate(rng, mutated)
        write(tmp_path / "a", mutated)
        outcome, detail = attempt(tmp_path / "a", x, y)
        outcomes[outcome] += 1
        examples.setdefault(outcome, f"case {case} ({what}): {detail[:300]}")
    print(f"\nfuzz {kind} ({CASES} cases): {dict(sorted(outcomes.items()))}")
    assert outcomes["traceback"] == 0, examples["traceback"]
    assert outcomes["hang"] == 0, examples["hang"]
    if kind in ("bytes", "header"):
        assert outcomes["different"] == 0
    assert outcomes["refused"] > 0  # the mutations do reach the checks


def test_unmutated_artifact_loads_bit_exact(saved, tmp_path):
    files, x, y = saved
    write(tmp_path / "a", files)
    rehashed = dict(files)
    rehash(rehashed)  # recomputing unchanged hashes changes nothing
    assert attempt(tmp_path / "a", x, y) == ("bit-exact", "")
    write(tmp_path / "b", rehashed)
    assert attempt(tmp_path / "b", x, y) == ("bit-exact", "")
