"""Options out of range, T = 1, and a wrong routing layer: refused with one line naming the option."""

from __future__ import annotations

import pytest
import torch
from robust_helpers import Zoo, assert_user_error, digest, leftovers, run_cli
from torch import nn

from massmerge import merging
from massmerge.errors import MassMergeError, OptionError
from massmerge.heads import LinearHead
from massmerge.mass import ExpertFactors, MASSModel, make_build_settings, make_serve_settings
from massmerge.task_vectors import task_vector

BAD_MERGE_OPTIONS = [
    (["--method", "tsv_m", "--rank-fraction", "0"], "--rank-fraction"),
    (["--method", "tsv_m", "--rank-fraction", "1.5"], "--rank-fraction"),
    (["--method", "tsv_m", "--rank-fraction", "-0.5"], "--rank-fraction"),
    (["--method", "tsv_m", "--rank-fraction", "nan"], "--rank-fraction"),
    (["--method", "tsv_c", "--task", "0", "--rank-fraction", "2"], "--rank-fraction"),
    (["--method", "ties", "--ties-density", "0"], "--ties-density"),
    (["--method", "ties", "--ties-density", "1.01"], "--ties-density"),
    (["--method", "iso_cts", "--common-fraction", "1.5"], "--common-fraction"),
    (["--method", "iso_cts", "--common-fraction", "-0.1"], "--common-fraction"),
    (["--method", "tsv_c", "--task", "2"], "--task"),
    (["--method", "tsv_c", "--task", "-1"], "--task"),
    (["--method", "tsv_c"], "--task"),
    (["--method", "tsv_m", "--alpha", "nan"], "--alpha"),
    (["--method", "task_arithmetic", "--alpha", "inf"], "--alpha"),
    (["--method", "nope"], "--method"),
    (["--method", "tsv_m", "--ties-density", "0.2"], "--ties-density"),
    (["--method", "weight_average", "--task", "0"], "--task"),
    (["--method", "tsv_m", "--include", "no.such.*"], "--include"),
    (["--method", "tsv_m", "--exclude", "*"], "--exclude"),
    (["--method", "tsv_m", "--include", ""], "--include"),
]


@pytest.mark.parametrize(("options", "culprit"), BAD_MERGE_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_merge_bad_option(zoo: Zoo, tmp_path, capsys, options, culprit) -> None:
    output = tmp_path / "o.safetensors"
    output.write_bytes((zoo.e1).read_bytes())  # a previous (valid) output
    before = digest(output)
    result = run_cli(["merge", *options, "--base", zoo.base, "--experts", zoo.e1, zoo.e2, "--output", output], capsys)
    assert_user_error(result, culprit)
    assert digest(output) == before
    assert leftovers(tmp_path, keep=[output]) == []


def test_merge_single_expert_refused(zoo: Zoo, tmp_path, capsys) -> None:
    result = run_cli(["merge", "--method", "tsv_m", "--base", zoo.base, "--experts", zoo.e1,
                      "--output", tmp_path / "o.safetensors"], capsys)
    assert_user_error(result, "--experts")
    assert leftovers(tmp_path) == []


def test_merge_output_suffix_refused(zoo: Zoo, tmp_path, capsys) -> None:
    result = run_cli(["merge", "--method", "tsv_m", "--base", zoo.base, "--experts", zoo.e1, zoo.e2,
                      "--output", tmp_path / "o.pt"], capsys)
    assert_user_error(result, "--output")
    assert leftovers(tmp_path) == []


# ----- Python entry points ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("values", "option"), [
    ({"eta": -0.1}, "--eta"), ({"eta": 1.0}, "--eta"), ({"eta": float("nan")}, "--eta"),
    ({"top_k": 0}, "--top-k"), ({"top_k": -3}, "--top-k"),
    ({"tau": 0.0}, "--tau"), ({"tau": float("inf")}, "--tau"),
    ({"alpha": float("nan")}, "--alpha"), ({"mode": "all"}, "--mode"), ({"head_rule": "vote"}, "--head-rule"),
    ({"routing_layers": ("",)}, "--routing-layer"), ({"batch_size": 0}, "--batch-size"),
    ({"max_length": 0}, "--max-length"), ({"bogus": 1}, "--bogus"),
])
def test_serve_settings_out_of_range(values, option) -> None:
    with pytest.raises(OptionError) as info:
        make_serve_settings(**{"routing_layers": ("fc1",), **values})
    message = str(info.value)
    assert message.startswith(option) and "\n" not in message


@pytest.mark.parametrize(("values", "option"), [
    ({"rank_fraction": 0.0}, "--rank-fraction"), ({"rank_fraction": 1.5}, "--rank-fraction"),
    ({"eps": -0.1}, "--eps"), ({"eps": 1.5}, "--eps"), ({"svd": "fast"}, "--svd"),
    ({"max_size": -2.0}, "--max-size"), ({"factor_dtype": "int8"}, "--factor-dtype"), ({"bogus": 1}, "--bogus"),
])
def test_build_settings_out_of_range(values, option) -> None:
    with pytest.raises(OptionError) as info:
        make_build_settings(**values)
    message = str(info.value)
    assert message.startswith(option) and "\n" not in message


