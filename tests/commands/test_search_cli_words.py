"""``compactnn search``: labelled named-input data (as ``eval`` reads it), flag values refused
in the flags' words, the per-layer table and the layers kept float, evaluations said as they
happen; ``eval`` on a split without labels."""

import json

import pytest
import torch
from safetensors.torch import save_file

from compactnn.cli import main
from compactnn.commands.search_report import layer_table, mixed_activation_warning, size_lines

TOKEN_NET = """
import torch
from torch import nn


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids):
        return self.head(torch.relu(self.hidden(self.emb(input_ids).mean(1))))


def make():
    torch.manual_seed(0)
    return TokenNet()
"""

CNN = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )
"""


def project(tmp_path, monkeypatch, name, source):
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    model = module.make()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / f"{name}.safetensors")
    return model, [f"{name}:make", "--weights", str(tmp_path / f"{name}.safetensors")]


def cli(capsys, *argv):
    try:
        code = main([*map(str, argv)])
    except SystemExit as exc:  # argparse refusing a value
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def tokens(tmp_path, monkeypatch):
    """TokenNet, and its token ids labelled with its own predictions (top-1 100%)."""
    model, words = project(tmp_path, monkeypatch, "tokennet_words", TOKEN_NET)
    ids = torch.randint(0, 20, (96, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(ids).argmax(1)
    split = {"input_ids_train": ids[:64], "y_train": y[:64],
             "input_ids_test": ids[64:], "y_test": y[64:]}  # fmt: skip
    save_file(split, tmp_path / "split.safetensors")
    save_file({"input_ids": ids, "y": y}, tmp_path / "xy.safetensors")
    return tmp_path, words


@pytest.fixture
def cnn(tmp_path, monkeypatch):
    model, words = project(tmp_path, monkeypatch, "cnnnet_words", CNN)
    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)
    save_file({"x_train": x[:32], "y_train": y[:32], "x_test": x[32:], "y_test": y[32:]},
              tmp_path / "split.safetensors")  # fmt: skip
    return tmp_path, words


def test_max_drop_scores_labelled_named_inputs_as_eval_reads_them(tokens, capsys):
    tmp, words = tokens
    for data, scored in (("split", "*_test tensors"), ("xy", "input_ids/y")):
        out_dir = tmp / data
        code, out, err = cli(capsys, "search", *words, "--data", tmp / f"{data}.safetensors",
                             "-f", "w2a8,w8a8", "--max-drop", "5", "--max-evals", "2",
                             "-o", out_dir)  # fmt: skip
        assert code == 0, err
        assert f"top-1 (%) on the {scored}" in out or f"top-1 (%) on {scored}" in out, out
        budget = json.loads((out_dir / "search.json").read_text())["budget"]
        assert budget["baseline"] == 100.0 and budget["drop"] <= 5
        assert budget["in_sample"] is (data == "xy")
        # the float model's quality and the chosen one's, not only the drops
        assert "float model: top-1 100%" in out
        assert f"quality: float 100, chosen {budget['quality']:.4g}" in out
        # the embedding table is not searched: said, with the flag that quantizes it
        assert "stays float: emb (embedding tables" in out and "--embeddings" in out


def test_evaluations_are_said_as_they_happen_unless_no_progress(cnn, capsys):
    tmp, words = cnn
    argv = ["search", *words, "--data", tmp / "split.safetensors", "-f", "w2a8,w8a8",
            "--max-drop", "20", "--max-evals", "2"]  # fmt: skip
    code, out, err = cli(capsys, *argv, "-o", tmp / "a")
    assert code == 0, err
    lines = out.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("  evaluation ")]
    assert len(said) == 2 and "evaluation 1 (at most 2): top-1" in lines[said[0]]
    summary = next(i for i, line in enumerate(lines) if line.startswith("searched "))
    assert said[-1] < summary  # as they happen, before the summary
    code, out, err = cli(capsys, *argv, "--no-progress", "-o", tmp / "b")
    assert code == 0 and "  evaluation " not in out, err


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--avg-bits", "-3"), ("--avg-bits", "0"), ("--avg-bits", "nan"), ("--max-bytes", "inf"),
     ("--max-bops", "-1"), ("--max-latency-ratio", "0"), ("--max-drop", "-1")],
)  # fmt: skip
def test_budget_values_are_refused_in_the_flags_words(cnn, capsys, flag, value):
    tmp, words = cnn
    code, _, err = cli(capsys, "search", *words, "--data", tmp / "split.safetensors",
                       "-f", "w2a8,w8a8", flag, value, "-o", tmp / "s")  # fmt: skip
    assert code == 2 and f"argument {flag}: '{value}' is not a finite number" in err, err
    assert "e.g." in err and "Budget." not in err and "max_drop=" not in err


def test_a_max_drop_not_below_the_baseline_is_refused_in_top1_points(cnn, capsys):
    tmp, words = cnn
    code, _, err = cli(capsys, "search", *words, "--data", tmp / "split.safetensors",
                       "-f", "w2a8,w8a8", "--max-drop", "150", "-o", tmp / "s")  # fmt: skip
    assert code == 2 and "--max-drop 150 is not below the float model's quality (top-1 100%)" in err
    assert "eval_fn" not in err and "max_drop=" not in err and "--max-drop 1 " in err
    assert not (tmp / "s").exists()


def test_embeddings_flag_is_checked_in_its_words(cnn, capsys):
    tmp, words = cnn
    code, out, err = cli(capsys, "search", *words, "--data", tmp / "split.safetensors",
                         "-f", "w2a8,w8a8", "--avg-bits", "4", "--embeddings", "w4-g32",
                         "--no-progress", "-o", tmp / "e")  # fmt: skip
    assert code == 0, err
    assert "--embeddings w4-g32 ignored: MODEL has no embedding table" in err
    assert "drop embeddings=" not in err and "stays float" not in out
    code, _, err = cli(capsys, "search", *words, "--data", tmp / "split.safetensors",
                       "-f", "w2a8,w8a8", "--avg-bits", "4", "--embeddings", "bogus",
                       "-o", tmp / "b")  # fmt: skip
    assert code == 2 and "--embeddings 'bogus' is not a format" in err, err
    assert "unknown recipe" not in err


def test_the_per_layer_table_names_each_layer_its_weights_and_format(cnn, capsys):
    tmp, words = cnn
    code, out, err = cli(capsys, "search", *words, "--data", tmp / "split.safetensors",
                         "-f", "w2a8,w8a8", "--avg-bits", "4", "--no-progress",
                         "-o", tmp / "t")  # fmt: skip
    assert code == 0, err
    assignment = json.loads((tmp / "t" / "search.json").read_text())["assignment"]
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:3] == "  0"
            or line[:3] == "  3"}  # fmt: skip
    assert rows == {"0": ["36", assignment["0"]], "3": ["768", assignment["3"]]}


def test_a_long_table_groups_runs_of_one_format():
    assignment = {f"l{i}": ("w4a8" if i < 20 else "w8a8") for i in range(30)}
    lines = layer_table(assignment, dict.fromkeys(assignment, 10))
    assert lines[0].split() == ["layers", "(run)", "weights", "format"]
    assert [line.split() for line in lines[1:]] == [
        ["l0", "..", "l19", "(20)", "200", "w4a8"],
        ["l20", "..", "l29", "(10)", "100", "w8a8"],
    ]


def test_weight_only_formats_beside_int8_ones_are_warned_about():
    said = mixed_activation_warning({"a": "w4-g32", "b": "w8a8", "c": "w8a8"})
    assert "weight-only w4-g32 (a)" in said and "run in float" in said
    assert mixed_activation_warning({"a": "w4-g32", "b": "w2-g32"}) is None


def test_the_max_bytes_note_names_embeddings_only_for_a_model_with_tables():
    with_tables = size_lines(1_000, 5_000, 4_500, floor=800)[-1]
    without = size_lines(1_000, 5_000, 4_500, floor=800, tables=False)[-1]
    assert "a smaller --embeddings format" in with_tables
    assert "--embeddings" not in without and "(cheaper formats shrink it)" in without


def test_eval_on_a_split_without_labels_names_the_keys_it_takes(cnn, capsys):
    tmp, words = cnn
    x = torch.randn(8, 1, 8, 8)
    save_file({"x_train": x, "x_test": x.clone()}, tmp / "nolabels.safetensors")
    code, _, err = cli(capsys, "eval", *words, "--data", tmp / "nolabels.safetensors", "--quick",
                       "--no-progress")  # fmt: skip
    assert code == 2 and "holds x_test, x_train: a split (_train/_test keys) without labels" in err
    assert "x_train/y_train and x_test/y_test" in err and "without _train/_test" in err, err


def test_an_unmet_max_drop_is_said_in_the_flags_words(cnn, capsys):
    tmp, words = cnn  # 16 test samples: even all-w8a8 misses one (a 6.25-point drop)
    code, _, err = cli(capsys, "search", *words, "--data", tmp / "split.safetensors",
                       "-f", "w2a8,w8a8", "--max-drop", "5", "--max-evals", "2",
                       "--no-progress", "-o", tmp / "s")  # fmt: skip
    assert code == 2 and "no configuration within budget meets --max-drop 5:" in err, err
    assert "raise --max-drop" in err and "max_drop" not in err


def test_search_on_a_split_without_labels_names_the_keys_it_takes(cnn, capsys):
    tmp, words = cnn
    x = torch.randn(8, 1, 8, 8)
    save_file({"x_train": x, "x_test": x.clone()}, tmp / "nolabels.safetensors")
    code, _, err = cli(capsys, "search", *words, "--data", tmp / "nolabels.safetensors",
                       "-f", "w2a8,w8a8", "--avg-bits", "4", "-o", tmp / "s")  # fmt: skip
    assert code == 2 and "a split (_train/_test keys) without labels" in err, err
    assert not (tmp / "s").exists()
