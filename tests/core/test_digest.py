import hashlib

import torch

from compactnn.core.digest import tensor_digest, tensors_sha256


def test_tensor_digest_is_sha256_of_shape_dtype_and_bytes():
    t = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    expected = hashlib.sha256(b"(2, 3)torch.int16" + t.numpy().tobytes()).hexdigest()
    assert tensor_digest([t]) == expected
    assert tensor_digest([t.t().contiguous().t()]) == expected  # layout does not matter
    assert tensor_digest([t, t]) != expected


def test_named_digest_sees_the_names_and_non_tensor_values():
    base = tensors_sha256([("w", torch.zeros(2)), ("n", 3)])
    assert base == tensors_sha256([("w", torch.zeros(2)), ("n", 3)])
    assert base != tensors_sha256([("v", torch.zeros(2)), ("n", 3)])
    assert base != tensors_sha256([("w", torch.zeros(2)), ("n", 4)])
