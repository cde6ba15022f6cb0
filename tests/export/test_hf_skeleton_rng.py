"""``load(path)`` of a Hugging Face artifact without ``model=`` leaves the caller's torch
random number generator alone: the skeleton is built without transformers' random
initialisation (the artifact's weights replace it), and whatever a constructor still draws
(ViT's ``torch.randn`` tokens) is drawn on a forked generator."""

import contextlib
import warnings

import pytest
import torch

import compactnn
from compactnn.export.hf import hf_header, no_random_init, skeleton_from_header

tf = pytest.importorskip("transformers")


def _llama_config(tie: bool = False):
    return tf.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )  # fmt: skip


def _t5_config():
    return tf.T5Config(
        d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=16,
        vocab_size=100,
    )  # fmt: skip


def _tied_to(model) -> dict[str, str]:
    """Each parameter's name -> the first name holding the same tensor (tied tables)."""
    first: dict[int, str] = {}
    return {
        n: first.setdefault(id(p), n) for n, p in model.named_parameters(remove_duplicate=False)
    }


def _vit_config():
    return tf.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=8, num_labels=3,
    )  # fmt: skip


def _header_root(tmp_path, model):
    """A header naming ``model``'s architecture, and a folder whose files could hold it."""
    weights = sum(p.numel() for p in model.parameters())
    (tmp_path / "model.safetensors").write_bytes(b"\0" * (weights // 8 + 1))
    return tmp_path, {"extra": {"hf": hf_header(model)}}


def test_load_without_model_keeps_the_rng_and_the_saved_outputs(tmp_path):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(_llama_config()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(model, "w4-g32", progress=False)
    compactnn.save(q, tmp_path / "a")
    torch.manual_seed(42)
    before = torch.get_rng_state()
    loaded = compactnn.load(tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), before)
    # the reference: the same artifact loaded onto a float model the caller built
    onto = compactnn.load(tmp_path / "a", model=tf.LlamaForCausalLM(_llama_config()))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, ref, saved = (m(input_ids=ids).logits for m in (loaded, onto, q))
    torch.testing.assert_close(out, saved, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    "cls, config",
    [
        (tf.ViTModel, _vit_config),  # draws torch.randn in its constructor
        (tf.LlamaForCausalLM, _llama_config),
        (tf.LlamaForCausalLM, lambda: _llama_config(tie=True)),  # head tied to the table
        (tf.T5ForConditionalGeneration, _t5_config),  # three tables tied to one
    ],
)
def test_skeleton_draws_nothing_from_the_callers_rng(tmp_path, cls, config):
    torch.manual_seed(0)
    reference = cls(config()).eval()  # built the usual way, random init included
    root, header = _header_root(tmp_path, reference)
    torch.manual_seed(42)
    before = torch.get_rng_state()
    skeleton = skeleton_from_header(root, header)
    assert torch.equal(torch.get_rng_state(), before)
    assert type(skeleton) is cls
    assert _tied_to(skeleton) == _tied_to(reference)
    # the buffers no artifact stores (rotary frequencies...) are the ones a normal build has
    stored = set(reference.state_dict())
    buffers = dict(skeleton.named_buffers())
    for name, value in reference.named_buffers():
        if name not in stored:
            assert torch.equal(buffers[name], value), name


def test_skeleton_skips_the_random_initialisation(tmp_path, monkeypatch):
    if isinstance(no_random_init(), contextlib.nullcontext):
        pytest.skip("this transformers has no no_init_weights")
    root, header = _header_root(tmp_path, tf.LlamaForCausalLM(_llama_config()))
    calls = []
    original = tf.LlamaForCausalLM._init_weights

    def counted(self, module):
        calls.append(type(module).__name__)
        return original(self, module)

    monkeypatch.setattr(tf.LlamaForCausalLM, "_init_weights", counted)
    tf.LlamaForCausalLM(_llama_config())  # the spy sees a normal build's initialisation
    assert calls
    calls.clear()
    skeleton_from_header(root, header)
    assert calls == []
