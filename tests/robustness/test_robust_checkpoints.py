"""Broken and mismatched checkpoints through every entry point: one-line error naming the culprit, exit 2,
no traceback, and no output written (a previous valid output left byte-identical)."""

from __future__ import annotations

import pytest
import torch
from robust_helpers import Zoo, assert_user_error, digest, leftovers, run_cli

from massmerge import merging
from massmerge.checkpoints import (
    check_finite,
    load_state_dict,
    open_checkpoint,
    validate_compatible,
)
from massmerge.errors import MassMergeError
from massmerge.mass import ExpertFactors
from massmerge.task_vectors import CheckedTaskVector, task_vector

# (zoo attribute, words the error line must contain besides the file name)
BAD_EXPERTS = [
    ("extra_key", ["extra.weight"]),
    ("missing_key", ["l2.weight"]),
    ("bad_shape", ["l1.weight", "shape"]),
    ("fp16", ["dtype"]),
    ("bf16", ["dtype"]),
    ("nan", ["l1.weight", "NaN"]),
    ("inf", ["l1.bias", "Inf"]),
    ("empty", ["empty"]),
    ("truncated", []),
    ("truncated_tail", []),
    ("garbage", []),
    ("evil_named", []),
    ("not_a_model", ["HF model"]),
    ("bad_index", []),
]
UNREADABLE = ["empty", "truncated", "truncated_tail", "garbage", "evil_named", "not_a_model", "bad_index"]
METHODS = ["tsv_m", "task_arithmetic"]


def merge_args(zoo: Zoo, base, experts, output, method: str = "tsv_m") -> list:
    return ["merge", "--method", method, "--base", base, "--experts", *experts, "--output", output]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("name", "words"), BAD_EXPERTS)
def test_merge_refuses_bad_expert(zoo: Zoo, tmp_path, capsys, name, words, method) -> None:
    bad = getattr(zoo, name)
    output = tmp_path / "merged.safetensors"
    result = run_cli(merge_args(zoo, zoo.base, [zoo.e1, bad], output, method), capsys)
    assert_user_error(result, str(bad), *words)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("name", "words"), [(n, w) for n, w in BAD_EXPERTS if n in UNREADABLE or n in ("nan", "inf")])
def test_merge_refuses_bad_base(zoo: Zoo, tmp_path, capsys, name, words) -> None:
    bad = getattr(zoo, name)
    output = tmp_path / "merged.safetensors"
    result = run_cli(merge_args(zoo, bad, [zoo.e1, zoo.e2], output), capsys)
    assert_user_error(result, str(bad), *words)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("name", "words"), BAD_EXPERTS)
def test_merge_failure_keeps_previous_output(zoo: Zoo, tmp_path, capsys, name, words) -> None:
    output = tmp_path / "merged.safetensors"
    ok = run_cli(merge_args(zoo, zoo.base, [zoo.e1, zoo.e2], output), capsys)
    assert ok.code == 0, ok.err
    before = digest(output)
    result = run_cli(merge_args(zoo, zoo.base, [zoo.e1, getattr(zoo, name)], output), capsys)
    assert_user_error(result, str(getattr(zoo, name)), *words)
    assert digest(output) == before
    assert leftovers(tmp_path, keep=[output]) == []


def test_merge_missing_file_named(zoo: Zoo, tmp_path, capsys) -> None:
    missing = tmp_path / "nope.safetensors"
    result = run_cli(merge_args(zoo, zoo.base, [zoo.e1, missing], tmp_path / "o.safetensors"), capsys)
    assert_user_error(result, str(missing), "no such file")


def test_merge_output_is_an_input(zoo: Zoo, tmp_path, capsys) -> None:
    before = digest(zoo.e2)
    result = run_cli(merge_args(zoo, zoo.base, [zoo.e1, zoo.e2], zoo.e2), capsys)
    assert_user_error(result, "--output")
    assert digest(zoo.e2) == before


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_mixed_precision_base_refused_naming_both_dtypes(zoo: Zoo, tmp_path, capsys, name) -> None:
    """An fp32 base with a half-precision expert is refused (not silently upcast): the line names the dtypes."""
    result = run_cli(merge_args(zoo, zoo.base, [zoo.e1, getattr(zoo, name)], tmp_path / "o.safetensors"), capsys)
    line = assert_user_error(result, str(getattr(zoo, name)))
    assert "float32" in line and ("float16" in line or "bfloat16" in line)


@pytest.mark.parametrize("method", sorted(merging.MERGE_METHODS))
def test_consistent_bf16_models_are_handled(zoo: Zoo, tmp_path, capsys, method) -> None:
    """All-bf16 base and experts merge fine, output in bf16 with finite values."""
    output = tmp_path / "o.safetensors"
    extra = ["--task", "0"] if method == "tsv_c" else []
    result = run_cli([*merge_args(zoo, zoo.base_bf16, [zoo.e1_bf16, zoo.e2_bf16], output, method), *extra], capsys)
    assert result.code == 0, result.err
    merged = load_state_dict(output)
    assert merged["l1.weight"].dtype == torch.bfloat16
    assert merged["steps"].dtype == torch.int64 and merged["steps"].tolist() == [3]
    assert all(bool(torch.isfinite(v.float()).all()) for v in merged.values())


