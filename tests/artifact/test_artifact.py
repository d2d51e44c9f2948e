"""The MASS artifact: bit-identical round trip, refusal of corrupt/unknown artifacts, atomic writes, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from massmerge import artifact
from massmerge.artifact import loader
from massmerge.mass import storage
from massmerge.artifact import load, save_artifact
from massmerge.heads.files import read_head_file, write_head_file
from massmerge.mass.storage import round_factors
from massmerge.checkpoints import save_state_dict
from massmerge.errors import MassMergeError, OptionError
from massmerge.heads import LinearHead, ZeroShotHead
from massmerge.mass import MASSModel, mean_pool

from tiny_models import write_tiny_bert_zoo
from toy_mass import ToyEncoder, make_batch, make_parts


def built(num_tasks: int = 4, dtype: torch.dtype = torch.float16, seed: int = 0) -> MASSModel:
    """A model as ``massmerge build`` makes it: factors rounded to their storage dtype."""
    base, factors, heads, cfg = make_parts(num_tasks, seed)
    return MASSModel(base, round_factors(factors, dtype), heads, cfg, pool=mean_pool())


def assert_same_outputs(a: MASSModel, b: MASSModel, batch: torch.Tensor) -> None:
    out_a, out_b = a(batch), b(batch)
    for field in ("task", "label", "probs", "selected"):
        assert torch.equal(getattr(out_a, field), getattr(out_b, field)), field
    for layer, residuals in out_a.residuals.items():
        assert torch.equal(residuals, out_b.residuals[layer])
    for tasks in [(0,), (1, 2), (0, 1, 2)]:
        assert torch.equal(a.features_with(tasks, batch), b.features_with(tasks, batch))


def test_round_trip_is_bit_identical(tmp_path):
    model = built()
    save_artifact(model, tmp_path / "art")
    loaded = load(tmp_path / "art", base_model=ToyEncoder(), pool=mean_pool())
    assert_same_outputs(model, loaded, make_batch(16, seed=3))
    assert loaded.manifest.factor_dtype == "float16"
    assert [type(h) for h in loaded.heads] == [type(h) for h in model.heads]


def test_parts_in_storage_dtype_write_the_same_artifact(tmp_path):
    """``massmerge build`` writes from the parts with the factors already converted to float16 (no second copy
    at write time); the files are byte for byte those of saving the served model."""
    model = built()
    save_artifact(model, tmp_path / "served")
    base, factors, heads, cfg = make_parts(4)
    stored = storage.to_storage(round_factors(factors, torch.float16), torch.float16)
    assert all(f.U.dtype == f.V.dtype == torch.float16 and f.s.dtype == torch.float32
               for per_task in stored.matrices.values() for f in per_task)
    assert all(t.dtype == torch.float16 for per_task in stored.non_matrix.values() for t in per_task)
    artifact.write_artifact(tmp_path / "parts", base_model=base, factors=stored, heads=heads, serve=cfg)
    for name in (artifact.FACTORS_FILE, artifact.HEADS_FILE):
        assert (tmp_path / "parts" / name).read_bytes() == (tmp_path / "served" / name).read_bytes(), name
    loaded = load(tmp_path / "parts", base_model=ToyEncoder(), pool=mean_pool())
    assert_same_outputs(model, loaded, make_batch(8, seed=2))


def test_round_trip_exact_with_float32_factors(tmp_path):
    base, factors, heads, cfg = make_parts(3)
    model = MASSModel(base, factors, heads, cfg, pool=mean_pool())
    save_artifact(model, tmp_path / "art", factor_dtype="float32")
    loaded = load(tmp_path / "art", base_model=ToyEncoder(), pool=mean_pool())
    assert_same_outputs(model, loaded, make_batch(10))


def test_manifest_holds_every_setting_once(tmp_path):
    base, factors, heads, cfg = make_parts(3, eta=0.25, top_k=2, tau=0.5, max_length=40)
    model = MASSModel(base, factors, heads, cfg, pool=mean_pool())
    save_artifact(model, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["format_version"] == artifact.FORMAT_VERSION
    assert manifest["task_names"] == ["task0", "task1", "task2"]
    serve = manifest["serve"]
    assert serve["routing_layers"] == ["blocks.2.fc1"] and serve["max_length"] == 40
    assert (serve["eta"], serve["top_k"], serve["tau"]) == (0.25, 2, 0.5)
    assert manifest["rank_fraction"] == pytest.approx(1 / 3) and manifest["build"]["eps"] == 0.3
    assert "rank_fraction" not in serve and "eta" not in manifest["build"]  # build and serve settings apart
    assert manifest["ranks"] == {key: [f.rank for f in per_task] for key, per_task in model.factors.matrices.items()}
    assert set(manifest["files"]) == {"factors.safetensors", "heads.safetensors", "base.safetensors"}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())


def test_checksum_mismatch_refused_naming_file(tmp_path):
    save_artifact(built(), tmp_path / "art")
    path = tmp_path / "art" / "heads.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MassMergeError, match=r"heads\.safetensors: checksum mismatch"):
        load(tmp_path / "art", base_model=ToyEncoder(), pool=mean_pool())


def test_missing_file_refused_naming_file(tmp_path):
    save_artifact(built(), tmp_path / "art")
    (tmp_path / "art" / "factors.safetensors").unlink()
    with pytest.raises(MassMergeError, match=r"factors\.safetensors: missing"):
        load(tmp_path / "art", base_model=ToyEncoder(), pool=mean_pool())


@pytest.mark.parametrize("version", [3, 0, None, "1"])
def test_unknown_format_version_refused(tmp_path, version):
    save_artifact(built(), tmp_path / "art")
    manifest_path = tmp_path / "art" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = version
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(MassMergeError, match="format_version .* is not supported"):
        load(tmp_path / "art", base_model=ToyEncoder())


def test_not_an_artifact_and_bad_manifest(tmp_path):
    with pytest.raises(MassMergeError, match="no such artifact"):
        load(tmp_path / "nope", base_model=ToyEncoder())
    (tmp_path / "empty").mkdir()
    with pytest.raises(MassMergeError, match="manifest.json: missing"):
        load(tmp_path / "empty", base_model=ToyEncoder())
    save_artifact(built(), tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    del manifest["task_names"]
    (tmp_path / "art" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MassMergeError, match="invalid manifest field 'task_names'"):
        load(tmp_path / "art", base_model=ToyEncoder())


def test_generic_artifact_needs_base_model_of_the_right_shape(tmp_path):
    save_artifact(built(), tmp_path / "art")
    with pytest.raises(OptionError, match="base_model"):
        load(tmp_path / "art")
    with pytest.raises(MassMergeError, match="does not match"):
        load(tmp_path / "art", base_model=torch.nn.Linear(3, 3))


def test_failed_write_leaves_previous_artifact_and_no_temp(tmp_path, monkeypatch):
    save_artifact(built(seed=0), tmp_path / "art")
    before = {p.name: p.read_bytes() for p in (tmp_path / "art").iterdir()}

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifact.save, "_file_entries", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_artifact(built(seed=1), tmp_path / "art")
    assert {p.name: p.read_bytes() for p in (tmp_path / "art").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_overwrite_replaces_artifact_but_refuses_foreign_directory(tmp_path):
    save_artifact(built(seed=0), tmp_path / "art")
    save_artifact(built(seed=1, num_tasks=3), tmp_path / "art")
    assert artifact.read_manifest(tmp_path / "art").task_names == ["task0", "task1", "task2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OptionError, match="not a massmerge artifact"):
        save_artifact(built(), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_base_by_reference(tmp_path):
    model = built()
    save_state_dict(model.model.state_dict(), tmp_path / "base.safetensors")
    save_artifact(model, tmp_path / "art", base_reference=tmp_path / "base.safetensors")
    assert not (tmp_path / "art" / "base.safetensors").exists()
    loaded = load(tmp_path / "art", base_model=ToyEncoder(), pool=mean_pool())
    assert_same_outputs(model, loaded, make_batch(6))
    other = {k: v + 1 for k, v in model.model.state_dict().items()}
    save_state_dict(other, tmp_path / "base.safetensors")
    with pytest.raises(MassMergeError, match="base.safetensors: checksum mismatch"):
        load(tmp_path / "art", base_model=ToyEncoder())


def data_bytes(path: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(str(path)).values())


def test_factor_storage_dtype_and_size(tmp_path):
    """Default storage is float16 for a float32 base: factors take half the bytes of float32 ones."""
    model = built(dtype=torch.float16)
    save_artifact(model, tmp_path / "half")
    save_artifact(model, tmp_path / "full", factor_dtype=torch.float32)
    half, full = data_bytes(tmp_path / "half" / "factors.safetensors"), data_bytes(tmp_path / "full" / "factors.safetensors")
    assert half < 0.6 * full  # U, V and deltas halve; s stays float32
    assert storage.storage_dtype(torch.bfloat16) == torch.bfloat16
    assert storage.storage_dtype(torch.float32) == torch.float16
    with pytest.raises(OptionError, match="--factor-dtype"):
        save_artifact(model, tmp_path / "x", factor_dtype="int3")


def test_task_names_with_slash_refused(tmp_path):
    model = built()
    model.factors.task_names[0] = "a/b"
    with pytest.raises(OptionError, match="a/b"):
        save_artifact(model, tmp_path / "art")


# ----- heads files ---------------------------------------------------------------------------------------------

def test_head_file_round_trip(tmp_path):
    zs = ZeroShotHead(torch.randn(3, 8), 42.0)
    write_head_file(tmp_path / "zs.safetensors", zs, task="topics", class_names=["a", "b", "c"])
    head, task, names = read_head_file(tmp_path / "zs.safetensors")
    assert isinstance(head, ZeroShotHead) and head.logit_scale == 42.0 and task == "topics" and names == ["a", "b", "c"]
    x = torch.randn(4, 8)
    assert torch.allclose(head(x), zs(x), atol=1e-6)
    lin = LinearHead(torch.randn(2, 8), torch.randn(2))
    write_head_file(tmp_path / "lin.safetensors", lin)
    head, task, names = read_head_file(tmp_path / "lin.safetensors")
    assert isinstance(head, LinearHead) and task is None and names is None
    assert torch.equal(head(x), lin(x))


def test_bad_head_files_refused(tmp_path):
    save_state_dict({"w": torch.zeros(2, 2)}, tmp_path / "no_weight.safetensors")
    with pytest.raises(MassMergeError, match="no_weight.safetensors: a heads file needs"):
        read_head_file(tmp_path / "no_weight.safetensors")
    save_state_dict({"weight": torch.zeros(2, 2)}, tmp_path / "names.safetensors", metadata={"class_names": '["x"]'})
    with pytest.raises(MassMergeError, match="class_names"):
        read_head_file(tmp_path / "names.safetensors")
    save_state_dict({"weight": torch.zeros(2, 2)}, tmp_path / "kind.safetensors", metadata={"kind": "svm"})
    with pytest.raises(MassMergeError, match="kind 'svm'"):
        read_head_file(tmp_path / "kind.safetensors")


# ----- CLI on a tiny HF text model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
    """A tiny BERT base with a word-level tokenizer, 3 perturbed experts and their heads files."""
    pytest.importorskip("transformers")
    root = write_tiny_bert_zoo(tmp_path_factory.mktemp("hf"))
    (root / "inputs.txt").write_text("w1 w2 cat\nspam spam w3\n\nmat w9 w10 w11\nw5\n")
    return root


def run_cli(args: list[str]) -> None:
    """Run ``massmerge ARGS`` in-process; a clean exit returns, an error exit raises SystemExit."""
    from massmerge.cli import main

    try:
        main(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


def test_cli_build_and_predict(hf_setup, tmp_path, capsys, monkeypatch):
    from massmerge import memory

    root = hf_setup
    tuned: list[str] = []  # build streams experts and fixes the mmap threshold; predict must not (25% of its time)
    monkeypatch.setattr(memory, "tune_allocator_for_streaming", lambda: tuned.append("tuned") or True)
    run_cli(["build", "--base", str(root / "base"), "--experts", *[str(root / f"expert{t}") for t in range(3)],
             "--heads", *[str(root / f"head{t}.safetensors") for t in range(3)], "--output", str(tmp_path / "art")])
    manifest = artifact.read_manifest(tmp_path / "art")
    assert manifest.architecture.adapter == "text" and manifest.task_names == ["t0", "t1", "t2"]
    layers = manifest.serve.routing_layers  # text default: every linear layer before the routing layer, then it
    assert layers[-1] == "encoder.layer.3.intermediate.dense" and layers[0] == "encoder.layer.0.attention.self.query"
    assert len(layers) == 6 * 3 + 5 and manifest.serve.layer_combine == "ppca" and manifest.serve.pooling == "content"
    assert manifest.serve.max_length == 32  # the model's positions when the experts' length is not given
    assert (tmp_path / "art" / "model" / "vocab.txt").is_file()
    capsys.readouterr()
    assert tuned == ["tuned"]
    run_cli(["predict", str(tmp_path / "art"), str(root / "inputs.txt"), "--batch-size", "3"])
    assert tuned == ["tuned"]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in lines] == [1, 2, 4, 5]  # line numbers in the file (line 3 is blank)
    for r in lines:
        assert r["task"] in r["selected"] and r["class"].startswith(f"c{r['task'][1]}")
        assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-4)
    # predictions equal the loaded model's reference path on the same batch
    model = load(tmp_path / "art", strategy="reference")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "art" / "model"))
    texts = [t for t in (root / "inputs.txt").read_text().splitlines() if t.strip()]
    out = model(dict(tok(texts, padding=True, return_tensors="pt")))
    assert [manifest.task_names[t] for t in out.task.tolist()] == [r["task"] for r in lines]


def test_cli_errors_exit_2(hf_setup, tmp_path, capsys):
    root = hf_setup
    with pytest.raises(SystemExit) as exc:
        run_cli(["build", "--base", str(root / "base"), "--experts", str(root / "expert0"), str(root / "expert1"),
                 "--heads", str(root / "head0.safetensors"), "--output", str(tmp_path / "art")])
    assert exc.value.code == 2 and "error: --heads: 1 heads files for 2 experts" in capsys.readouterr().err
    shutil.copytree(root / "expert1", tmp_path / "bad")
    from massmerge.checkpoints import load_state_dict

    state = load_state_dict(tmp_path / "bad")
    state["embeddings.word_embeddings.weight"][0, 0] = float("nan")
    save_state_dict(state, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(SystemExit) as exc:
        run_cli(["build", "--base", str(root / "base"), "--experts", str(root / "expert0"), str(tmp_path / "bad"),
                 "--heads", str(root / "head0.safetensors"), str(root / "head1.safetensors"),
                 "--output", str(tmp_path / "art")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "NaN or Inf" in err and "bad" in err
    assert not (tmp_path / "art").exists()
    with pytest.raises(SystemExit) as exc:
        run_cli(["predict", str(tmp_path / "missing"), str(root / "inputs.txt")])
    assert exc.value.code == 2 and "no such artifact directory" in capsys.readouterr().err


def _size_factor(directory: Path) -> tuple[float, float]:
    """(rank scale from the manifest, saved factor + non-matrix + base tensor bytes / base tensor bytes)."""
    from massmerge.checkpoints import load_state_dict
    from massmerge.mass.budget import factor_bytes, non_matrix_bytes

    manifest = artifact.read_manifest(directory)
    base = sum(t.numel() * t.element_size() for t in load_state_dict(directory / "model").values())
    shapes = {k: list(v.shape) for k, v in load_state_dict(directory / "model").items()}
    factors = loader.load_factors(directory, manifest, shapes)
    store = getattr(torch, manifest.factor_dtype)
    return manifest.rank_scale, (base + factor_bytes(factors, store) + non_matrix_bytes(factors, store)) / base


def test_cli_build_fits_the_size_budget(hf_setup, tmp_path, capsys):
    root = hf_setup
    common = ["build", "--base", str(root / "base"), "--experts", *[str(root / f"expert{t}") for t in range(3)],
              "--heads", *[str(root / f"head{t}.safetensors") for t in range(3)], "--factor-dtype", "float32"]
    run_cli([*common, "--output", str(tmp_path / "design"), "--max-size", "0"])
    scale, design = _size_factor(tmp_path / "design")
    assert scale == 1.0 and design > 2.5, "float32 factors at design ranks: about 2.7x this tiny base"
    assert "design ranks (1/T)" in capsys.readouterr().out
    run_cli([*common, "--output", str(tmp_path / "fit"), "--max-size", "3.5"])  # headers are large for tiny models
    scale, fitted = _size_factor(tmp_path / "fit")
    assert 0.0 < scale < 1.0 and fitted < 3.5 - 0.1  # the budget also holds heads and headers
    line = capsys.readouterr().out
    assert "ranks cut to" in line and "cut to 100%" not in line
    run_cli([*common, "--output", str(tmp_path / "default")])  # default 2.1x is out of reach here: a note
    assert _size_factor(tmp_path / "default")[0] == 1.0
    assert "note: design ranks kept; --max-size: 2.1x the base cannot hold" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run_cli([*common, "--output", str(tmp_path / "tiny"), "--max-size", "2.1"])
    assert exc.value.code == 2 and "--max-size: 2.1x" in capsys.readouterr().err and not (tmp_path / "tiny").exists()


def test_cli_build_size_budget_holds_on_disk(hf_setup, tmp_path, capsys):
    """--max-size holds for the files build writes, with a base whose tokenizer files are 3x its weights: they
    count in the artifact and in the base's files alike, so a fit that leaves them out stays under budget."""
    import shutil

    from massmerge.artifact import artifact_bytes, base_file_bytes

    root = hf_setup
    base = shutil.copytree(root / "base", tmp_path / "base")
    (base / "sentencepiece.extra").write_bytes(bytes(150_000))  # a tokenizer-pattern file the artifact copies
    for max_size in ("3", "3.5"):
        out = tmp_path / f"art{max_size}"
        run_cli(["build", "--base", str(base), "--experts", *[str(root / f"expert{t}") for t in range(3)],
                 "--heads", *[str(root / f"head{t}.safetensors") for t in range(3)], "--factor-dtype", "float32",
                 "--max-size", max_size, "--output", str(out)])
        assert (out / "model" / "sentencepiece.extra").is_file()
        assert artifact_bytes(out) / base_file_bytes(out) <= float(max_size)
        assert "above" not in capsys.readouterr().out


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_cli_outputs_follow_the_umask(hf_setup, tmp_path, capsys, mask):
    """Artifacts are served by another account: files 0666 and directories 0777 less the umask (0644 / 0755
    under 022), not mkdtemp's private 0700; predict --output likewise."""
    import os
    import stat

    root = hf_setup
    old = os.umask(mask)
    try:
        run_cli(["build", "--base", str(root / "base"), "--experts", str(root / "expert0"), str(root / "expert1"),
                 "--heads", str(root / "head0.safetensors"), str(root / "head1.safetensors"),
                 "--output", str(tmp_path / "art")])
        run_cli(["predict", str(tmp_path / "art"), str(root / "inputs.txt"), "--output", str(tmp_path / "p.jsonl")])
    finally:
        os.umask(old)
    entries = [tmp_path / "art", *(tmp_path / "art").rglob("*")]
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in entries}
    assert {name: mode for name, mode in modes.items() if (tmp_path / name).is_dir()} == {
        "art": 0o777 & ~mask, "art/model": 0o777 & ~mask}
    assert all(mode == 0o666 & ~mask for name, mode in modes.items() if (tmp_path / name).is_file()), modes
    assert stat.S_IMODE((tmp_path / "p.jsonl").stat().st_mode) == 0o666 & ~mask


