import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import compactnn
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export import artifact, validate
from compactnn.export.size import artifact_size, float_size, theoretical_size


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w3a3-mse", "w2a4"])
def test_save_load_is_bit_exact(tmp_path, recipe):
    m = cnn()
    x = torch.randn(16, 1, 8, 8)
    q = compactnn.compress(m, recipe, calib_data=x, progress=False)
    compactnn.save(q, tmp_path / "a")
    q2 = compactnn.load(tmp_path / "a", model=cnn())
    assert torch.equal(q2(x), q(x))
    assert compactnn.info_of(q2)["recipe"] == compactnn.info_of(q)["recipe"]


def test_no_pickle_and_header_lists_formats(tmp_path):
    m = cnn()
    q = compactnn.compress(m, "w4a8", calib_data=torch.randn(8, 1, 8, 8), progress=False)
    compactnn.save(q, tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert names == ["compactnn.json", "model.safetensors", "recipe.yaml"]
    header = json.loads((tmp_path / "compactnn.json").read_text())
    assert header["layers"]["3"]["format"] == "uint4-asym-channel"
    assert header["layers"]["0"]["format"] == "int8-sym-channel"
    tensors = load_file(str(tmp_path / "model.safetensors"))
    # 64*16*9 4-bit codes take exactly half a byte each
    assert tensors["3.weight.packed"].numel() == 64 * 16 * 9 // 2


def test_artifact_is_smaller_and_close_to_theory_above_a_million_params(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 256)
    )
    q = compactnn.compress(m, "w4-g32", progress=False)
    compactnn.save(q, tmp_path / "q")
    on_disk = artifact_size(tmp_path / "q")
    theory = theoretical_size(q)
    # hand-computed: layer 0 (first) and 4 (last) at symmetric int8 (codes + fp16 scale per
    # group of 32); layer 2 at uint4 (codes + fp16 scale + uint8 zero point per group);
    # biases in float32
    first = 1024 * 1024 + 1024 * 32 * 2
    middle = 1024 * 1024 // 2 + 1024 * 32 * 3
    last = 256 * 1024 + 256 * 32 * 2
    expected = first + middle + last + 4 * (1024 + 1024 + 256)
    assert theory == expected
    assert theory <= on_disk <= 1.05 * theory
    assert float_size(m) / on_disk > 2.5


def test_existing_artifact_needs_force(tmp_path):
    m = cnn()
    q = compactnn.compress(m, "w8a8", calib_data=torch.randn(8, 1, 8, 8), progress=False)
    compactnn.save(q, tmp_path)
    with pytest.raises(CompactnnError, match="force"):
        compactnn.save(q, tmp_path)
    compactnn.save(q, tmp_path, force=True)
    compactnn.load(tmp_path, model=cnn())


