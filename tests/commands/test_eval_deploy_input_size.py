"""``compactnn eval`` and ``deploy`` refuse ``--data`` whose images are of another size than
the reference model takes, in the one line ``report`` gives (mnist-cnn pools globally: it
runs on 8x8 digits, at chance accuracy, and nothing else would say so)."""

import numpy as np
import pytest
import torch

import compactnn
from compactnn.commands._common import source_record
from compactnn.errors import CompactnnError
from compactnn.model_io import resolve_model
from tests._cli import run_cli

# MNIST digits are 28x28 images, sklearn's digits 8x8: the sizes the refusal must name
REFUSAL = (
    "error: --data {spec} holds 8x8 inputs, but mnist-cnn takes 28x28 ones (8x8 given, "
    "28x28 expected): pass 28x28 inputs (its own data: --data mnist-cnn).\n"
)


@pytest.fixture(scope="module")
def mnist_artifact(tmp_path_factory):
    """A w8 (weight-only: no calibration) artifact of mnist-cnn, recorded as compress does."""
    loaded = resolve_model("mnist-cnn")
    qmodel = compactnn.compress(loaded.model, "w8", progress=False)
    qmodel._compactnn.setdefault("extra", {})["source"] = source_record(loaded)
    path = tmp_path_factory.mktemp("art") / "mnist-w8"
    compactnn.save(qmodel, path)
    return str(path)


@pytest.fixture
def small_images(tmp_path):
    """A .npy of 8x8 single-channel images (inputs alone), and one of 28x28 images."""
    gen = np.random.default_rng(0)
    small, right = tmp_path / "small.npy", tmp_path / "right.npy"
    np.save(small, gen.standard_normal((6, 1, 8, 8)).astype(np.float32))
    np.save(right, gen.standard_normal((6, 1, 28, 28)).astype(np.float32))
    return str(small), str(right)


QUIET = ("--quick", "--runs", "1", "--no-progress")


def test_eval_of_an_artifact_refuses_the_digits_data_set(capsys, mnist_artifact):
    code, out, err = run_cli(capsys, "eval", mnist_artifact, "--data", "digits", *QUIET)
    assert (code, out, err) == (2, "", REFUSAL.format(spec="digits"))


def test_eval_of_the_reference_refuses_a_file_of_small_images(capsys, small_images):
    code, out, err = run_cli(capsys, "eval", "mnist-cnn", "--data", small_images[0], *QUIET)
    assert (code, out, err) == (2, "", REFUSAL.format(spec=small_images[0]))


def test_eval_with_a_recipe_refuses_before_compressing(capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("compressed before --data was checked")

    monkeypatch.setattr(compactnn, "compress", never)
    argv = ("eval", "mnist-cnn", "--recipe", "w8a8", "--data", "digits", *QUIET)
    code, out, err = run_cli(capsys, *argv)
    assert (code, out, err) == (2, "", REFUSAL.format(spec="digits"))


def test_deploy_of_an_artifact_refuses_the_digits_data_set(capsys, mnist_artifact):
    code, out, err = run_cli(capsys, "deploy", mnist_artifact, "--data", "digits", *QUIET)
    assert (code, out, err) == (2, "", REFUSAL.format(spec="digits"))


def test_deploy_of_the_reference_refuses_a_file_of_small_images(capsys, monkeypatch, small_images):
    def never(*args, **kwargs):
        raise AssertionError("compressed before --data was checked")

    monkeypatch.setattr(compactnn, "compress", never)
    code, out, err = run_cli(capsys, "deploy", "mnist-cnn", "--data", small_images[0], *QUIET)
    assert (code, out, err) == (2, "", REFUSAL.format(spec=small_images[0]))


def test_inputs_of_the_size_the_model_takes_pass(small_images):
    from compactnn.commands.eval_data import check_data_size

    loaded = resolve_model("mnist-cnn")
    check_data_size(small_images[1], loaded, torch.zeros(3, 1, 28, 28))  # tensor
    split = {"x_train": torch.zeros(2, 1, 8, 8), "y_train": torch.zeros(2).long(),
             "x_test": torch.zeros(2, 1, 28, 28), "y_test": torch.zeros(2).long()}  # fmt: skip
    check_data_size("split.safetensors", loaded, split)  # the scored split is 28x28
    check_data_size("batches", loaded, [torch.zeros(2, 1, 28, 28)])  # calibration batches
    with pytest.raises(CompactnnError, match=r"\(8x8 given, 28x28 expected\)"):
        check_data_size("batches", loaded, [torch.zeros(2, 1, 8, 8)])
    with pytest.raises(CompactnnError, match=r"\(14x14 given, 28x28 expected\)"):
        check_data_size("xy", loaded, {"x": torch.zeros(2, 1, 14, 14), "y": torch.zeros(2)})