def test_router_paper_restores_the_papers_rule(hf_setup, tmp_path):
    """Text artifacts route on every layer before the routing layer with content pooling and PPCA scores by
    default; `--router paper` / load(router='paper') gives back the paper's rule exactly: the routing layer
    alone, the mean over non-padding tokens, standardized scores, the eta / K rule, max-logit heads."""
    from transformers import AutoTokenizer

    from massmerge.mass import router
    from massmerge.mass.pooling import masked_mean

    root = hf_setup
    run_cli(["build", "--base", str(root / "base"), "--experts", *[str(root / f"expert{t}") for t in range(3)],
             "--heads", *[str(root / f"head{t}.safetensors") for t in range(3)], "--output", str(tmp_path / "art")])
    paper = load(tmp_path / "art", router="paper")
    s = paper.settings
    layer = "encoder.layer.3.intermediate.dense"
    assert s.routing_layers == (layer,) and s.pooling == "mean" and s.layer_combine == "standardized"
    assert (s.eta, s.top_k, s.tau, s.mode, s.head_rule) == (0.2, 3, 1.0, "topk", "max_logit")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "art" / "model"))
    texts = [t for t in (root / "inputs.txt").read_text().splitlines() if t.strip()]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    out = paper(batch)
    z = masked_mean(paper.routing_activations(batch)[layer], batch["attention_mask"])  # independent of pool()
    probs, selected = router.select(router.residuals(z, paper.factors.routing_basis(f"{layer}.weight")))
    assert torch.allclose(out.probs, probs) and torch.equal(out.selected, selected)
    default = load(tmp_path / "art")
    assert default.settings.routing_layers[-1] == layer and len(default.settings.routing_layers) > 1
    assert (default.settings.pooling, default.settings.layer_combine) == ("content", "ppca")