def test_tampered_and_truncated_artifacts_are_named(tmp_path):
    m = cnn()
    q = compactnn.compress(m, "w8a8", calib_data=torch.randn(8, 1, 8, 8), progress=False)
    compactnn.save(q, tmp_path)
    f = tmp_path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="modified"):
        compactnn.load(tmp_path, model=cnn())
    f.write_bytes(bytes(data[:-100]))
    with pytest.raises(ArtifactError, match="truncated"):
        compactnn.load(tmp_path, model=cnn())
    (tmp_path / "compactnn.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        compactnn.load(tmp_path, model=cnn())


def test_interrupted_save_leaves_no_artifact(tmp_path, monkeypatch):
    m = cnn()
    q = compactnn.compress(m, "w8a8", calib_data=torch.randn(8, 1, 8, 8), progress=False)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "write_tensors", boom)
    with pytest.raises(KeyboardInterrupt):
        compactnn.save(q, tmp_path / "x")
    assert not artifact.artifact_exists(tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nor the folder the save created, nor a temp file
    (tmp_path / "x").mkdir()  # a folder that existed before: kept, and left empty
    with pytest.raises(KeyboardInterrupt):
        compactnn.save(q, tmp_path / "x")
    assert [p for p in (tmp_path / "x").iterdir()] == []
    with pytest.raises(ArtifactError, match="holds no compactnn artifact"):
        compactnn.load(tmp_path / "x", model=cnn())


def test_skeleton_is_not_modified_and_missing_skeleton_is_explained(tmp_path):
    m = cnn()
    q = compactnn.compress(m, "w8a8", calib_data=torch.randn(8, 1, 8, 8), progress=False)
    compactnn.save(q, tmp_path)
    skel = cnn()
    compactnn.load(tmp_path, model=skel)
    assert isinstance(skel[1], nn.BatchNorm2d) and type(skel[0]) is nn.Conv2d
    with pytest.raises(ArtifactError, match="model="):
        compactnn.load(tmp_path)


def _saved(tmp_path, recipe="w4a8"):
    q = compactnn.compress(cnn(), recipe, calib_data=torch.randn(8, 1, 8, 8), progress=False)
    digest = compactnn.save(q, tmp_path / "a")
    return tmp_path / "a", q, digest


def _edit_header(root, edit, *, rehash=True):
    """Apply ``edit(header)`` and, with ``rehash``, recompute every hash and the digest."""
    header = json.loads((root / "compactnn.json").read_text())
    result = edit(header)
    header = header if result is None else result
    if rehash and isinstance(header, dict):
        for f in header["files"].values():
            path = root / f["name"]
            data = b"" if path.is_symlink() else path.read_bytes()
            f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        header["digest"] = validate.header_digest(header)
    (root / "compactnn.json").write_text(json.dumps(header))


def _two_bits(entry):
    entry["weight_spec"]["bits"] = 2
    entry["format"] = "uint2-asym-channel"


def test_digest_covers_every_file_and_can_be_pinned(tmp_path):
    root, _, digest = _saved(tmp_path)
    header = json.loads((root / "compactnn.json").read_text())
    assert digest == artifact.artifact_digest(root) == header["digest"]
    # independent reference: the digest is SHA-256 of the canonical header without it
    body = {k: v for k, v in header.items() if k != "digest"}
    body["files"] = {
        r: {"bytes": f["bytes"], "sha256": f["sha256"]} for r, f in body["files"].items()
    }
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert digest == hashlib.sha256(canon).hexdigest()
    for role, name in [("tensors", "model.safetensors"), ("recipe", "recipe.yaml")]:
        data = (root / name).read_bytes()
        assert header["files"][role] == {
            "name": name,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    compactnn.load(root, model=cnn(), expect_sha256=digest.upper())
    with pytest.raises(ArtifactError, match="not the pinned"):
        compactnn.load(root, model=cnn(), expect_sha256="0" * 64)
    with pytest.raises(CompactnnError, match="expect_sha256"):
        compactnn.load(root, model=cnn(), expect_sha256="abc")


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h["layers"]["3"]["weight_spec"].update(bits=2),
        lambda h: h["layers"]["3"]["act_spec"].update(bits=4),
        lambda h: h["layers"]["6"]["conv"].update(padding_mode="circular"),
        lambda h: h["extra"].update(dynamic_act=["3"]),
    ],
)
def test_any_header_edit_is_refused_by_the_digest(tmp_path, edit):
    root, _, _ = _saved(tmp_path)
    _edit_header(root, edit, rehash=False)
    with pytest.raises(ArtifactError, match="digest does not match"):
        compactnn.load(root, model=cnn())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h["layers"]["3"]["weight_spec"].update(bits=2), "the spec says 'uint2"),
        (lambda h: h["layers"]["3"]["weight_spec"].update(symmetric=True), r"format"),
        (lambda h: h["layers"]["0"]["weight_spec"].update(bits=True), "bits"),
        (lambda h: h["layers"]["0"].update(act_spec=None), "not in the skeleton"),
        (lambda h: h["layers"]["6"]["conv"].update(padding_mode="circular"), "padding_mode"),
        (lambda h: h["layers"]["10"].update(shape=[1048576, 512]), "weight shape"),
        (lambda h: h.update(model_class="torch.nn.Linear"), "skeleton is a"),
        (lambda h: h.update(layers=[]), "'layers' has the wrong type"),
        (lambda h: h.__delitem__("aliases"), "missing"),
        (lambda h: _two_bits(h["layers"]["3"]), r"needs uint8 \[2304\]"),
        (lambda h: [], "not a JSON object"),
    ],
)
def test_rehashed_header_edits_are_refused_by_validation(tmp_path, edit, message):
    root, _, _ = _saved(tmp_path)
    _edit_header(root, edit)
    with pytest.raises(ArtifactError, match=message):
        compactnn.load(root, model=cnn())


