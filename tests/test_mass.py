"""MASS: per-task factors, de-redundancy, router and the two-pass model, against references written here."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from massmerge.errors import OptionError
from massmerge.heads import LinearHead
from massmerge.lowrank import truncated_svd
from massmerge.mass import ExpertFactors, MASSModel, make_build_settings, make_serve_settings
from massmerge.mass import router
from massmerge.mass.experts import deredundant_tasks, lowrank_cosine
from massmerge.mass.model import group_by_task_set

from lowrank_fixtures import low_rank

D_IN, HIDDEN, D_OUT, T = 24, 32, 16, 4


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ----- router ------------------------------------------------------------------------------------------------

def ref_probs(z, bases, tau):
    r = np.array([[np.linalg.norm(zi - V @ V.T @ zi) for V in bases] for zi in z])
    scores = -r
    std = scores.std(axis=1, ddof=1, keepdims=True)
    x = (scores - scores.mean(axis=1, keepdims=True)) / (std + 1e-6) / tau
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return r, e / e.sum(axis=1, keepdims=True)


def random_bases(rng, d, k, count):
    return [np.linalg.qr(rng.standard_normal((d, k)))[0] for _ in range(count)]


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_residuals_and_probabilities_match_reference(rng, tau):
    bases = random_bases(rng, 20, 4, 5)
    z = rng.standard_normal((7, 20))
    r_ref, p_ref = ref_probs(z, bases, tau)
    r = router.residuals(torch.from_numpy(z), [torch.from_numpy(b) for b in bases])
    assert rel(r, r_ref) < 1e-10
    assert rel(router.probabilities(r, tau), p_ref) < 1e-10


def test_residuals_of_unequal_ranks_and_unnormalized_bases_match_reference(rng):
    """The stacked bases pad smaller ranks with zero columns: each task's residual is still its own
    ``||z - V V^T z||``, for any V (stored bases are float16-rounded, not exactly orthonormal)."""
    bases = [b * 1.01 for b in random_bases(rng, 12, 2, 1)] + random_bases(rng, 12, 5, 1) + random_bases(rng, 12, 3, 2)
    z = rng.standard_normal((6, 12))
    r_ref, _ = ref_probs(z, bases, 1.0)
    stacked = router.LayerBases.of([torch.from_numpy(b) for b in bases])
    assert stacked.dim == 12 and stacked.mean_rank == (2 + 5 + 3 + 3) / 4
    assert rel(router.residuals(torch.from_numpy(z), stacked), r_ref) < 1e-12
    assert router.LayerBases.of(stacked) is stacked
    rows = torch.randn(3 * 4, 12, dtype=torch.float64)  # equal ranks, stacked as the set merger holds them
    equal = router.LayerBases.of_rows(rows, [0, 4, 8, 12])
    assert equal.transposed.data_ptr() == rows.data_ptr()  # a view: serving keeps no second copy
    expected = [[np.linalg.norm(zi - V @ V.T @ zi) for V in (rows[a:a + 4].T.numpy() for a in (0, 4, 8))] for zi in z]
    assert rel(router.residuals(torch.from_numpy(z), equal), expected) < 1e-12


def test_routing_bank_gives_every_layers_own_residuals(rng):
    """The bank groups layers by input width (two bmm per group, ranks padded with zero columns): each layer's
    residuals are what :func:`router.residuals` gives for that layer alone."""
    layers = {"a": random_bases(rng, 12, 3, 4), "b": random_bases(rng, 12, 2, 3) + random_bases(rng, 12, 4, 1),
              "c": random_bases(rng, 20, 5, 4), "d": random_bases(rng, 20, 5, 4), "e": random_bases(rng, 12, 3, 5)}
    bases = {name: router.LayerBases.of([torch.from_numpy(b).float() for b in value]) for name, value in layers.items()}
    bank = router.RoutingBank(bases)
    assert sorted(len(g.layers) for g in bank.groups) == [2, 2] and list(bank.single) == ["e"]  # e: 5 tasks
    pooled = {name: torch.randn(6, stacked.dim) for name, stacked in bases.items()}
    got = bank.residuals(pooled)
    for name, stacked in bases.items():
        torch.testing.assert_close(got[name], router.residuals(pooled[name], stacked), rtol=1e-5, atol=1e-6)


def test_topk_rule_threshold_cap_and_fallback():
    probs = torch.tensor([
        [0.30, 0.25, 0.21, 0.24],  # four above eta=0.2 -> cut to the top 3
        [0.70, 0.10, 0.10, 0.10],  # one above eta
        [0.19, 0.18, 0.17, 0.46],  # only task 3
        [0.26, 0.25, 0.25, 0.24],  # eta 0.3 below -> empty -> argmax
    ])
    sel = router.topk_selection(probs, eta=0.2, top_k=3)
    assert sel[0].tolist() == [True, True, False, True]
    assert sel[1].tolist() == [True, False, False, False]
    assert sel[2].tolist() == [False, False, False, True]
    assert router.topk_selection(probs[3:], eta=0.3, top_k=3)[0].tolist() == [True, False, False, False]


def test_modes_top1_and_batch(rng):
    bases = [torch.from_numpy(b) for b in random_bases(rng, 16, 3, 4)]
    z = torch.from_numpy(rng.standard_normal((6, 16)))
    res = router.residuals(z, bases)
    _, top1 = router.select(res, mode="top1")
    assert top1.sum(dim=1).tolist() == [1] * 6
    assert torch.equal(top1.float().argmax(dim=1), res.argmin(dim=1))
    probs, batch_sel = router.select(res, mode="batch")
    assert torch.equal(batch_sel, batch_sel[:1].expand_as(batch_sel))  # one set for the whole batch
    expected = router.probabilities(res.mean(dim=0, keepdim=True))
    assert rel(probs[0], expected[0]) < 1e-12


def test_router_picks_the_task_whose_subspace_holds_the_input(rng):
    bases = [torch.from_numpy(b) for b in random_bases(rng, 64, 6, 5)]
    for t, V in enumerate(bases):
        z = torch.from_numpy(rng.standard_normal((10, 6))) @ V.T  # inputs in span(V_t)
        res = router.residuals(z, bases)
        _, sel = router.select(res, mode="top1")
        assert sel.float().argmax(dim=1).tolist() == [t] * 10
        assert torch.allclose(res[:, t], torch.zeros(10, dtype=res.dtype), atol=1e-10)


# ----- factors and de-redundancy -------------------------------------------------------------------------------

def test_lowrank_cosine_matches_dense(rng):
    a = truncated_svd(low_rank(rng, 15, 11, 4), 4, dtype=torch.float64)
    b = truncated_svd(low_rank(rng, 15, 11, 4) + 0.5 * a.reconstruct(), 4, dtype=torch.float64)
    da, db = a.reconstruct().numpy().ravel(), b.reconstruct().numpy().ravel()
    assert abs(lowrank_cosine(a, b) - da @ db / np.linalg.norm(da) / np.linalg.norm(db)) < 1e-10


def test_deredundancy_drops_a_duplicated_expert(rng):
    tvs = [{"w": low_rank(rng, 16, 12, 3), "b": torch.from_numpy(rng.standard_normal(16))} for _ in range(3)]
    tvs.append({k: v.clone() for k, v in tvs[1].items()})  # task 3 duplicates task 1
    factors = ExpertFactors.build(iter(tvs), ["a", "b", "c", "d"], eps=0.3, dtype=torch.float64)
    assert factors.accepted["w"] == [0, 1, 2]
    assert factors.dropped() == {"w": ["d"]}
    off = ExpertFactors.build(iter(tvs), ["a", "b", "c", "d"], eps=None, dtype=torch.float64)
    assert off.accepted["w"] == [0, 1, 2, 3] and off.dropped() == {}


def test_deredundancy_order_and_first_task_always_kept(rng):
    a = truncated_svd(low_rank(rng, 10, 10, 2), 2, dtype=torch.float64)
    assert deredundant_tasks([a, a, a], eps=0.3) == [0]
    assert deredundant_tasks([a], eps=0.0) == [0]


def test_factors_shapes_and_default_rank(rng):
    tvs = [{"w": low_rank(rng, 40, 20, 10), "b": torch.zeros(40, dtype=torch.float64)} for _ in range(4)]
    factors = ExpertFactors.build(iter(tvs), list("abcd"))
    assert factors.rank_fraction == 0.25
    assert [f.rank for f in factors.matrices["w"]] == [5] * 4  # floor(20 / 4)
    assert factors.numel() == 4 * 5 * (40 + 20 + 1) + 4 * 40


def test_merged_delta_of_one_task_is_its_rank_k_reconstruction(rng):
    tvs = [{"w": torch.from_numpy(rng.standard_normal((12, 9)))} for _ in range(3)]
    factors = ExpertFactors.build(iter(tvs), list("abc"), dtype=torch.float64)
    u, s, vh = np.linalg.svd(tvs[2]["w"].numpy(), full_matrices=False)
    assert rel(factors.merged_delta([2])["w"], (u[:, :3] * s[:3]) @ vh[:3]) < 1e-10


@pytest.mark.parametrize("names,error", [(["a"], "at least 2"), (["a", "a"], "listed twice")])
def test_factor_build_rejects_bad_task_lists(rng, names, error):
    tvs = [{"w": low_rank(rng, 4, 4, 1)} for _ in names]
    with pytest.raises(OptionError, match=error):
        ExpertFactors.build(iter(tvs), names)


# ----- the two-pass model --------------------------------------------------------------------------------------

class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(D_IN, HIDDEN)
        self.block = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN))
        self.norm = nn.LayerNorm(HIDDEN)
        self.out = nn.Linear(HIDDEN, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.tanh(self.block(torch.tanh(self.embed(x))))))


@pytest.fixture
def mass_setup(rng):
    torch.manual_seed(0)
    net = TinyNet().double()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    tvs = []
    for _ in range(T):
        tv = {}
        for key, value in base.items():
            if value.ndim == 2:
                tv[key] = low_rank(rng, *value.shape, 3, 0.3)
            else:
                tv[key] = torch.from_numpy(0.05 * rng.standard_normal(tuple(value.shape)))
        tvs.append(tv)
    heads = [LinearHead(torch.from_numpy(rng.standard_normal((3 + t, D_OUT)))) for t in range(T)]
    factors = ExpertFactors.build(iter(tvs), [f"task{t}" for t in range(T)], rank_fraction=0.25, dtype=torch.float64)
    config = make_serve_settings(routing_layers=("block.2",), eta=0.15, top_k=2)
    model = MASSModel(net, factors, heads, config)
    return net, base, tvs, heads, factors, model


def ref_merged_state(base, tvs, tasks, alpha, rank_fraction, accepted=None):
    """theta_0 + alpha * TSV-M(tasks), from numpy SVDs of the raw task vectors."""
    out = {}
    for key, value in base.items():
        if value.ndim == 2:
            chosen = [t for t in tasks if accepted is None or t in accepted[key]]
            m, n = value.shape
            k = max(1, int(min(m, n) * rank_fraction))
            # directions beyond the numerical rank are arbitrary and are not kept (numpy's own tolerance)
            ks = [min(k, np.linalg.matrix_rank(tvs[t][key].numpy())) for t in chosen]
            parts = [np.linalg.svd(tvs[t][key].numpy(), full_matrices=False) for t in chosen]
            U = np.concatenate([p[0][:, :kt] for p, kt in zip(parts, ks)], axis=1)
            s = np.concatenate([p[1][:kt] for p, kt in zip(parts, ks)])
            V = np.concatenate([p[2][:kt].T for p, kt in zip(parts, ks)], axis=1)
            pu, _, qu = np.linalg.svd(U, full_matrices=False)
            pv, _, qv = np.linalg.svd(V, full_matrices=False)
            delta = (pu @ qu) @ np.diag(s) @ (pv @ qv).T
        else:
            delta = np.mean([tvs[t][key].numpy() for t in tasks], axis=0)
        out[key] = torch.from_numpy(value.numpy() + alpha * delta)
    return out


def run_with(net, state, x):
    clone = copy.deepcopy(net)
    clone.load_state_dict(state)
    return clone(x)


def test_first_pass_weights_are_tsv_m_of_accepted_tasks(mass_setup):
    net, base, tvs, _, factors, model = mass_setup
    expected = ref_merged_state(base, tvs, range(T), 1.0, 0.25, factors.accepted)
    params = model.first_pass_state()
    for key in factors.matrices:
        assert rel(params[key], expected[key]) < 1e-8


def test_routing_activation_is_the_first_pass_input_of_the_routing_layer(mass_setup, rng):
    net, base, tvs, _, factors, model = mass_setup
    x = torch.from_numpy(rng.standard_normal((5, D_IN)))
    early = model.routing_activations(x)["block.2"]
    # independent: the input of block.2 in a model loaded with the reference first-pass weights
    state = ref_merged_state(base, tvs, range(T), 1.0, 0.25, factors.accepted)
    clone = copy.deepcopy(net)
    clone.load_state_dict(state)
    expected = clone.block[1](clone.block[0](torch.tanh(clone.embed(x))))
    assert rel(early, expected.detach()) < 1e-8


def test_early_exit_stops_before_later_layers(mass_setup, rng):
    _, _, _, _, _, model = mass_setup
    calls = []
    handle = model.model.out.register_forward_hook(lambda *a: calls.append(1))
    model.routing_activations(torch.from_numpy(rng.standard_normal((2, D_IN))))
    handle.remove()
    assert calls == []


def test_prediction_matches_per_sample_reference(mass_setup, rng):
    """Each sample: reference routing, then a model rebuilt from numpy TSV-M of its set, then max-logit heads."""
    net, base, tvs, heads, factors, model = mass_setup
    x = torch.from_numpy(rng.standard_normal((12, D_IN)))
    out = model(x)
    z = model.routing_activations(x)["block.2"].numpy()
    bases = [f.V.numpy() for f in factors.matrices["block.2.weight"]]
    _, probs = ref_probs(z, bases, 1.0)
    assert rel(out.probs, probs) < 1e-8
    for i in range(len(x)):
        order = np.argsort(-probs[i])[:2]
        chosen = sorted(int(t) for t in order if probs[i, t] > 0.15) or [int(np.argmax(probs[i]))]
        assert out.selected[i].nonzero().flatten().tolist() == chosen
        feats = run_with(net, ref_merged_state(base, tvs, chosen, 1.0, 0.25), x[i:i + 1])
        best = [(float(heads[t](feats).max()), t, int(heads[t](feats).argmax())) for t in chosen]
        _, task, label = max(best)
        assert (int(out.task[i]), int(out.label[i])) == (task, label)


def test_oracle_mode_is_the_task_rank_k_model(mass_setup, rng):
    net, base, tvs, heads, _, model = mass_setup
    x = torch.from_numpy(rng.standard_normal((4, D_IN)))
    out = model(x, task=2)
    assert out.task.tolist() == [2] * 4
    feats = run_with(net, ref_merged_state(base, tvs, [2], 1.0, 0.25), x)
    assert out.label.tolist() == heads[2](feats).argmax(dim=1).tolist()
    per_sample = model(x, task=torch.tensor([0, 1, 2, 3]))
    assert per_sample.task.tolist() == [0, 1, 2, 3]


def test_base_model_is_not_modified(mass_setup, rng):
    net, base, _, _, _, model = mass_setup
    model(torch.from_numpy(rng.standard_normal((3, D_IN))))
    for key, value in net.state_dict().items():
        assert torch.equal(value, base[key])


def test_group_by_task_set():
    sel = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    groups = {tasks: idx.tolist() for tasks, idx in group_by_task_set(sel)}
    assert groups == {(0, 2): [0, 2], (1,): [1]}


@pytest.mark.parametrize("layer,error", [("nope", "not a module"), ("block.1", "not an nn.Linear")])
def test_bad_routing_layer_is_named(mass_setup, layer, error):
    net, _, _, heads, factors, _ = mass_setup
    with pytest.raises(OptionError, match=f"--routing-layer '{layer}'.*{error}"):
        MASSModel(net, factors, heads, make_serve_settings(routing_layers=(layer,)))


def test_head_count_must_match_tasks(mass_setup):
    net, _, _, heads, factors, _ = mass_setup
    with pytest.raises(OptionError, match="--heads"):
        MASSModel(net, factors, heads[:2], make_serve_settings(routing_layers=("block.2",)))


@pytest.mark.parametrize("option,value,flag", [("eta", 1.5, "--eta"), ("top_k", 0, "--top-k"),
                                               ("tau", -1.0, "--tau"), ("mode", "nope", "--mode"),
                                               ("head_rule", "vote", "--head-rule"), ("pooling", "max", "--pooling")])
def test_serve_setting_errors_name_the_option(option, value, flag):
    with pytest.raises(OptionError, match=flag):
        make_serve_settings(routing_layers=("x",), **{option: value})


@pytest.mark.parametrize("option,value,flag", [("rank_fraction", 0.0, "--rank-fraction"), ("eps", 2.0, "--eps"),
                                               ("svd", "qr", "--svd"), ("max_size", -1.0, "--max-size")])
def test_build_setting_errors_name_the_option(option, value, flag):
    with pytest.raises(OptionError, match=flag):
        make_build_settings(**{option: value})


def test_token_residuals_are_the_rms_of_each_tokens_residual(rng):
    """Against a loop over tokens with the explicit projection; one token equals router.residuals."""
    tokens = torch.from_numpy(rng.standard_normal((3, 5, 12)))
    weights = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    bases = [torch.from_numpy(b) for b in random_bases(rng, 12, 4, 3)]
    bases[1] = bases[1] * 1.01  # not exactly orthonormal: the closed form must not assume it
    got = router.token_residuals(tokens, weights, bases)
    for b in range(3):
        for t, V in enumerate(bases):
            r2 = [float((tokens[b, j] - V @ (V.T @ tokens[b, j])).square().sum()) for j in range(5) if weights[b, j]]
            assert abs(float(got[b, t]) - np.sqrt(np.mean(r2))) < 1e-10
    one = router.token_residuals(tokens[:, :1], torch.ones(3, 1, dtype=torch.float64), bases)
    assert torch.allclose(one, router.residuals(tokens[:, 0], bases), atol=1e-10)
