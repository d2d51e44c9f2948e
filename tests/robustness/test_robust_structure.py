"""Structural validation at ``load``, before any forward, on artifacts whose checksums were fixed up.

An attacker (or a buggy tool) that edits a tensor also re-hashes it, so the checksums pass: each case below edits
a real copy of a built artifact, re-hashes every file (``rehash``) and expects one ``MassMergeError`` line that
names the artifact file and the field or tensor, from ``load`` and from ``massmerge predict`` (exit 2, no
traceback, no output written).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from robust_helpers import (
    assert_cli_error,
    copy_artifact,
    edit_manifest,
    edit_tensors,
    load_error,
    read_manifest_json,
    rehash,
    run_cli,
)

pytest.importorskip("transformers")

KEY = "encoder.layer.0.attention.self.query.weight"  # a 32 x 32 matrix of the tiny BERT
FACTOR = f"factors/t1/{KEY}"


def _rank(art: Path) -> int:
    return int(read_manifest_json(art)["ranks"][KEY][0])


def tensors(name: str, edit: Callable[[dict, Path], object]) -> Callable[[Path], None]:
    """An edit of one safetensors file of the artifact."""
    return lambda art: edit_tensors(art, name, lambda t: edit(t, art))


def manifest(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda art: edit_manifest(art, edit)


def raw_manifest(pattern: str, new: str) -> Callable[[Path], None]:
    """A textual edit, the first match of the regex ``pattern`` (for literals such as NaN that a strict JSON
    writer would not produce)."""
    def apply(art: Path) -> None:
        text = (art / "manifest.json").read_text()
        assert re.search(pattern, text), pattern
        (art / "manifest.json").write_text(re.sub(pattern, new, text, count=1))
    return apply


def _head(index: int, **fields) -> Callable[[dict], None]:
    return lambda m: m["heads"][index].update(**fields)


def _names(names: list[str]) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m["task_names"] = names
        for head, name in zip(m["heads"], names):
            head["task"] = name
    return edit


# (id, edit, culprits the one error line must name)
CASES = [
    # factors: shape against the model parameter and the recorded rank, finite floating values
    ("U_wrong_shape", tensors("factors.safetensors", lambda t, a: t.update(
        {f"{FACTOR}/U": torch.zeros(32, _rank(a) - 1, dtype=torch.float16)})), ["factors.safetensors", f"{FACTOR}/U"]),
    ("U_transposed", tensors("factors.safetensors", lambda t, a: t.update(
        {f"{FACTOR}/U": t[f"{FACTOR}/U"].T.contiguous()})), ["factors.safetensors", f"{FACTOR}/U", "shape"]),
    ("V_wrong_width", tensors("factors.safetensors", lambda t, a: t.update(
        {f"{FACTOR}/V": torch.zeros(31, _rank(a), dtype=torch.float16)})), ["factors.safetensors", f"{FACTOR}/V"]),
    ("s_nan", tensors("factors.safetensors", lambda t, a: t[f"{FACTOR}/s"].__setitem__(0, float("nan"))),
     ["factors.safetensors", f"{FACTOR}/s", "finite"]),
    ("U_inf", tensors("factors.safetensors", lambda t, a: t[f"{FACTOR}/U"].__setitem__((0, 0), float("inf"))),
     ["factors.safetensors", f"{FACTOR}/U", "finite"]),
    ("s_integer", tensors("factors.safetensors", lambda t, a: t.update(
        {f"{FACTOR}/s": torch.ones(_rank(a), dtype=torch.int32)})), ["factors.safetensors", f"{FACTOR}/s"]),
    ("factor_missing", tensors("factors.safetensors", lambda t, a: t.pop(f"{FACTOR}/V")),
     ["factors.safetensors", f"{FACTOR}/V", "missing"]),
    ("factor_unlisted", tensors("factors.safetensors", lambda t, a: t.update({"junk": torch.zeros(3)})),
     ["factors.safetensors", "junk"]),
    ("non_matrix_shape", tensors("factors.safetensors", lambda t, a: t.update(
        {"non_matrix/t1/encoder.layer.0.output.dense.bias": torch.zeros(31, dtype=torch.float16)})),
     ["factors.safetensors", "non_matrix/t1/encoder.layer.0.output.dense.bias"]),
    ("rank_huge", manifest(lambda m: m["ranks"][KEY].__setitem__(0, 10**9)), ["manifest.json", f"ranks.{KEY}"]),
    ("rank_off_by_one", manifest(lambda m: m["ranks"][KEY].__setitem__(0, m["ranks"][KEY][0] - 1)),
     ["factors.safetensors", f"{FACTOR}/U"]),
    ("rank_negative", manifest(lambda m: m["ranks"][KEY].__setitem__(0, -1)), ["manifest.json", f"ranks.{KEY}"]),
    ("rank_count", manifest(lambda m: m["ranks"][KEY].append(1)), ["manifest.json", f"ranks.{KEY}"]),
    ("ranks_unknown_key", manifest(lambda m: m["ranks"].update({"nope.weight": [1, 1]})),
     ["manifest.json", "nope.weight"]),
    ("ranks_not_a_matrix", manifest(lambda m: m["ranks"].update({"encoder.layer.0.output.dense.bias": [1, 1]})),
     ["manifest.json", "ranks.encoder.layer.0.output.dense.bias"]),
    # heads: width against the features, rows against num_classes, finite values, class names
    ("head_width", tensors("heads.safetensors", lambda t, a: t.update({"heads/t1/weight": torch.randn(3, 31)})),
     ["heads.safetensors", "heads/t1/weight", "31"]),
    ("head_zero_rows", tensors("heads.safetensors", lambda t, a: t.update({"heads/t1/weight": torch.randn(0, 32)})),
     ["heads.safetensors", "heads/t1/weight"]),
    ("head_nan", tensors("heads.safetensors", lambda t, a: t["heads/t1/weight"].__setitem__((1, 2), float("nan"))),
     ["heads.safetensors", "heads/t1/weight", "finite"]),
    ("head_unlisted", tensors("heads.safetensors", lambda t, a: t.update({"heads/t1/bias": torch.zeros(3)})),
     ["heads.safetensors", "heads/t1/bias"]),
    ("num_classes_wrong", manifest(_head(0, num_classes=4)), ["heads.safetensors", "heads/t1/weight", "4 classes"]),
    ("num_classes_zero", manifest(_head(0, num_classes=0)), ["manifest.json", "heads.0.num_classes"]),
    ("class_names_short", manifest(_head(0, class_names=["a"])), ["manifest.json", "heads.t1.class_names"]),
    ("class_names_long", manifest(_head(0, class_names=["a", "b", "c", "d"])),
     ["manifest.json", "heads.t1.class_names"]),
    ("logit_scale_nan", raw_manifest('"logit_scale": 50.0', '"logit_scale": NaN'),
     ["manifest.json", "heads.t1.logit_scale"]),
    ("logit_scale_inf", raw_manifest('"logit_scale": 50.0', '"logit_scale": Infinity'),
     ["manifest.json", "heads.t1.logit_scale"]),
    ("logit_scale_negative", manifest(_head(0, logit_scale=-50.0)), ["manifest.json", "heads.t1.logit_scale"]),
    ("logit_scale_zero", manifest(_head(1, logit_scale=0.0)), ["manifest.json", "heads.t2.logit_scale"]),
    ("logit_scale_missing", manifest(_head(1, logit_scale=None)), ["manifest.json", "heads.t2.logit_scale"]),
    ("head_kind", manifest(_head(0, kind="magic")), ["manifest.json", "heads.0.kind"]),
    # task names and de-redundancy indices
    ("task_names_duplicate", manifest(_names(["t1", "t1"])), ["manifest.json", "task_names"]),
    ("task_names_empty_list", manifest(lambda m: m.update(task_names=[], heads=[])), ["manifest.json", "task_names"]),
    ("task_name_empty", manifest(_names(["t1", ""])), ["manifest.json", "task_names"]),
    ("task_name_slash", manifest(_names(["t1", "a/b"])), ["manifest.json", "task_names"]),
    ("heads_out_of_order", manifest(lambda m: m["heads"].reverse()), ["manifest.json", "heads"]),
    ("accepted_out_of_range", manifest(lambda m: m["accepted"].update({KEY: [0, 2]})),
     ["manifest.json", f"accepted.{KEY}"]),
    ("accepted_negative", manifest(lambda m: m["accepted"].update({KEY: [-1]})), ["manifest.json", f"accepted.{KEY}"]),
    ("accepted_duplicate", manifest(lambda m: m["accepted"].update({KEY: [0, 0]})), ["manifest.json", f"accepted.{KEY}"]),
    ("accepted_empty", manifest(lambda m: m["accepted"].update({KEY: []})), ["manifest.json", f"accepted.{KEY}"]),
    ("accepted_unknown_key", manifest(lambda m: m["accepted"].update({"nope.weight": [0]})),
     ["manifest.json", "accepted.nope.weight"]),
    # build and serve settings
    ("rank_fraction_negative", manifest(lambda m: m.update(rank_fraction=-0.5)), ["manifest.json", "rank_fraction"]),
    ("rank_fraction_above_one", manifest(lambda m: m.update(rank_fraction=1.5)), ["manifest.json", "rank_fraction"]),
    ("build_rank_fraction_negative", manifest(lambda m: m["build"].update(rank_fraction=-0.5)),
     ["manifest.json", "build.rank_fraction"]),
    ("rank_scale_nan", raw_manifest(r'"rank_scale": [0-9.e-]+', '"rank_scale": NaN'), ["manifest.json", "rank_scale"]),
    ("eps_negative", manifest(lambda m: m["build"].update(eps=-0.1)), ["manifest.json", "build.eps"]),
    ("eta_nan", raw_manifest('"eta": 0.2', '"eta": NaN'), ["manifest.json", "serve.eta"]),
    ("tau_inf", raw_manifest('"tau": 1.0', '"tau": Infinity'), ["manifest.json", "serve.tau"]),
    ("top_k_zero", manifest(lambda m: m["serve"].update(top_k=0)), ["manifest.json", "serve.top_k"]),
    ("max_length_negative", manifest(lambda m: m["serve"].update(max_length=-5)), ["manifest.json", "serve.max_length"]),
    ("batch_size_zero", manifest(lambda m: m["serve"].update(batch_size=0)), ["manifest.json", "serve.batch_size"]),
    ("routing_layer_unknown", manifest(lambda m: m["serve"].update(routing_layers=["encoder.nope"])),
     ["manifest.json", "serve.routing_layers", "encoder.nope"]),
    ("routing_layer_not_linear", manifest(lambda m: m["serve"].update(routing_layers=["embeddings.word_embeddings"])),
     ["manifest.json", "serve.routing_layers"]),
    ("routing_layers_empty", manifest(lambda m: m["serve"].update(routing_layers=[])),
     ["manifest.json", "serve.routing_layers"]),
    ("factor_dtype_unknown", manifest(lambda m: m.update(factor_dtype="int3")), ["manifest.json", "factor_dtype"]),
    ("base_dtype_unknown", manifest(lambda m: m["base"].update(dtype="evil")), ["manifest.json", "base.dtype"]),
    ("adapter_unknown", manifest(lambda m: m["architecture"].update(adapter="evil")),
     ["manifest.json", "architecture", "evil"]),
    ("adapter_option_unknown", manifest(lambda m: m["architecture"]["options"].update(trust_remote_code=True)),
     ["manifest.json", "architecture.options.trust_remote_code"]),
    ("adapter_option_bad", manifest(lambda m: m["architecture"]["options"].update(feature_pooling="evil")),
     ["manifest.json", "architecture.options.feature_pooling"]),
    ("special_ids_negative", manifest(lambda m: m["architecture"]["options"].update(special_ids=[-1])),
     ["manifest.json", "architecture.options.special_ids"]),
    # the base weights inside model/
    ("base_nan", tensors("model/model.safetensors", lambda t, a: t["encoder.layer.1.output.dense.weight"]
                         .__setitem__((0, 0), float("nan"))),
     ["model/model.safetensors", "encoder.layer.1.output.dense.weight", "NaN"]),
    ("base_extra_tensor", tensors("model/model.safetensors", lambda t, a: t.update({"evil.weight": torch.zeros(2)})),
     ["model/model.safetensors", "evil.weight", "model/config.json"]),
    ("base_missing_tensor", tensors("model/model.safetensors", lambda t, a: t.pop("pooler.dense.weight")),
     ["model/model.safetensors", "pooler.dense.weight"]),
]


def _edited(artifact: Path, tmp_path: Path, edit: Callable[[Path], None]) -> Path:
    art = copy_artifact(artifact, tmp_path / "art")
    edit(art)
    rehash(art)
    return art


@pytest.mark.parametrize(("name", "edit", "culprits"), CASES, ids=[c[0] for c in CASES])
def test_load_refuses_fixed_up_artifact(artifact, tmp_path, name, edit, culprits) -> None:
    message = load_error(_edited(artifact, tmp_path, edit))
    for culprit in culprits:
        assert culprit in message, f"{culprit!r} not named in: {message}"
    assert "--" not in message.split(": ", 1)[1].split(" (")[0], f"a manifest problem blamed on a flag: {message}"


CLI_CASES = ["U_transposed", "s_nan", "rank_huge", "head_width", "head_zero_rows", "class_names_short",
             "num_classes_wrong", "task_names_duplicate", "task_names_empty_list", "accepted_out_of_range",
             "logit_scale_nan", "rank_fraction_negative", "routing_layer_unknown", "top_k_zero", "base_nan"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_predict_refuses_fixed_up_artifact(artifact, tmp_path, capsys, name) -> None:
    """The same refusals through ``massmerge predict``: the field is blamed, never a flag the user did not pass."""
    _, edit, culprits = next(c for c in CASES if c[0] == name)
    art = _edited(artifact, tmp_path, edit)
    inputs, out = tmp_path / "in.txt", tmp_path / "preds.jsonl"
    inputs.write_text("w1 w2\nw3\n")
    line = assert_cli_error(run_cli(["predict", art, inputs, "--output", out], capsys), *culprits)
    assert "--top-k" not in line and "--routing-layer" not in line and "--heads" not in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["art", "in.txt"]


def test_the_unedited_copy_loads(artifact, tmp_path) -> None:
    """The edits above are the only difference: an untouched, re-hashed copy loads and predicts."""
    from massmerge.artifact import load

    model = load(_edited(artifact, tmp_path, lambda art: None))
    assert model.factors.task_names == ["t1", "t2"]
