"""Which skeleton ``load`` takes: the artifact's class by module and name, the same class
name from another module (``__main__.Net`` saved by a script, imported from a module where
loaded), a subclass; another class only with ``strict_class=False``. ``model=`` given the
class or a state dict names the fix. ``info_of`` has the same keys after load as after
compress."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export import reader


def _net_class(module: str, name: str = "Net") -> type[nn.Module]:
    """A class ``module.name``, as defined in that module (a script's is ``__main__``)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 36, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv1(x)).flatten(1))

    Net.__module__, Net.__qualname__, Net.__name__ = module, name, name
    return Net


X = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An artifact saved from a script's ``__main__.Net``, and the model it holds."""
    torch.manual_seed(0)
    model = _net_class("__main__")().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = compactnn.compress(model, "w8a8", calib_data=X, progress=False)
    root = tmp_path_factory.mktemp("cls") / "art"
    compactnn.save(qmodel, root)
    return root, qmodel


def _same_outputs(a: nn.Module, b: nn.Module) -> bool:
    with torch.no_grad():
        return torch.equal(a(X), b(X))


def test_the_same_class_name_from_a_module_loads_bit_exact(saved):
    root, qmodel = saved
    loaded = compactnn.load(root, model=_net_class("mypackage.models")())
    assert _same_outputs(loaded, qmodel)


def test_a_subclass_of_the_saved_class_loads_bit_exact(saved):
    root, qmodel = saved

    class Mine(_net_class("__main__")):
        pass

    loaded = compactnn.load(root, model=Mine())
    assert type(loaded).__name__ == "Mine" and _same_outputs(loaded, qmodel)


def test_another_class_is_refused_naming_the_override(saved):
    root, _ = saved
    with pytest.raises(ArtifactError) as err:
        compactnn.load(root, model=_net_class("mypackage.models", "Other")())
    assert str(err.value) == (
        f"artifact {str(root)!r} holds a '__main__.Net', but the skeleton is a "
        "'mypackage.models.Other': pass the float model it was made from, or "
        "strict_class=False to load onto this class (its layers and tensors must still "
        "match the artifact's)."
    )


def test_a_class_whose_name_ends_like_the_saved_one_is_another_class(saved):
    root, _ = saved
    with pytest.raises(ArtifactError, match=r"skeleton is a 'm\.MyNet'"):
        compactnn.load(root, model=_net_class("m", "MyNet")())


def test_strict_class_false_loads_another_class_whose_tensors_match(saved):
    root, qmodel = saved
    loaded = compactnn.load(root, model=_net_class("m", "Other")(), strict_class=False)
    assert _same_outputs(loaded, qmodel)
    with pytest.raises(ArtifactError, match=r"layers\['conv1'\] has weight shape"):
        reader.load(root, model=_Wider(), strict_class=False)  # tensors still checked
    with pytest.raises(CompactnnError, match=r"strict_class='no' is not a bool"):
        reader.load(root, model=_net_class("m")(), strict_class="no")


class _Wider(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 36, 10)


def test_the_class_itself_names_the_instance_to_pass(saved, tmp_path):
    root, _ = saved
    fix = (
        "model= takes an instance, got the class Net: pass model=Net(), built as for "
        "training (load fills in its weights from the artifact)."
    )
    for path in (root, tmp_path / "missing"):  # said before any file is read
        with pytest.raises(CompactnnError) as err:
            compactnn.load(path, model=_net_class("m"))
        assert str(err.value) == fix


def test_a_state_dict_names_the_model_to_pass(saved):
    root, _ = saved
    with pytest.raises(CompactnnError, match=r"model= got a dict \(a state dict\?\)"):
        compactnn.load(root, model=_net_class("m")().state_dict())


def test_info_of_has_the_keys_of_compress_after_load(saved, tmp_path):
    root, qmodel = saved
    loaded = compactnn.load(root, model=_net_class("m")())
    info, after = compactnn.info_of(qmodel), compactnn.info_of(loaded)
    assert set(after) == set(info)
    assert after["measured"] == {} and after["made_by"] == {}
    assert after["float_classes"] == {type(m) for m in loaded.modules()}
    # a loaded model saves and loads again, bit-exact
    compactnn.save(loaded, tmp_path / "again")
    assert _same_outputs(compactnn.load(tmp_path / "again", model=_net_class("m")()), qmodel)


def test_compress_given_the_class_names_the_instance_to_pass():
    with pytest.raises(CompactnnError, match=r"got the class Net: pass Net\(\)"):
        compactnn.compress(_net_class("m"), "w8a8")
