"""Benchmark sections: name -> module with ``run(quick: bool = False) -> str`` (Markdown)."""

SECTIONS: dict[str, str] = {
}
