"""Peer wrappers run the same model on the same inputs: ONNX Runtime fp32 matches eager
float, its int8 models stay close, and the float paths agree with the eager model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from compactnn.bench.peers import PeerResult, float_paths, fx_x86_int8, ort_models, time_blocks

pytest.importorskip("onnxruntime")


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    ).eval()


def test_ort_models_match_float():
    model = tiny_cnn()
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    peers = ort_models(model, x[:4], x, threads=1)
    assert set(peers) == {"ort-fp32", "ort-static-int8", "ort-dynamic-int8"}
    with torch.no_grad():
        ref = model(x)
    for name, res in peers.items():
        assert isinstance(res, PeerResult), res  # a string here would be the peer's error
        assert res.size_bytes > 0
        out = res.model(x)  # a dynamic batch: 16 rows although exported with 4
        err = (out - ref).abs().max().item()
        bound = 1e-5 if name == "ort-fp32" else 0.05 * ref.abs().max().item()
        assert out.shape == ref.shape and err <= bound, (name, err)
    # int8 files are smaller than the fp32 export
    assert peers["ort-static-int8"].size_bytes < peers["ort-fp32"].size_bytes


def test_ort_pre_processing_litter_is_removed(tmp_path, monkeypatch):
    """ONNX Runtime's incomplete shape inference saves ``sym_shape_infer_temp.onnx`` and its
    external data into the current directory, then raises: neither the caller's folder nor
    the peer's folder keeps them, and the raw export still quantizes."""
    shape_inference = pytest.importorskip("onnxruntime.quantization.shape_inference")
    calls = []

    def incomplete(src, dst, *args, **kwargs):
        calls.append(Path.cwd())
        Path("sym_shape_infer_temp.onnx").write_bytes(b"graph")
        Path("0a1b2c-external.data").write_bytes(b"\0" * 4096)
        raise Exception("Incomplete symbolic shape inference")

    monkeypatch.setattr(shape_inference, "quant_pre_process", incomplete)
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.chdir(user)
    model = tiny_cnn()
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    peers = ort_models(model, x[:4], x, threads=1)
    assert len(calls) == 1 and calls[0] != user
    assert list(user.iterdir()) == []  # nothing new in the caller's folder
    folder = Path(peers["ort-fp32"].model.path).parent
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".onnx", ".data")) == [
        "fp32.onnx",
        "ort-dynamic-int8.onnx",
        "ort-static-int8.onnx",
    ]  # no temp model, no 90 MB external data, no pre.onnx (pre-processing failed)
    assert isinstance(peers["ort-static-int8"], PeerResult)


def test_float_paths_agree_with_eager():
    model = tiny_cnn()
    x = torch.randn(4, 1, 6, 6)
    paths = float_paths(model, x, threads=1, with_compile=False)
    assert set(paths) == {"fp32-eager", "bf16-autocast"}
    with torch.no_grad():
        ref = model(x)
        bf16 = paths["bf16-autocast"].model(x).float()
    assert torch.equal(paths["fp32-eager"].model(x), ref)
    assert (bf16 - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 keeps ~3 digits


def test_fx_x86_int8_stays_close_to_float():
    model = tiny_cnn()
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    res = fx_x86_int8(model, x)
    with torch.no_grad():
        ref, out = model(x), res.model(x)
    assert res.size_bytes > 0
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()  # 8-bit steps, not garbage


def test_time_blocks_runs_each_model_in_rotating_blocks():
    calls: list[str] = []

    def recorder(name: str):
        def model(x: torch.Tensor) -> torch.Tensor:
            calls.append(name)
            return x + 1

        return model

    models = {"a": recorder("a"), "b": recorder("b"), "c": recorder("c"), "bad": "Error: x"}
    wall, cpu = time_blocks(models, (torch.zeros(2),), rounds=3, block_s=0.0, pause_s=0.0)
    assert set(wall) == set(cpu) == {"a", "b", "c"}  # a failed peer's message is skipped
    assert all(len(v) == 9 for v in wall.values())  # 3 rounds of 3-call blocks
    assert all(t >= 0 for v in wall.values() for t in v)
    timed = calls[9:]  # after 3 warm-up calls each
    blocks = [timed[i] for i in range(0, len(timed), 3)]
    assert all(timed[i : i + 3] == [timed[i]] * 3 for i in range(0, len(timed), 3))
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotating order


@pytest.mark.slow
def test_ort_fp32_of_a_hugging_face_encoder():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    batch = {
        "input_ids": torch.randint(0, 64, (2, 8)),
        "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3]),
    }
    res = ort_models(model, batch, [batch], threads=1)["ort-fp32"]
    assert isinstance(res, PeerResult), res
    other = {"input_ids": torch.randint(0, 64, (3, 6)), "attention_mask": torch.ones(3, 6).long()}
    for b in (batch, other):  # dynamic batch and sequence length
        with torch.no_grad():
            ref = model(**b).last_hidden_state
        out = res.model(**b).last_hidden_state
        assert out.shape == ref.shape and (out - ref).abs().max() < 1e-4


def test_the_ort_temporary_folder_goes_with_the_models(monkeypatch):
    """The ONNX files stay while a returned model may reopen them (the deploy bench does),
    and the ``compactnn-ort-*`` folder is removed once the models are gone, or at once when
    the peers fail."""
    import gc

    from compactnn.bench import peers as peers_module

    model = tiny_cnn()
    x = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    peers = ort_models(model, x[:4], x, threads=1)
    static = peers["ort-static-int8"].model
    folder = Path(static.path).parent
    assert folder.name.startswith("compactnn-ort-") and Path(static.path).is_file()
    assert not (folder / "pre.onnx").exists()  # the intermediate is gone already
    del peers, static
    gc.collect()
    assert not folder.exists()

    seen = []

    def export_fails(model, example, path):
        seen.append(Path(path).parent)
        raise RuntimeError("export failed")

    monkeypatch.setattr(peers_module, "export_onnx", export_fails)
    with pytest.raises(RuntimeError, match="export failed"):
        ort_models(model, x[:4], x, threads=1)
    assert seen and not seen[0].exists()