def test_tensor_edits_with_hashes_recomputed_are_range_checked(tmp_path):
    root, _, _ = _saved(tmp_path)
    pristine = (root / "model.safetensors").read_bytes()
    edits = {
        "3.weight.scale": (lambda t: t.fill_(float("nan")), "scale"),
        "3.weight.zero": (lambda t: t.fill_(255), "outside the grid"),
        "3.input.qparams": (lambda t: t.copy_(torch.tensor([0.0, 0.0])), "scale"),
        "0.weight.scale": (lambda t: t.float(), "float32"),
    }
    for key, (edit, message) in edits.items():
        tensors = load_file(str(root / "model.safetensors"))
        tensors[key] = edit(tensors[key]) if key == "0.weight.scale" else tensors[key]
        if key != "0.weight.scale":
            edit(tensors[key])
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
        _edit_header(root, lambda h: None)
        with pytest.raises(ArtifactError, match=message):
            compactnn.load(root, model=cnn())
        (root / "model.safetensors").write_bytes(pristine)


def test_special_files_and_bad_recipes_are_refused_without_reading_them(tmp_path):
    root, _, _ = _saved(tmp_path)
    (root / "model.safetensors").unlink()
    os.symlink("/proc/self/pagemap", root / "model.safetensors")
    _edit_header(root, lambda h: h["files"]["tensors"].update(bytes=0))
    with pytest.raises(ArtifactError, match="not a regular file"):
        compactnn.load(root, model=cnn())
    root, _, _ = _saved(tmp_path / "r")
    (root / "recipe.yaml").write_bytes(b"\xff\xfe not utf-8")
    _edit_header(root, lambda h: None)
    with pytest.raises(ArtifactError, match="recipe"):
        compactnn.load(root, model=cnn())


def test_format_version_1_is_refused_with_the_re_create_command(tmp_path):
    root, _, _ = _saved(tmp_path)
    _edit_header(root, lambda h: h.update(format_version=1), rehash=False)
    match = r"version 1, from an older compactnn.*re-create it with this compactnn: "
    with pytest.raises(ArtifactError, match=match + r"compactnn compress MODEL --recipe"):
        compactnn.load(root, model=cnn())


def test_check_writable_refuses_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CompactnnError, match="not a directory"):
        artifact.check_writable(tmp_path / "file", force=True, what="path")
    with pytest.raises(CompactnnError, match="system folder"):
        artifact.check_writable("/proc/self/out", force=True, what="path")
    root, _, _ = _saved(tmp_path)
    with pytest.raises(CompactnnError, match="force"):
        artifact.check_writable(root, force=False, what="path")
    assert artifact.check_writable(root, force=True, what="path") == root
    assert artifact.check_writable(tmp_path / "new" / "deeper", force=False, what="path")
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(CompactnnError, match="not writable"):
            artifact.check_writable(tmp_path / "ro" / "a", force=False, what="path")


def test_dev_shm_is_a_folder_of_ones_own_and_the_rest_of_dev_is_refused(tmp_path):
    for system in ("/dev/x", "/dev", "/dev/shmx/a", "/sys/a", "/proc/self/a"):
        with pytest.raises(CompactnnError, match="a system folder"):
            artifact.check_writable(system, force=True, what="path")
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm here")
    out = f"/dev/shm/compactnn-test-{os.getpid()}"
    assert str(artifact.check_writable(out, force=False, what="path")) == out
    q = compactnn.compress(cnn(), "w8", calib_data=torch.randn(8, 1, 8, 8), progress=False)
    try:
        digest = compactnn.save(q, out)
        assert compactnn.artifact_digest(out) == digest
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


