"""``massmerge build`` checks every heads file, expert path, option and the base's config before the first SVD.

Each refusal must come before any expert is factorized (the stream is patched to fail the test if it starts):
on MiniLM one expert takes minutes, so a typo in the last argument must not cost them. Heads files are real
safetensors files with the broken field; the base with ``auto_map`` is a real HF directory whose modelling file
would create a marker if it ever ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from robust_helpers import assert_cli_error, build_args, leftovers, run_cli
from safetensors.torch import save_file

pytest.importorskip("transformers")


@pytest.fixture
def no_factorizing(monkeypatch):
    """Fail the test if build reaches the SVD stream (every check must come first)."""
    from massmerge.mass import stream

    def refuse(*args, **kwargs):
        raise AssertionError("experts were factorized before the inputs were checked")

    monkeypatch.setattr(stream, "build_factors", refuse)


def _head(path: Path, weight: torch.Tensor, **meta: str) -> Path:
    tensors = {"weight": weight}
    if "bias" in meta:
        tensors["bias"] = torch.zeros(int(meta.pop("bias")))
    save_file(tensors, str(path), metadata={"kind": "zero_shot", "logit_scale": "50.0", **meta})
    return path


def _nan_weight() -> torch.Tensor:
    weight = torch.randn(3, 32)
    weight[1, 4] = float("nan")
    return weight


BAD_HEADS = [
    ("nan_weight", lambda p: _head(p, _nan_weight()), ["weight", "NaN"]),
    ("inf_weight", lambda p: _head(p, torch.full((3, 32), float("inf"))), ["weight", "Inf"]),
    ("zero_rows", lambda p: _head(p, torch.randn(0, 32)), ["weight", "at least one class"]),
    ("one_dimensional", lambda p: _head(p, torch.randn(32)), ["weight"]),
    ("integer_weight", lambda p: _head(p, torch.ones(3, 32, dtype=torch.int32)), ["weight"]),
    ("scale_nan", lambda p: _head(p, torch.randn(3, 32), logit_scale="nan"), ["logit_scale", "nan"]),
    ("scale_negative", lambda p: _head(p, torch.randn(3, 32), logit_scale="-3"), ["logit_scale", "-3"]),
    ("scale_zero", lambda p: _head(p, torch.randn(3, 32), logit_scale="0"), ["logit_scale"]),
    ("scale_inf", lambda p: _head(p, torch.randn(3, 32), logit_scale="inf"), ["logit_scale"]),
    ("scale_text", lambda p: _head(p, torch.randn(3, 32), logit_scale="fifty"), ["logit_scale", "fifty"]),
    ("scale_missing", lambda p: save_file({"weight": torch.randn(3, 32)}, str(p), metadata={"kind": "zero_shot"}),
     ["logit_scale", "missing"]),
    ("class_names_short", lambda p: _head(p, torch.randn(3, 32), class_names=json.dumps(["a"])), ["class_names"]),
    ("class_names_not_json", lambda p: _head(p, torch.randn(3, 32), class_names="[[[" * 40), ["class_names"]),
    ("linear_bias_shape", lambda p: save_file({"weight": torch.randn(3, 32), "bias": torch.zeros(4)}, str(p),
                                              metadata={"kind": "linear"}), ["bias"]),
    ("not_safetensors", lambda p: p.write_bytes(b"\x00" * 64), []),
]


@pytest.mark.parametrize(("name", "make", "culprits"), BAD_HEADS, ids=[c[0] for c in BAD_HEADS])
def test_build_refuses_bad_heads_file(text_zoo, tmp_path, capsys, no_factorizing, name, make, culprits) -> None:
    bad = tmp_path / f"{name}.safetensors"
    make(bad)
    out = tmp_path / "art"
    result = run_cli(build_args(text_zoo, out, heads=("h1", bad)), capsys)
    assert_cli_error(result, str(bad), *culprits)
    assert not out.exists() and leftovers(tmp_path, keep=[bad]) == []


def test_heads_of_different_widths_name_the_file(text_zoo, tmp_path, capsys, no_factorizing) -> None:
    narrow = _head(tmp_path / "narrow.safetensors", torch.randn(3, 31))
    line = assert_cli_error(run_cli(build_args(text_zoo, tmp_path / "art", heads=("h1", narrow)), capsys),
                            str(narrow), "31", "32")
    assert "h1.safetensors" in line


def test_heads_narrower_than_the_model_refused(text_zoo, tmp_path, capsys, no_factorizing) -> None:
    heads = [_head(tmp_path / f"n{i}.safetensors", torch.randn(3, 31)) for i in (1, 2)]
    assert_cli_error(run_cli(build_args(text_zoo, tmp_path / "art", heads=heads), capsys), "--heads", "31", "32")
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("third", ["nowhere.safetensors", "missing_key", "bad_shape", "empty", "not_a_model"])
def test_a_bad_third_expert_is_reported_before_any_svd(text_zoo, tmp_path, capsys, no_factorizing, third) -> None:
    args = build_args(text_zoo, tmp_path / "art", experts=("e1", "e2", third), heads=("h1", "h2", "h3"))
    assert_cli_error(run_cli(args, capsys), Path(third).stem)
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize(("extra", "culprit"), [
    (("--routing-layer", "bogus"), "bogus"),
    (("--routing-layer", "99"), "99"),
    (("--max-length", "1000"), "--max-length"),
    (("--max-length", "0"), "--max-length"),
    (("--max-length", "-3"), "--max-length"),
    (("--max-size", "0.5"), "--max-size"),
    (("--pooling", "max"), "--pooling"),
])
def test_bad_option_is_reported_before_any_svd(text_zoo, tmp_path, capsys, no_factorizing, extra, culprit) -> None:
    assert_cli_error(run_cli(build_args(text_zoo, tmp_path / "art", extra=extra), capsys), culprit)
    assert not (tmp_path / "art").exists()


def test_non_artifact_output_is_refused_before_any_svd(text_zoo, tmp_path, capsys, no_factorizing) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    assert_cli_error(run_cli(build_args(text_zoo, out), capsys), "--output", str(out))
    assert (out / "chapter1.tex").read_text() == "precious"


# ----- a base that asks for custom code is refused at build, as at load -------------------------------------

def _remote_code_base(text_zoo, tmp_path: Path, config_file: str) -> Path:
    base = tmp_path / "remote_base"
    shutil.copytree(text_zoo["base"], base)
    marker = tmp_path / "RAN"
    (base / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                           "from transformers import BertModel as EvilModel\n")
    config = json.loads((base / config_file).read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoTokenizer": ["modeling_evil.T", None]}
    (base / config_file).write_text(json.dumps(config))
    return base


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_build_refuses_a_base_asking_for_custom_code(text_zoo, tmp_path, capsys, no_factorizing,
                                                     config_file) -> None:
    base = _remote_code_base(text_zoo, tmp_path, config_file)
    args = build_args(text_zoo, tmp_path / "art")
    args[args.index("--base") + 1] = base
    assert_cli_error(run_cli(args, capsys), str(base / config_file), "auto_map")
    assert not (tmp_path / "RAN").exists() and not (tmp_path / "art").exists()


def test_library_load_model_refuses_custom_code(text_zoo, tmp_path) -> None:
    from massmerge.adapters import get_adapter
    from massmerge.errors import MassMergeError

    base = _remote_code_base(text_zoo, tmp_path, "config.json")
    with pytest.raises(MassMergeError, match="auto_map"):
        get_adapter("text").load_model(str(base))
    assert not (tmp_path / "RAN").exists()


@pytest.mark.parametrize("text", ["[" * 100000 + "]" * 100000, '{"model_type": "\udcff"}'])
def test_build_refuses_a_hostile_base_config(text_zoo, tmp_path, capsys, no_factorizing, text) -> None:
    base = tmp_path / "hostile_base"
    shutil.copytree(text_zoo["base"], base)
    (base / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    args = build_args(text_zoo, tmp_path / "art")
    args[args.index("--base") + 1] = base
    assert_cli_error(run_cli(args, capsys), str(base / "config.json"))
