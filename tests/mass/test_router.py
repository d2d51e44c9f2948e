"""The data-free router: projection residuals, standardized softmax, the eta/K rule, modes, the routing bank
and token residuals, each against a reference written here (numpy, or a loop over tokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from massmerge.mass import router

from lowrank_fixtures import random_bases, ref_probs, rel



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