@pytest.mark.parametrize("method", sorted(set(merging.MERGE_METHODS) - {"tsv_c"}))
def test_python_merge_single_task_refused(method, zoo: Zoo) -> None:
    from massmerge.checkpoints import load_state_dict

    base = load_state_dict(zoo.base)
    with pytest.raises(OptionError, match="--experts"):
        merging.merge(method, base, [task_vector(base, load_state_dict(zoo.e1))])


def test_python_merge_unknown_option(zoo: Zoo) -> None:
    from massmerge.checkpoints import load_state_dict

    base = load_state_dict(zoo.base)
    tvs = [task_vector(base, load_state_dict(p)) for p in (zoo.e1, zoo.e2)]
    with pytest.raises(OptionError, match="rank_fraction"):
        merging.merge("task_arithmetic", base, tvs, rank_fraction=0.5)


# ----- MASS model on a tiny MLP ----------------------------------------------------------------------------

class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def tiny_setup(num_tasks: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyNet().eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tvs = []
    for t in range(num_tasks):
        g = torch.Generator().manual_seed(100 + t)
        tvs.append({k: 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    heads = [LinearHead(torch.randn(3 + t, 5, generator=torch.Generator().manual_seed(t))) for t in range(num_tasks)]
    return model, base, tvs, heads


@pytest.mark.parametrize("fraction", [0.0, -0.2, 1.5, float("nan")])
def test_expert_factors_rank_fraction_out_of_range(fraction) -> None:
    _, _, tvs, _ = tiny_setup()
    with pytest.raises(OptionError, match="--rank-fraction"):
        ExpertFactors.build(iter(tvs), ["a", "b", "c"], rank_fraction=fraction)


def test_expert_factors_single_task_refused() -> None:
    _, _, tvs, _ = tiny_setup(1)
    with pytest.raises(OptionError, match="--experts"):
        ExpertFactors.build(iter(tvs), ["only"])


def test_expert_factors_name_count_mismatch() -> None:
    _, _, tvs, _ = tiny_setup(3)
    with pytest.raises(OptionError, match="--task-names"):
        ExpertFactors.build(iter(tvs[:2]), ["a", "b", "c"])
    with pytest.raises(MassMergeError):
        ExpertFactors.build(iter(tvs), ["a", "b"])


def test_expert_factors_duplicate_names() -> None:
    _, _, tvs, _ = tiny_setup(2)
    with pytest.raises(OptionError, match="--task-names"):
        ExpertFactors.build(iter(tvs), ["a", "a"])


@pytest.mark.parametrize(("layer", "words"), [
    ("fc9", ["fc9", "not a module"]), ("act", ["act", "ReLU"]), ("", ["--routing-layer"]),
])
def test_mass_model_wrong_routing_layer(layer, words) -> None:
    model, _, tvs, heads = tiny_setup()
    factors = ExpertFactors.build(iter(tvs), ["a", "b", "c"])
    with pytest.raises(OptionError) as info:
        MASSModel(model, factors, heads, make_serve_settings(routing_layers=(layer,)))
    for word in words:
        assert word in str(info.value)


def test_mass_model_routing_layer_without_factors() -> None:
    """A real nn.Linear whose weight was filtered out of the task vectors: the error names the key."""
    model, _, tvs, heads = tiny_setup()
    tvs = [{k: v for k, v in tv.items() if not k.startswith("fc1.")} for tv in tvs]
    factors = ExpertFactors.build(iter(tvs), ["a", "b", "c"])
    with pytest.raises(OptionError, match="fc1.weight"):
        MASSModel(model, factors, heads, make_serve_settings(routing_layers=("fc1",)))


def test_mass_model_head_count_mismatch() -> None:
    model, _, tvs, heads = tiny_setup()
    factors = ExpertFactors.build(iter(tvs), ["a", "b", "c"])
    with pytest.raises(OptionError, match="--heads"):
        MASSModel(model, factors, heads[:2], make_serve_settings(routing_layers=("fc2",)))


def test_mass_model_factor_key_not_in_model() -> None:
    model, _, tvs, heads = tiny_setup()
    tvs = [{**tv, "ghost.weight": torch.ones(3, 3)} for tv in tvs]
    factors = ExpertFactors.build(iter(tvs), ["a", "b", "c"])
    with pytest.raises(OptionError, match="ghost.weight"):
        MASSModel(model, factors, heads, make_serve_settings(routing_layers=("fc2",)))


@pytest.mark.parametrize("top_k", [1, 3, 50])
@pytest.mark.parametrize("mode", ["topk", "top1", "batch"])
def test_mass_model_extreme_but_valid_options(top_k, mode) -> None:
    """K above T, K = 1, eta = 0 and every mode run and give valid (task, class) for every sample."""
    model, _, tvs, heads = tiny_setup()
    factors = ExpertFactors.build(iter(tvs), ["a", "b", "c"], rank_fraction=1.0, eps=None)
    mass = MASSModel(model, factors, heads, make_serve_settings(routing_layers=("fc2",), top_k=top_k, eta=0.0, mode=mode))
    out = mass(torch.randn(7, 6, generator=torch.Generator().manual_seed(1)))
    assert out.task.shape == (7,) and bool(((out.task >= 0) & (out.task < 3)).all())
    assert bool(out.selected.any(dim=1).all())
    assert bool((out.selected.sum(dim=1) <= min(top_k, 3)).all())
    for task, label in zip(out.task.tolist(), out.label.tolist()):
        assert 0 <= label < heads[task].num_classes
    assert bool(torch.isfinite(out.probs).all())