def test_cli_build_notes_experts_the_router_cannot_tell_apart(hf_setup, tmp_path, capsys):
    """An expert equal to the base and two copies of one expert build, with one note line naming them."""
    root = hf_setup
    experts = [str(root / "base"), str(root / "expert1"), str(root / "expert1"), str(root / "expert2")]
    heads = [str(root / f"head{t}.safetensors") for t in (0, 1, 1, 2)]
    names = ["zero", "copy_a", "copy_b", "other"]
    run_cli(["build", "--base", str(root / "base"), "--experts", *experts, "--heads", *heads,
             "--task-names", *names, "--output", str(tmp_path / "art"), "--max-size", "0"])
    notes = [line for line in capsys.readouterr().err.splitlines() if "cannot tell them apart" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ")
    assert "of zero are all zero" in notes[0] and "copy_a = copy_b" in notes[0] and "other" not in notes[0]


def test_cli_build_of_distinct_experts_has_no_such_note(hf_setup, tmp_path, capsys):
    root = hf_setup
    run_cli(["build", "--base", str(root / "base"), "--experts", *[str(root / f"expert{t}") for t in range(3)],
             "--heads", *[str(root / f"head{t}.safetensors") for t in range(3)], "--output", str(tmp_path / "art"),
             "--max-size", "0"])
    assert "cannot tell them apart" not in capsys.readouterr().err


# ----- a load-save round trip keeps everything -------------------------------------------------------------------

def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_artifact(first: Path, second: Path) -> None:
    """Equal manifests (less checksums) and bit-identical tensors in every safetensors file."""
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (first, second))
    assert set(a["files"]) == set(b["files"])
    for manifest in (a, b):
        manifest["files"] = sorted(manifest["files"])
    assert a == b
    for name in a["files"]:
        if name.endswith(".safetensors"):
            left, right = _tensors(first / name), _tensors(second / name)
            assert left.keys() == right.keys(), name
            for key in left:
                assert left[key].dtype == right[key].dtype and torch.equal(left[key], right[key]), (name, key)


