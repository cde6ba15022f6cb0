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
    "probe": "compactnn.bench.probe",
    "ternarybert": "compactnn.bench.ternarybert",
    "export": "compactnn.bench.export",
    "export_hf": "compactnn.bench.export_hf",
    "subbit": "compactnn.bench.subbit",
    "lowbit_train": "compactnn.bench.lowbit_train",
    "lowbit_train2": "compactnn.bench.lowbit_train2",
    "datafree": "compactnn.bench.datafree",
    "scale": "compactnn.bench.scale",
    "search": "compactnn.bench.search",
}
