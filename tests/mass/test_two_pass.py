"""The two-pass model on a tiny net: first-pass weights, the routing activation, early exit, and predictions
against a per-sample reference from numpy SVDs of the raw task vectors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from massmerge.errors import OptionError
from massmerge.heads import LinearHead
from massmerge.mass import ExpertFactors, MASSModel, make_serve_settings
from massmerge.mass.model import group_by_task_set

from lowrank_fixtures import low_rank, ref_probs, rel

D_IN, HIDDEN, D_OUT, T = 24, 32, 16, 4


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


def test_pretrained_first_pass_routes_on_the_base_activation(mass_setup, rng):
    """proj-PRE (``first_pass="pretrained"``): the routing activation is the base model's own, and routing
    projects it on the same subspaces; the default first pass differs from it."""
    net, base, _, _, _, model = mass_setup
    x = torch.from_numpy(rng.standard_normal((5, D_IN)))
    pre = model.with_settings(first_pass="pretrained")
    expected = net.block[1](net.block[0](torch.tanh(net.embed(x)))).detach()
    assert rel(pre.routing_activations(x)["block.2"], expected) < 1e-12
    assert rel(model.routing_activations(x)["block.2"], expected) > 1e-3
    probs = pre.route(x).probs
    assert probs.shape == (5, T) and torch.allclose(probs.sum(-1), torch.ones(5, dtype=probs.dtype))


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
