"""Benchmark sections: name -> module with ``run(quick: bool = False) -> str`` (Markdown)."""

SECTIONS: dict[str, str] = {
    "foundation": "compactnn.bench.foundation",
    "ptq": "compactnn.bench.ptq",
    "pruning": "compactnn.bench.pruning",
    "training": "compactnn.bench.training",
    "deploy": "compactnn.bench.deploy",
    "deploy_recipes": "compactnn.bench.deploy_recipes",
    "binary": "compactnn.bench.binary",
    "transformers": "compactnn.bench.transformers",
    "lm": "compactnn.bench.lm",
}