def test_the_refusals_name_the_force_of_whoever_named_the_path(tmp_path):
    """Like fs.check_file_path: an option (--out) is told --force, Python force=True."""
    root, q, _ = _saved(tmp_path)
    with pytest.raises(CompactnnError) as py:
        compactnn.save(q, root)  # Python: save's argument is path
    assert str(py.value) == (
        f"path {str(root)!r} already holds a compactnn artifact; pass force=True to replace it."
    )
    with pytest.raises(CompactnnError) as cli:
        artifact.check_writable(root, force=False, what="--out")
    assert str(cli.value) == (
        f"--out {str(root)!r} already holds a compactnn artifact; pass --force to replace it."
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    cases = (("--out", "(--force only", "force=True"), ("path", "(force=True only", "--force"))
    for what, word, other in cases:
        with pytest.raises(CompactnnError) as info:
            artifact.check_writable(tmp_path / "mine", force=True, what=what)
        assert str(info.value).startswith(f"{what} ") and word in str(info.value)
        assert other not in str(info.value)


def test_strays_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    root, q, _ = _saved(tmp_path)
    for name in [".cnn-0123456789abcdef-model.safetensors", ".model.safetensors.x1.tmp"]:
        (root / name).write_bytes(b"\0" * 4096)
    (root / "notes.txt").write_text("mine")  # not ours: kept
    compactnn.save(q, root, force=True)
    assert sorted(os.listdir(root)) == [
        "compactnn.json",
        "model.safetensors",
        "notes.txt",
        "recipe.yaml",
    ]


def test_a_folder_of_other_files_is_refused_even_with_force(tmp_path):
    q = compactnn.compress(cnn(), "w8", calib_data=torch.randn(8, 1, 8, 8), progress=False)
    user = tmp_path / "hf"
    user.mkdir()
    (user / "model.safetensors").write_bytes(b"the user's weights")
    (user / "config.json").write_text("{}")
    for force in (False, True):
        with pytest.raises(CompactnnError, match=r"not empty.*config\.json.*empty or new folder"):
            compactnn.save(q, user, force=force)
    assert sorted(os.listdir(user)) == ["config.json", "model.safetensors"]
    assert (user / "model.safetensors").read_bytes() == b"the user's weights"
    # leftovers of a killed save are not the user's: an otherwise empty folder is fine
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".cnn-0123456789abcdef-model.safetensors").write_bytes(b"\0")
    compactnn.save(q, tmp_path / "empty")
    assert sorted(os.listdir(tmp_path / "empty")) == [
        "compactnn.json",
        "model.safetensors",
        "recipe.yaml",
    ]


@pytest.mark.parametrize("settings", ['{"my": "settings"}', '{"format": "hf"}', "[1, 2]"])
def test_a_folder_whose_compactnn_json_is_not_ours_is_refused_even_with_force(tmp_path, settings):
    q = compactnn.compress(cnn(), "w8", calib_data=torch.randn(8, 1, 8, 8), progress=False)
    user = tmp_path / "hf"
    user.mkdir()
    (user / "model.safetensors").write_bytes(b"the user's weights")
    (user / "compactnn.json").write_text(settings)
    assert not artifact.artifact_exists(user)
    for force in (False, True):
        with pytest.raises(CompactnnError, match=r"holds no compactnn artifact.*compactnn\.json"):
            compactnn.save(q, user, force=force)
    assert (user / "model.safetensors").read_bytes() == b"the user's weights"
    assert (user / "compactnn.json").read_text() == settings
    root, _, _ = _saved(tmp_path)  # a real header, and a damaged one, are ours
    assert artifact.artifact_exists(root)
    (root / "compactnn.json").write_text('{"format": "compactnn", "cut')
    assert artifact.artifact_exists(root)
    assert artifact.check_writable(root, force=True, what="path") == root


