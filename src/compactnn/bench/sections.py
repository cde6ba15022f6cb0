"""Benchmark sections: name -> module with ``run(quick: bool = False) -> str`` (Markdown)."""

SECTIONS: dict[str, str] = {
    "foundation": "compactnn.bench.foundation",
    "ptq": "compactnn.bench.ptq",
    "pruning": "compactnn.bench.pruning",
    "training": "compactnn.bench.training",
    "deploy": "compactnn.bench.deploy",
    "transformers": "compactnn.bench.transformers",
    "lm": "compactnn.bench.lm",
}
