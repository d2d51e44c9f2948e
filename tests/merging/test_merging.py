"""Every static merge against an independent float64 numpy reference written here (design.md sections 2-3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from massmerge import merging
from massmerge.errors import OptionError
from massmerge.merging.common import tsv_merge_factors
from massmerge.merging.iso_cts import iso_cts_sizes
from massmerge.lowrank import truncated_svd

from lowrank_fixtures import low_rank

TOL = 1e-5
MATRICES = ("layer.weight", "proj.weight")


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def np_tvs(tvs, key):
    return [tv[key].numpy() for tv in tvs]


def np_polar(a):
    u, _, vh = np.linalg.svd(a, full_matrices=False)
    return u @ vh


def np_topk(m, k):
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return u[:, :k], s[:k], vh[:k].T


# ----- references --------------------------------------------------------------------------------------------

def ref_tsv_m(deltas, fraction):
    m, n = deltas[0].shape
    k = max(1, int(np.floor(min(m, n) * fraction + 1e-9)))
    parts = [np_topk(d, k) for d in deltas]
    U = np.concatenate([p[0] for p in parts], axis=1)
    s = np.concatenate([p[1] for p in parts])
    V = np.concatenate([p[2] for p in parts], axis=1)
    return np_polar(U) @ np.diag(s) @ np_polar(V).T


def ref_iso_c(deltas):
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ vh


def ref_iso_cts(deltas, common_fraction):
    """Written after the official Iso-CTS code: common space from the sum, task residual directions, polar."""
    T = len(deltas)
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    r = len(s)
    kc = int(r * common_fraction)
    kc = r - round((r - kc) / T) * T
    nt = (r - kc) // T
    cu, cs, cv = np.zeros((deltas[0].shape[0], r)), np.zeros(r), np.zeros((r, deltas[0].shape[1]))
    for i, d in enumerate(deltas):
        resid = d - u[:, :kc] @ u[:, :kc].T @ d
        ut, st, vt = np.linalg.svd(resid, full_matrices=False)
        cu[:, i * nt:(i + 1) * nt] = ut[:, :nt]
        cs[i * nt:(i + 1) * nt] = st[:nt]
        cv[i * nt:(i + 1) * nt] = vt[:nt]
    cu[:, T * nt:T * nt + kc] = u[:, :kc]
    cs[T * nt:T * nt + kc] = s[:kc]
    cv[T * nt:T * nt + kc] = vh[:kc]
    return np_polar(cu) @ np.diag(np.full(r, cs.mean())) @ np_polar(cv.T).T


def ref_ties(tvs, keys, density):
    """Flatten every task vector, trim per task, elect signs (zero -> majority), disjoint mean."""
    flat = np.stack([np.concatenate([tv[k].numpy().ravel() for k in keys]) for tv in tvs])
    d = flat.shape[1]
    trimmed = np.zeros_like(flat)
    for t in range(len(tvs)):
        kth = d - int(d * density)
        thr = np.sort(np.abs(flat[t]))[kth - 1]
        trimmed[t] = np.where(np.abs(flat[t]) >= thr, flat[t], 0.0)
    sign = np.sign(trimmed.sum(axis=0))
    majority = np.sign(sign.sum())
    sign[sign == 0] = majority
    merged = np.zeros(d)
    for j in range(d):
        agree = [x for x in trimmed[:, j] if (x > 0 if sign[j] > 0 else x < 0)]
        merged[j] = sum(agree) / max(len(agree), 1)
    out, pos = {}, 0
    for k in keys:
        size = tvs[0][k].numel()
        out[k] = merged[pos:pos + size].reshape(tuple(tvs[0][k].shape))
        pos += size
    return out


# ----- tests ---------------------------------------------------------------------------------------------------

def test_weight_average(small_model_state):
    base, tvs = small_model_state
    out = merging.merge("weight_average", base, tvs, alpha=5.0)  # alpha is ignored
    for key in tvs[0]:
        assert rel(out[key], base[key].numpy() + np.mean(np_tvs(tvs, key), axis=0)) < TOL


@pytest.mark.parametrize("alpha", [None, 0.7])
def test_task_arithmetic(small_model_state, alpha):
    base, tvs = small_model_state
    out = merging.merge("task_arithmetic", base, tvs, alpha=alpha)
    used = 0.3 if alpha is None else alpha  # 3 tasks -> the 8-task default 0.3
    for key in tvs[0]:
        assert rel(out[key], base[key].numpy() + used * np.sum(np_tvs(tvs, key), axis=0)) < TOL


@pytest.mark.parametrize("num_tasks,alpha", [(2, 0.3), (8, 0.3), (14, 0.2), (20, 0.1)])
def test_task_arithmetic_default_alpha(num_tasks, alpha):
    from massmerge.merging.task_arithmetic import default_alpha

    assert default_alpha(num_tasks) == alpha


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties(small_model_state, density):
    base, tvs = small_model_state
    out = merging.merge("ties", base, tvs, density=density, alpha=0.9)
    expected = ref_ties(tvs, list(tvs[0]), density)
    for key in tvs[0]:
        assert rel(out[key], base[key].numpy() + 0.9 * expected[key]) < TOL


def test_ties_zero_sum_takes_majority_sign():
    """Entry 0 cancels exactly (+1, -1): it gets the majority sign (+, from entries 1-2) and averages the +1."""
    base = {"w": torch.zeros(1, 3, dtype=torch.float64)}
    tvs = [{"w": torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)},
           {"w": torch.tensor([[-1.0, 2.0, 3.0]], dtype=torch.float64)}]
    out = merging.merge("ties", base, tvs, density=1.0)
    assert out["w"].tolist() == [[1.0, 2.0, 3.0]]


@pytest.mark.parametrize("fraction", [None, 0.25])
def test_tsv_m(small_model_state, fraction):
    base, tvs = small_model_state
    out = merging.merge("tsv_m", base, tvs, rank_fraction=fraction, alpha=0.8)
    for key in MATRICES:
        expected = ref_tsv_m(np_tvs(tvs, key), 1 / 3 if fraction is None else fraction)
        assert rel(out[key], base[key].numpy() + 0.8 * expected) < TOL
    assert rel(out["layer.bias"], base["layer.bias"].numpy() + 0.8 * np.mean(np_tvs(tvs, "layer.bias"), 0)) < TOL


def test_tsv_m_orthogonal_tasks_equals_sum(rng):
    """Tasks in mutually orthogonal row and column spaces, each of rank k: TSV-M is exactly their sum."""
    q_left, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    q_right, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    deltas = []
    for t in range(3):
        s = np.diag(rng.uniform(0.5, 2.0, 4))
        deltas.append(q_left[:, 4 * t:4 * t + 4] @ s @ q_right[:, 4 * t:4 * t + 4].T)
    base = {"w": torch.zeros(12, 12, dtype=torch.float64)}
    tvs = [{"w": torch.from_numpy(d)} for d in deltas]
    out = merging.merge("tsv_m", base, tvs, rank_fraction=1 / 3)
    assert rel(out["w"], sum(deltas)) < 1e-10


def test_tsv_m_of_one_task_is_its_rank_k_reconstruction(rng):
    delta = torch.from_numpy(rng.standard_normal((9, 7)))
    lr = truncated_svd(delta, 3, dtype=torch.float64)
    u, s, v = np_topk(delta.numpy(), 3)
    assert rel(tsv_merge_factors([lr]), u @ np.diag(s) @ v.T) < 1e-10


def test_tsv_c_is_the_task_rank_k_model(small_model_state):
    base, tvs = small_model_state
    out = merging.merge("tsv_c", base, tvs, task=1, rank_fraction=0.2)
    for key in MATRICES:
        m, n = base[key].shape
        u, s, v = np_topk(tvs[1][key].numpy(), max(1, int(min(m, n) * 0.2)))
        assert rel(out[key], base[key].numpy() + u @ np.diag(s) @ v.T) < TOL
    assert rel(out["layer.bias"], base["layer.bias"].numpy() + tvs[1]["layer.bias"].numpy()) < TOL


@pytest.fixture
def generic_state(small_model_state, rng):
    """Low-rank task vectors plus small full-rank noise: Iso-C/CTS keep every direction of the summed
    spectrum, so exactly-zero singular values (whose vectors are arbitrary) would make any reference ambiguous."""
    base, tvs = small_model_state
    noisy = [{k: v + (1e-3 * torch.from_numpy(rng.standard_normal(tuple(v.shape))) if v.ndim == 2 else 0)
              for k, v in tv.items()} for tv in tvs]
    return base, noisy


def test_iso_c(generic_state):
    base, tvs = generic_state
    out = merging.merge("iso_c", base, tvs, alpha=1.3)
    for key in MATRICES:
        assert rel(out[key], base[key].numpy() + 1.3 * ref_iso_c(np_tvs(tvs, key))) < TOL
    assert rel(out["layer.bias"], base["layer.bias"].numpy() + 1.3 * np.mean(np_tvs(tvs, "layer.bias"), 0)) < TOL


@pytest.mark.parametrize("common_fraction", [0.8, 0.5])
def test_iso_cts(generic_state, common_fraction):
    base, tvs = generic_state
    out = merging.merge("iso_cts", base, tvs, common_fraction=common_fraction, alpha=1.1)
    for key in MATRICES:
        expected = ref_iso_cts(np_tvs(tvs, key), common_fraction)
        assert rel(out[key], base[key].numpy() + 1.1 * expected) < TOL


@pytest.mark.parametrize("r,T,cf,kc,nt", [(768, 8, 0.8, 616, 19), (10, 3, 0.8, 7, 1), (6, 3, 0.5, 3, 1), (12, 20, 0.8, 12, 0)])
def test_iso_cts_sizes_follow_official_rounding(r, T, cf, kc, nt):
    assert iso_cts_sizes(r, T, cf) == (kc, nt)


@pytest.mark.parametrize("name", ["weight_average", "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts"])
def test_every_method_keeps_keys_shapes_dtypes(rng, name):
    base = {"w": torch.randn(8, 6, dtype=torch.float16), "b": torch.randn(8, dtype=torch.bfloat16),
            "n": torch.tensor([3, 4])}
    tvs = [{"w": low_rank(rng, 8, 6, 2, 0.01).float(), "b": 0.01 * torch.randn(8)} for _ in range(3)]
    out = merging.merge(name, base, tvs)
    assert list(out) == list(base)
    for key in base:
        assert out[key].shape == base[key].shape and out[key].dtype == base[key].dtype
    assert torch.equal(out["n"], base["n"])
    assert bool(torch.isfinite(out["w"].float()).all())


def test_float32_inputs_meet_reference(small_model_state):
    base, tvs = small_model_state
    base32 = {k: v.float() if v.is_floating_point() else v for k, v in base.items()}
    tvs32 = [{k: v.float() for k, v in tv.items()} for tv in tvs]
    out = merging.merge("tsv_m", base32, tvs32)
    assert out["layer.weight"].dtype == torch.float32
    assert rel(out["layer.weight"], base["layer.weight"].numpy() + ref_tsv_m(np_tvs(tvs, "layer.weight"), 1 / 3)) < 1e-5


def test_registry_rejects_unknown_method_and_option(small_model_state):
    base, tvs = small_model_state
    with pytest.raises(OptionError, match="--method 'nope'"):
        merging.merge("nope", base, tvs)
    with pytest.raises(OptionError, match="density"):
        merging.merge("tsv_m", base, tvs, density=0.3)
    with pytest.raises(OptionError, match="at least 2"):
        merging.merge("tsv_m", base, tvs[:1])


@pytest.mark.parametrize("name,opts,flag", [
    ("ties", {"density": 0.0}, "--ties-density"),
    ("tsv_m", {"rank_fraction": 1.5}, "--rank-fraction"),
    ("iso_cts", {"common_fraction": 2.0}, "--common-fraction"),
    ("task_arithmetic", {"alpha": float("nan")}, "--alpha"),
])
def test_out_of_range_options_name_the_flag(small_model_state, name, opts, flag):
    base, tvs = small_model_state
    with pytest.raises(OptionError, match=flag):
        merging.merge(name, base, tvs, **opts)
