"""An artifact folder holds one artifact: a save inside another artifact's folder is refused.

``export/artifact.check_writable`` (``enclosing_artifact``).
"""

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.export.artifact import enclosing_artifact


@pytest.fixture(scope="module")
def qmodel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    return compactnn.compress(net, "w8", progress=False)


def test_a_save_inside_an_artifact_folder_is_refused_before_writing(qmodel, tmp_path):
    compactnn.save(qmodel, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    for inner in ("out/net-w8", "out/a/b"):
        with pytest.raises(CompactnnError, match=r"lies inside .*out'.*holds a compactnn artifact"):
            compactnn.save(qmodel, tmp_path / inner)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_siblings_and_dot_dot_paths_are_not_inside(qmodel, tmp_path, monkeypatch):
    compactnn.save(qmodel, tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    compactnn.save(qmodel, "out/../beside")  # resolves next to out, not in it
    compactnn.save(qmodel, tmp_path / "out-2")
    assert enclosing_artifact(tmp_path / "beside" / "x") == tmp_path / "beside"
    assert enclosing_artifact(tmp_path / "elsewhere" / "x") is None


def test_the_command_line_says_it_in_one_line(qmodel, tmp_path, monkeypatch, capsys):
    from compactnn.cli import main

    compactnn.save(qmodel, tmp_path / "art")
    torch.save  # noqa: B018 - the float weights for --weights come from a plain save below
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "netmod.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, "w.safetensors")
    code = main(["compress", "netmod:build", "--weights", "w.safetensors", "--recipe", "w8",
                 "--out", "art/inner", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "lies inside 'art'" in err, err
    assert not (tmp_path / "art" / "inner").exists()
