"""The ``transformers`` benchmark section's tables and notes, from its measured rows
(``bench/transformers.py`` measures; these functions only format and choose): the main table,
the form chosen per shape, why the previous ONNX Runtime form is no candidate, and the ONNX
Runtime form's memory step by step. A row is a dict: ``recipe``, ``form``, ``kind``, and the
measured ``b64`` / ``b1`` (seconds), ``b64_t`` / ``b1_t`` (:class:`Timing`), ``*_xbest``
(fastest float / this), ``rss`` / ``rss_anon`` (bytes), ``size``, ``cos``, or ``error``."""

from __future__ import annotations

from compactnn.measure.memory import MIB


def steps_table(steps: dict, base: dict) -> str:
    """The ONNX Runtime form's resident memory, one change at a time, against float's."""
    lines = [
        "| step (ONNX Runtime form of " + next(iter(steps.values()))["recipe"] + ") | "
        "resident (MiB) | vs float | anonymous (MiB) | file-backed (MiB) |",
        "|---|---|---|---|---|",
    ]
    rows = {"fp32-eager (float, weights mapped from safetensors)": base, **steps}
    for label, r in rows.items():
        if "rss" not in r:
            lines.append(f"| {label} | failed: {r.get('rss_error', '-')} | | | |")
            continue
        ratio = f"{r['rss'] / base['rss']:.2f}x" if base.get("rss") else "-"
        lines.append(
            f"| {label} | {r['rss'] / MIB:.1f} | {ratio} | {r['rss_anon'] / MIB:.1f} | "
            f"{(r['rss'] - r['rss_anon']) / MIB:.1f} |"
        )
    return "\n".join(lines)


def _cell(r: dict, key: str) -> str:
    t = r.get(key + "_t")
    if t is None:
        return "- | -"
    cpu = f", cpu {t.cpu_s * 1e3:.2f} ms" if t.cpu_s else ""  # CPU time per call, all threads
    return f"{t.fmt()}{cpu} | {r[key + '_xbest']:.2f}x"


def main_table(rows: dict) -> str:
    lines = [
        "| model | form | mean cosine | size (MB) | batch 64 | vs fastest float | batch 1 | "
        "vs fastest float | resident (MiB) | vs float | anonymous (MiB) | vs float |",
        "|" + "---|" * 12,
    ]
    for name, r in rows.items():
        label = (r["recipe"], r["form"]) if r["kind"] != "float" else (name, "float")
        if "error" in r:
            lines.append(f"| {label[0]} | {label[1]} | failed: {r['error'][:160]} |" + " |" * 9)
            continue
        size = f"{r['size'] / 1e6:.1f}" if r.get("size") else "-"
        cos = f"{r['cos']:.4f}" if "cos" in r else "-"
        mem = " | ".join(
            f"{r[k] / MIB:.1f} | {r[k] / rows['fp32-eager'][k]:.2f}x"
            if r.get(k) and rows["fp32-eager"].get(k)
            else "- | -"
            for k in ("rss", "rss_anon")
        )
        lines.append(
            f"| {label[0]} | {label[1]} | {cos} | {size} | {_cell(r, 'b64')} | "
            f"{_cell(r, 'b1')} | {mem} |"
        )
    return "\n".join(lines)


def choices_table(rows: dict, winners: dict) -> str:
    """Per recipe and batch size: the fastest delivered form (the per-shape choice)."""
    lines = [
        "| recipe | batch 64: chosen form, vs fastest float | batch 1: chosen form, vs "
        "fastest float | resident vs float (chosen at batch 1) |",
        "|---|---|---|---|",
    ]
    base = rows["fp32-eager"].get("rss")
    for recipe in dict.fromkeys(r["recipe"] for r in rows.values() if r["kind"] == "ours"):
        forms = {  # the previous ONNX Runtime form is a reference row, not a choice
            n: r
            for n, r in rows.items()
            if r.get("recipe") == recipe and "b64" in r and r["form"] != "ort-nbits-bf16"
        }
        if not forms:
            continue
        cells = []
        for key in ("b64", "b1"):
            best = min(forms, key=lambda n: forms[n][key])
            cells.append(
                f"{forms[best]['form']}, {forms[best][key + '_xbest']:.2f}x (vs {winners[key]})"
            )
        rss = forms[best].get("rss")
        cells.append(f"{rss / base:.2f}x" if rss and base else "-")
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
        w8a8 = "a8" in recipe and "a8g" not in recipe
        if w8a8 and "b64" in rows.get("bf16-autocast", {}):  # W8A8 vs bf16
            bf = rows["bf16-autocast"]
            verdict = [
                f"W8A8 {forms[n][k] * 1e3:.1f} ms vs bf16 {bf[k] * 1e3:.1f} ms: "
                + ("chosen" if forms[n][k] < bf[k] else "not chosen (bf16 faster)")
                for k in ("b64", "b1")
                for n in [min(forms, key=lambda n, k=k: forms[n][k])]
            ]
            lines.append(f"| {recipe} vs bf16 autocast | " + " | ".join(verdict) + " | |")
    return "\n".join(lines)


def bf16_note(rows: dict) -> str:
    """Why the previous ONNX Runtime form (``ort-nbits-bf16``) is no candidate of
    :func:`choices_table`, where it measured faster than the chosen form, and its resident
    memory against float's (beside ``ort-nbits``')."""
    base, faster, memory = rows["fp32-eager"].get("rss"), [], []
    for r in (r for r in rows.values() if r.get("form") == "ort-nbits-bf16" and "b64" in r):
        same = [x for x in rows.values() if x.get("recipe") == r["recipe"] and "b64" in x]
        for key, label in (("b64", "batch 64"), ("b1", "batch 1")):
            best = min((x for x in same if x is not r), key=lambda x: x[key], default=None)
            if best is not None and r[key] < best[key]:
                faster.append(
                    f"{r['recipe']} at {label}: {r[key + '_xbest']:.2f}x the fastest float "
                    f"against the chosen {best['form']}' {best[key + '_xbest']:.2f}x"
                )
        lean = next((x for x in same if x["form"] == "ort-nbits" and x.get("rss")), None)
        if r.get("rss") and base:
            vs = f" ({lean['form']} {lean['rss'] / base:.2f}x)" if lean else ""
            memory.append(f"{r['recipe']} {r['rss'] / base:.2f}x{vs}")
    return (
        "`ort-nbits-bf16` (the previous ONNX Runtime form: bfloat16 token table, session built "
        "from the model's bytes, CPU arena on) is a reference row, not a candidate: it holds "
        "more memory than `ort-nbits`. Where it measured faster than the chosen form: "
        + ("; ".join(faster) or "nowhere")
        + "."
        + (f" Resident memory against float's: {'; '.join(memory)}." if memory else "")
        + "\n"
    )