def sharded_base(base: Path, out: Path) -> Path:
    """``base`` saved again by transformers in shards (``max_shard_size``), its other files as they were."""
    import transformers

    transformers.AutoModel.from_pretrained(base).save_pretrained(out, max_shard_size="4KB")
    for file in base.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copyfile(file, out / file.name)
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    return out


@pytest.mark.parametrize("sharded", [False, True])
def test_save_of_a_loaded_adapter_artifact_writes_it_again(hf_setup, tmp_path, sharded):
    """``save_artifact(load(x))`` keeps class names, the adapter and its options, serve and build settings (a
    size-budget cut: rank scale below 1), the tokenizer and a sharded base's shards: the same artifact, byte for
    byte."""
    root = hf_setup
    base = sharded_base(root / "base", tmp_path / "sharded") if sharded else root / "base"
    run_cli(["build", "--base", str(base), "--experts", *[str(root / f"expert{t}") for t in range(3)],
             "--heads", *[str(root / f"head{t}.safetensors") for t in range(3)], "--output", str(tmp_path / "art"),
             "--max-size", "3.5", "--factor-dtype", "float32", "--eps", "0.5", "--pooling", "mean", "--max-length", "20"])
    first = artifact.read_manifest(tmp_path / "art")
    assert first.rank_scale < 1.0 and first.heads[0].class_names == ["c00", "c01", "c02"]
    shards = [name for name in first.files if name.startswith("model/model-")]
    assert first.base.file == ("model/model.safetensors.index.json" if sharded else "model/model.safetensors")
    assert (len(shards) > 1) == sharded
    save_artifact(load(tmp_path / "art"), tmp_path / "again")
    assert_same_artifact(tmp_path / "art", tmp_path / "again")
    for name in first.files:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "art" / name).read_bytes(), name
    again = load(tmp_path / "again")
    assert again.adapter.name == "text" and again.class_names == [h.class_names for h in first.heads]


def test_save_of_a_loaded_generic_artifact_keeps_build_settings_and_class_names(tmp_path):
    base, factors, heads, cfg = make_parts(3)
    model = MASSModel(base, round_factors(factors, torch.float16), heads, cfg, pool=mean_pool(),
                      class_names=[[f"c{t}{i}" for i in range(h.num_classes)] for t, h in enumerate(heads)])
    from massmerge.mass.config import BuildSettings

    save_artifact(model, tmp_path / "art", build=BuildSettings(eps=0.3, svd="randomized", max_size=3.0), rank_scale=0.5)
    loaded = load(tmp_path / "art", base_model=ToyEncoder(), pool=mean_pool())
    save_artifact(loaded, tmp_path / "again")
    assert_same_artifact(tmp_path / "art", tmp_path / "again")
    manifest = artifact.read_manifest(tmp_path / "again")
    assert manifest.build.svd == "randomized" and manifest.rank_scale == 0.5 and manifest.heads[0].class_names