@pytest.mark.parametrize(("name", "words"), [(n, w) for n, w in BAD_EXPERTS if n in UNREADABLE])
def test_info_refuses_unreadable(zoo: Zoo, capsys, name, words) -> None:
    bad = getattr(zoo, name)
    assert_user_error(run_cli(["info", bad], capsys), str(bad), *words)


def test_info_missing_path(tmp_path, capsys) -> None:
    assert_user_error(run_cli(["info", tmp_path / "absent"], capsys), "absent")


# ----- Python entry points --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", UNREADABLE + ["evil", "evil_hf"])
def test_load_and_open_raise_user_error_naming_file(zoo: Zoo, name) -> None:
    bad = getattr(zoo, name)
    for loader in (load_state_dict, open_checkpoint):
        with pytest.raises(MassMergeError) as info:
            loader(bad)
        message = str(info.value)
        assert bad.name in message and "\n" not in message


@pytest.mark.parametrize(("name", "key"), [("extra_key", "extra.weight"), ("missing_key", "l2.weight"),
                                           ("bad_shape", "l1.weight"), ("fp16", "l1"), ("bf16", "l1")])
def test_validate_compatible_names_file_and_key(zoo: Zoo, name, key) -> None:
    base = load_state_dict(zoo.base)
    for other in (load_state_dict(getattr(zoo, name)), open_checkpoint(getattr(zoo, name))):
        with pytest.raises(MassMergeError, match=key) as info:
            validate_compatible(base, other, name=str(getattr(zoo, name)))
        assert name in str(info.value)


@pytest.mark.parametrize(("name", "key"), [("nan", "l1.weight"), ("inf", "l1.bias")])
def test_check_finite_names_key(zoo: Zoo, name, key) -> None:
    for state in (load_state_dict(getattr(zoo, name)), open_checkpoint(getattr(zoo, name))):
        with pytest.raises(MassMergeError, match=key):
            check_finite(state, name=name)


def _tvs(zoo: Zoo, bad: str | None = None, *, lazy: bool = False) -> tuple[dict, list]:
    base = load_state_dict(zoo.base)
    paths = [zoo.e1, getattr(zoo, bad) if bad else zoo.e2]
    if lazy:
        return base, [CheckedTaskVector(base, open_checkpoint(p)) for p in paths]
    return base, [task_vector(base, load_state_dict(p)) for p in paths]


def _opts(method: str) -> dict:
    return {"task": 1} if method == "tsv_c" else {}


@pytest.mark.parametrize("method", sorted(merging.MERGE_METHODS))
@pytest.mark.parametrize(("bad", "key"), [("nan", "l1.weight"), ("inf", "l1.bias")])
def test_python_merge_refuses_non_finite_task_vector(zoo: Zoo, method, bad, key) -> None:
    """merging.merge must not return NaN weights or raise a raw linalg error on a non-finite task vector."""
    base, tvs = _tvs(zoo, bad)
    with pytest.raises(MassMergeError, match=key):
        merging.merge(method, base, tvs, **_opts(method))


@pytest.mark.parametrize("method", sorted(merging.MERGE_METHODS))
def test_python_merge_refuses_shape_mismatch(zoo: Zoo, method) -> None:
    base, tvs = _tvs(zoo)
    tvs[1] = dict(tvs[1])
    tvs[1]["l2.weight"] = torch.zeros(4, 7)
    with pytest.raises(MassMergeError, match="l2.weight"):
        merging.merge(method, base, tvs, **_opts(method))


@pytest.mark.parametrize("method", sorted(merging.MERGE_METHODS))
def test_python_merge_refuses_different_keys(zoo: Zoo, method) -> None:
    base, tvs = _tvs(zoo)
    tvs[1] = {k: v for k, v in tvs[1].items() if k != "l2.weight"}
    with pytest.raises(MassMergeError, match="l2.weight"):
        merging.merge(method, base, tvs, **_opts(method))


@pytest.mark.parametrize(("bad", "key"), [("nan", "l1.weight"), ("inf", "l1.bias")])
def test_expert_factors_refuse_non_finite(zoo: Zoo, bad, key) -> None:
    _, tvs = _tvs(zoo, bad)
    with pytest.raises(MassMergeError, match=key):
        ExpertFactors.build(iter(tvs), ["a", "b"])


def test_expert_factors_refuse_shape_mismatch(zoo: Zoo) -> None:
    _, tvs = _tvs(zoo)
    tvs[1] = dict(tvs[1])
    tvs[1]["l2.weight"] = torch.zeros(4, 7)
    with pytest.raises(MassMergeError, match="l2.weight"):
        ExpertFactors.build(iter(tvs), ["a", "b"])


def test_expert_factors_refuse_different_keys(zoo: Zoo) -> None:
    _, tvs = _tvs(zoo)
    tvs[1] = {k: v for k, v in tvs[1].items() if k != "l2.weight"}
    with pytest.raises(MassMergeError):
        ExpertFactors.build(iter(tvs), ["a", "b"])
