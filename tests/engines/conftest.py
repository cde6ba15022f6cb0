"""The engine tests reuse the tiny models of the post-training quantization tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quant"))  # _ptq_models