def test_a_kernel_model_is_refused_before_anything_is_written(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    q = compactnn.compress(m, "w4-g32", calib_data=torch.randn(8, 64), progress=False)
    with pytest.raises(CompactnnError, match=r"compactnn\.load\(dir, kernels=True\)"):
        compactnn.save(compactnn.to_kernels(q), tmp_path / "k")
    assert not (tmp_path / "k").exists()


def test_a_model_with_live_pruning_masks_is_refused_before_anything_is_written(tmp_path):
    from compactnn.prune.gradual import GradualConfig, GradualPruner

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    pruner = GradualPruner(m, GradualConfig(final_sparsity=0.9, end_step=10, frequency=1))
    for _ in range(12):
        pruner.step()
    named = r"0\.weight \(\w+\), 2\.weight \(\w+\) .*pruner\.finish\(\)"
    with pytest.raises(CompactnnError, match=named):
        compactnn.save(m, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    pruner.finish()  # the fix the message names: then it saves and loads
    compactnn.save(m, tmp_path / "a")
    x = torch.randn(4, 64)
    assert torch.equal(
        compactnn.load(
            tmp_path / "a", model=nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        )(x),
        m(x),
    )


def test_a_quantize_residuals_model_is_refused_before_anything_is_written(tmp_path):
    from compactnn.deployment import quantize_residuals

    calib = torch.randn(8, 1, 8, 8)
    q = compactnn.compress(cnn(), "w8a8", calib_data=calib, progress=False)
    qres = quantize_residuals(q, calib_data=calib)
    for model in (qres, nn.Sequential(qres)):  # also held inside another module
        with pytest.raises(
            CompactnnError, match=r"quantize_residuals.*compactnn\.save\(qmodel, path\)"
        ):
            compactnn.save(model, tmp_path / "r")
        assert not (tmp_path / "r").exists()
    # other fx graphs (a .pt2 model is lifted into one) still save and load on a graph
    gm = torch.fx.symbolic_trace(cnn())
    qg = compactnn.compress(gm, "w8a8", calib_data=calib, progress=False)
    compactnn.save(qg, tmp_path / "g")
    loaded = compactnn.load(tmp_path / "g", model=torch.fx.symbolic_trace(cnn()))
    assert torch.equal(loaded(calib), qg(calib))


def test_a_save_removes_the_verification_batch_of_the_artifact_it_replaces(tmp_path):
    calib = torch.randn(8, 1, 8, 8)
    q = compactnn.compress(cnn(), "w8a8", calib_data=calib, progress=False)
    deployed = compactnn.deploy(q, "onednn", example=calib[:4])
    root = tmp_path / "a"
    compactnn.save(deployed, root)
    assert (root / "deployment.safetensors").is_file()  # samples of the user's data
    compactnn.save(deployed, root, force=True)  # a deployed save keeps its own batch
    assert isinstance(compactnn.load(root, model=cnn()), type(deployed))
    compactnn.save(q, root, force=True)
    assert sorted(os.listdir(root)) == ["compactnn.json", "model.safetensors", "recipe.yaml"]
    # a save killed between its commit and the removal: the next save removes the file
    (root / "deployment.safetensors").write_bytes(b"rows")
    compactnn.save(q, root, force=True)
    assert not (root / "deployment.safetensors").exists()
    assert torch.equal(compactnn.load(root, model=cnn())(calib), q(calib))


def _mlp_notes():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_compress_notes_survive_save_and_load_and_old_artifacts_load_without_them(tmp_path):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match="nm2:4-ft"):  # one-shot 2:4 drifts on this MLP
        q = compactnn.compress(_mlp_notes(), "nm2:4", calib_data=x, progress=False)
    notes = compactnn.info_of(q)["notes"]
    assert any("nm2:4-ft" in n for n in notes)  # the premise: the run noted something
    root = tmp_path / "a"
    compactnn.save(q, root)
    assert artifact.read_header(root)["extra"]["notes"] == notes
    q2 = compactnn.load(root, model=_mlp_notes())
    assert compactnn.info_of(q2)["notes"] == notes and "notes" not in q2._compactnn["extra"]
    compactnn.save(q2, tmp_path / "b")  # saved again from the loaded model: kept once
    assert compactnn.info_of(compactnn.load(tmp_path / "b", model=_mlp_notes()))["notes"] == notes
    _edit_header(root, lambda h: h["extra"].__delitem__("notes"))  # as saved before notes were kept
    assert compactnn.info_of(compactnn.load(root, model=_mlp_notes()))["notes"] == []
    _edit_header(root, lambda h: h["extra"].update(notes="not a list"))
    with pytest.raises(ArtifactError, match="notes"):
        compactnn.load(root, model=_mlp_notes())


def test_a_model_without_notes_writes_no_notes_field(tmp_path):
    root, q, _ = _saved(tmp_path, "w8")
    assert compactnn.info_of(q)["notes"] == []  # the premise
    assert "notes" not in artifact.read_header(root)["extra"]
