"""Benchmark: hand-off exports (``compactnn export``) checked against the simulation.

GGUF rows: ``tiny-lm`` (quick: a tiny random Llama, ``models/tiny_hf.py``) compressed with
``w4-g32-gptq``, its symmetric variant ``w4-g32-gptq-sym`` (a YAML recipe: Q4_0) and
``w8``, written with :func:`compactnn.export.gguf.write_gguf` and read back
with ``gguf.GGUFReader``:

* **exact**: every tensor dequantized by ``gguf.quants.dequantize`` bit-identical to
  compactnn's dequantized weight (q/k rows permuted alike);
* **size**: the file against the theoretical size (each tensor's elements at its type's bits
  per weight; the file adds the header, the tokenizer and alignment), target within 3%;
* **perplexity**: compactnn's simulated model; the same model with the float weights read
  back from the GGUF file (un-permuted; must be identical); :func:`gguf_forward`, a float
  forward pass computed from the GGUF file alone with llama.cpp's conventions (metadata,
  pairwise rotary embedding); and, when ``llama_cpp``
  (``llama-cpp-python``) imports, the model as llama.cpp runs it, target within 0.5%.

Rows are :class:`ExportRow` in :data:`rows`-style lists: other formats append their own.

Run: ``OMP_WAIT_POLICY=PASSIVE python -m compactnn.bench.export [--quick]``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.export import gguf_blocks as gb
from compactnn.export.gguf import write_gguf

RECIPES = ("w4-g32-gptq", "w4-g32-gptq-sym", "w8")
COMMAND = "python -m compactnn.bench.export"


@dataclasses.dataclass
class ExportRow:
    """One (model, recipe, format) export and its checks; ``None`` is "not measured"."""

    model: str
    recipe: str
    format: str
    types: str = ""
    exact: bool | None = None
    file_bytes: int | None = None
    theoretical_bytes: int | None = None
    ppl_sim: float | None = None
    ppl_file: float | None = None
    ppl_reference: float | None = None
    ppl_runtime: float | None = None
    seconds: float | None = None
    note: str = ""

    @property
    def size_ratio(self) -> float | None:
        if not self.file_bytes or not self.theoretical_bytes:
            return None
        return self.file_bytes / self.theoretical_bytes


def recipe_for(name: str):
    """A short name, or ``w4-g32-gptq-sym``: ``w4-g32-gptq`` with a symmetric grid (Q4_0)."""
    from compactnn.recipe import Recipe, resolve_recipe

    if not name.endswith("-sym"):
        return resolve_recipe(name)
    text = resolve_recipe(name[: -len("-sym")]).to_yaml()
    text = text.replace("symmetric: false", "symmetric: true")
    return Recipe.from_yaml(text.replace(f"name: {name[:-4]}", f"name: {name}", 1))


def _subject(quick: bool):
    """``(name, float model, calibration batches, eval batches, tokenizer)``."""
    if quick:
        from compactnn.models.tiny_hf import tiny_model

        model, calib = tiny_model("llama")
        gen = torch.Generator().manual_seed(7)
        evals = [{"input_ids": torch.randint(4, 128, (4, 32), generator=gen)} for _ in range(2)]
        return "tiny random Llama", model, calib, evals, None
    from compactnn.models.tiny_lm import build_tiny_lm, eval_batches, load_tokenizer

    ref = build_tiny_lm(progress=False, n_eval=16)
    return "tiny-lm", ref.model, ref.calib, eval_batches(n_windows=16), load_tokenizer()


def _float_from_gguf(path: Path, qmodel: torch.nn.Module) -> torch.nn.Module:
    """A float ``LlamaForCausalLM`` whose weights are the GGUF file's, dequantized."""
    import gguf

    from compactnn.export.gguf import plan

    names = {t.name: (t.source, t.shape) for t in plan(qmodel)}
    cfg = qmodel.config
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    model = type(qmodel)(cfg).eval()  # same class, float layers
    state = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        short = t.name.split(".")[-2]
        if short in heads:  # undo the rotary permutation: invert it on the row index
            perm = gb.rope_permute(torch.arange(w.shape[0]), heads[short])
            w = w[torch.argsort(perm)]
        source, shape = names[t.name]
        key = source if source.endswith(".bias") else source + ".weight"
        state[key] = w.reshape(shape if len(shape) > 1 else -1)
    model.load_state_dict(state, strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def _field(reader, key: str):
    f = reader.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types and f.types[0].name == "STRING" else v[0].item()


def gguf_forward(path: str | Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``(T, vocab)`` of token ids ``(T,)`` computed from the GGUF file alone, the way
    llama.cpp's ``llama`` and ``qwen2`` graphs do in float: hyper-parameters from the metadata
    (keys prefixed with ``general.architecture``), q/k/v biases where the file has them, rotary
    embedding on adjacent pairs (``llama``) or on the two halves of each head (``qwen2``, NEOX),
    grouped-query attention, RMS norm, SwiGLU. An independent check of the metadata and the
    q/k layout where llama.cpp itself is not installed.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    w = {
        t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        for t in reader.tensors
    }
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise CompactnnError(
            f"gguf_forward computes the llama and qwen2 architectures; {path} is {arch!r}."
        )
    layers, heads = (
        _field(reader, f"{arch}.block_count"),
        _field(reader, f"{arch}.attention.head_count"),
    )
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv")
    eps = _field(reader, f"{arch}.attention.layer_norm_rms_epsilon")
    base, dim = (
        _field(reader, f"{arch}.rope.freq_base"),
        _field(reader, f"{arch}.rope.dimension_count"),
    )

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    t = ids.shape[0]
    ang = torch.arange(t)[:, None] * base ** (-torch.arange(0, dim, 2) / dim)  # (T, D/2)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(x: torch.Tensor) -> torch.Tensor:  # (T, H, D): rotate pairs (a_i, b_i) by ang_i
        if arch == "llama":  # adjacent pairs (2i, 2i+1)
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
        a, b = x[..., : dim // 2], x[..., dim // 2 :]  # NEOX: pairs (i, i + D/2)
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    def proj(h: torch.Tensor, name: str) -> torch.Tensor:  # h @ W^T (+ bias where written)
        out = h @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    x = w["token_embd.weight"][ids]  # (T, C)
    causal = torch.full((t, t), float("-inf")).triu(1)
    for i in range(layers):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = rope(proj(h, p + "attn_q").reshape(t, heads, dim))
        k = rope(proj(h, p + "attn_k").reshape(t, kv_heads, dim))
        v = proj(h, p + "attn_v").reshape(t, kv_heads, dim)
        k, v = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (k, v))
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(dim) + causal
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(t, heads * dim)
        x = x + proj(o, p + "attn_output")
        h = norm(x, w[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(h @ w[p + "ffn_gate.weight"].T)
        x = x + (gate * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return norm(x, w["output_norm.weight"]) @ head.T


def gguf_forward_perplexity(path: Path, evals: list[dict]) -> float:
    """Perplexity of :func:`gguf_forward` on the batches' token windows."""
    total, count = 0.0, 0
    for batch in evals:
        for ids in batch["input_ids"]:
            logp = torch.log_softmax(gguf_forward(path, ids)[:-1].double(), -1)
            total -= float(logp.gather(1, ids[1:].unsqueeze(1)).sum())
            count += len(ids) - 1
    return math.exp(total / count)


def _llama_cpp_perplexity(path: Path, evals: list[dict]) -> float:
    """Perplexity of the GGUF file as llama.cpp runs it (token ids in, all logits out)."""
    from llama_cpp import Llama

    n_ctx = max(int(b["input_ids"].shape[1]) for b in evals)
    llm = Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1)
    total, count = 0.0, 0
    for batch in evals:
        for ids in batch["input_ids"].tolist():
            llm.reset()
            llm.eval(ids)
            logits = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64)
            logp = torch.log_softmax(logits[:-1], -1)
            total -= float(logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum())
            count += len(ids) - 1
    return math.exp(total / count)


def gguf_rows(quick: bool = False) -> list[ExportRow]:
    """The GGUF measurements (see the module docstring)."""
    from compactnn.models.tiny_lm import perplexity

    name, model, calib, evals, tokenizer = _subject(quick)
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in RECIPES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qmodel = compactnn.compress(
                    model, recipe_for(recipe), calib_data=calib, progress=False
                )
            t0 = time.perf_counter()
            report = write_gguf(qmodel, Path(tmp) / f"{recipe}.gguf", tokenizer=tokenizer)
            row = ExportRow(
                name,
                recipe,
                "gguf",
                ", ".join(f"{k} x{v}" for k, v in sorted(report.types.items())),
                report.exact,
                report.file_bytes,
                report.tensor_bytes,
                seconds=time.perf_counter() - t0,
            )
            with torch.no_grad():
                row.ppl_sim = perplexity(qmodel, evals)
                row.ppl_file = perplexity(_float_from_gguf(report.path, qmodel), evals)
                row.ppl_reference = gguf_forward_perplexity(report.path, evals)
                if has_llama_cpp:
                    row.ppl_runtime = _llama_cpp_perplexity(report.path, evals)
            if not has_llama_cpp:
                row.note = "llama_cpp not importable: llama.cpp perplexity not measured"
            rows.append(row)
    return rows


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _ppl(x: float | None, sim: float | None) -> str:
    if x is None or sim is None:
        return _fmt(x)
    return _fmt(x) + (" (identical)" if x == sim else f" ({100 * (x / sim - 1):+.4f}%)")


def table(rows: list[ExportRow]) -> str:
    """The rows as a Markdown table."""
    out = [
        "| model | recipe | format | types | read-back exact | file / theoretical bytes "
        "| ppl sim | ppl from file | ppl GGUF reference forward | ppl runtime (Δ%) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r.size_ratio
        size = "n/a" if ratio is None else (
            f"{r.file_bytes:,} / {r.theoretical_bytes:,} ({100 * (ratio - 1):+.2f}%)"
        )  # fmt: skip
        rt = _fmt(r.ppl_runtime)
        if r.ppl_runtime is not None and r.ppl_sim:
            rt += f" ({100 * (r.ppl_runtime / r.ppl_sim - 1):+.2f}%)"
        exact = "n/a" if r.exact is None else ("yes" if r.exact else "NO")
        out.append(
            f"| {r.model} | {r.recipe} | {r.format} | {r.types} | {exact} | {size} | "
            f"{_fmt(r.ppl_sim)} | {_ppl(r.ppl_file, r.ppl_sim)} | "
            f"{_ppl(r.ppl_reference, r.ppl_sim)} | {rt} | {r.note} |"
        )
    return "\n".join(out)


def run(quick: bool = False) -> str:
    """Measure and return the Markdown section (quick: a tiny random Llama, seconds)."""
    torch.set_num_threads(1)
    rows = gguf_rows(quick)
    head = (
        "## Exports to other runtimes\n\n"
        f"`{COMMAND}{' --quick' if quick else ''}`, 1 thread, seed 0. Targets: read-back "
        "bit-exact; GGUF file within 3% of the theoretical size; llama.cpp perplexity within "
        "0.5% of the simulation.\n\n"
    )
    return head + table(rows) + "\n"


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv[1:]))
