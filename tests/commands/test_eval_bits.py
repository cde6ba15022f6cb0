"""``compactnn eval`` and ``export.size.stored_bits``: bits per weight as stored, against a
hand count of the artifact's tensors."""

import json

import pytest
import torch
from safetensors.torch import save_file

import compactnn
from compactnn.cli import main
from compactnn.export.size import stored_bits

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
    )
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "eval_bits_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import eval_bits_factory

    model = eval_bits_factory.make().eval()
    save_file(model.state_dict(), "w.safetensors")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file({"x": x, "y": torch.zeros(16, dtype=torch.long)}, "xy.safetensors")
    for recipe in ("w2", "w2-sketch", "w2-ffn"):
        q = compactnn.compress(model, recipe, calib_data=x, progress=False)
        compactnn.save(q, f"art-{recipe}")
    return model


def test_stored_bits_by_hand(project):
    # first and last layers at 8 bits (symmetric per channel, float16 scales):
    #   conv 0: 36 weights -> 36 B codes + 4 x 2 B scales = 352 bits = 9.78 bits/weight
    #   linear 5: 768 weights -> 768 B + 3 x 2 B = 6,192 bits = 8.0625 bits/weight
    # the middle conv 2 (144 weights):
    #   w2 RTN: 36 B of 2-bit codes + 4 x 2 B scales (+ 4 B zero points if asymmetric)
    #   w2-sketch: 36 B of codes + 4 filters x 2 float16 coefficients = 52 B = 2.89 bits/w
    rtn, sk = stored_bits("art-w2"), stored_bits("art-w2-sketch")
    for bits in (rtn, sk):
        assert bits["0"] == pytest.approx(352 / 36)
        assert bits["5"] == pytest.approx(6192 / 768)
    spec = compactnn.load("art-w2", model=project)[2].weight_spec
    rtn_bytes = 36 + 8 + (0 if spec.symmetric else 4)
    assert rtn["2"] == pytest.approx(8 * rtn_bytes / 144)
    assert sk["2"] == pytest.approx(8 * 52 / 144)
    assert sk["total"] == pytest.approx((352 + 8 * 52 + 6192) / (36 + 144 + 768))


def test_ffn_counts_both_factors_over_the_original_weights(project):
    header = json.loads(open("art-w2-ffn/compactnn.json").read())
    r = header["extra"]["ffn_ranks"]["2"]
    # V: (r, 4, 3, 3) and U: (4, r, 1, 1), symmetric 2-bit codes, one float16 scale per row
    stored = -(-r * 36 * 2 // 8) + 2 * r + -(-4 * r * 2 // 8) + 2 * 4
    for name in ("2.0", "2.1"):
        assert header["layers"][name]["weight_spec"]["symmetric"]
    assert stored_bits("art-w2-ffn")["2"] == pytest.approx(8 * stored / 144)


def test_eval_prints_and_writes_bits_per_weight_stored(project, capsys):
    args = ["eval", "art-w2-sketch", "--model", "eval_bits_factory:make", "--quick"]
    args += ["--weights", "w.safetensors", "--data", "xy.safetensors"]
    assert main([*args, "--simulated", "--no-progress", "--json", "r.json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(open("r.json").read())
    total = (352 + 8 * 52 + 6192) / (36 + 144 + 768)
    assert result["stored_bits"]["2"] == pytest.approx(8 * 52 / 144)
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["float"]["bits_per_weight_stored"] is None
    assert rows["compressed"]["bits_per_weight_stored"] == pytest.approx(total)
    assert f"bits/weight stored: {total:.2f} over 3 compressed layers" in out


def test_eval_without_data_of_a_factory_model_prints_untimed_rows(project, capsys):
    """No --data and no example input: no latency, but the rows print (the float row used
    to have no runtime name and crashed the table)."""
    args = ["eval", "art-w2", "--model", "eval_bits_factory:make", "--quick"]
    assert main([*args, "--weights", "w.safetensors", "--simulated", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "fp32 (not timed)" in out and "n/a (no input known: pass --data)" in out


class _Bag(torch.nn.Module):
    """A token table (row 0, the padding row, is zero) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(16, 64, padding_idx=0)
        self.fc = torch.nn.Linear(64, 8)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))  # (B, T, 64) -> (B, 64) -> (B, 8)


def test_a_float_table_stored_sparse_is_not_a_compressed_layer(tmp_path):
    # the table stays float32; only its zero padding row makes the sparse encoding smaller
    ids = torch.randint(0, 16, (4, 5), generator=torch.Generator().manual_seed(0))
    q = compactnn.compress(_Bag().eval(), "w4-g32", calib_data=ids, progress=False, ignore=["emb"])
    compactnn.save(q, tmp_path / "a")
    header = json.loads((tmp_path / "a" / "compactnn.json").read_text())
    assert header["sparse"]["emb.weight"]["kind"] == "float"  # what used to be counted
    # fc, first and last layer: 8-bit codes in groups of 32, one float16 scale per group:
    #   512 weights -> 512 B + 8 x 2 x 2 B = 544 B = 4,352 bits = 8.5 bits/weight
    assert stored_bits(tmp_path / "a") == {"fc": 8.5, "total": 8.5}
    # a float layer the recipe pruned is compressed: its sparse encoding counts
    p = compactnn.compress(_Bag().eval(), "sp50", calib_data=ids, progress=False)
    compactnn.save(p, tmp_path / "p")
    bits = stored_bits(tmp_path / "p")
    assert set(bits) == {"fc", "total"} and bits["fc"] < 32


def test_bits_line_names_a_range_only_when_the_layers_differ():
    from compactnn.commands.eval_table import bits_line

    alike = bits_line({"total": 17.0, "c1": 17.0, "c2": 17.0, "c3": 17.0})
    assert alike.startswith("bits/weight stored: 17.00 over 3 compressed layers (each 17.00; ")
    assert ".." not in alike
    one = bits_line({"total": 4.5, "fc": 4.5})
    assert one.startswith("bits/weight stored: 4.50 over 1 compressed layer (every stored")
    differ = bits_line({"total": 4.23, "7": 4.06, "0": 9.78})
    assert "(7: 4.06 .. 0: 9.78; " in differ
