"""SMILE (massmerge.smile) against a slow per-token reference written here, and on whole tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from massmerge.errors import OptionError
from massmerge.smile import SmileLinear, SmileSettings, build_smile, storage_factor
from massmerge.task_vectors import task_vector
from tests.tiny_models import bert_config

torch.set_default_dtype(torch.float32)


def reference_token(x: torch.Tensor, base: nn.Linear, deltas, bias_deltas, k: int, gate_k: int, top_k: int):
    """One token through SMILE, spelled out: float64 SVDs, a Python loop over experts, no batching."""
    x64 = x.double()
    norms, updates = [], []
    for delta, bias in zip(deltas, bias_deltas):
        U, s, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        norms.append(float(torch.linalg.vector_norm(Vh[:gate_k] @ x64)))
        update = U[:, :k] @ torch.diag(s[:k]) @ Vh[:k] @ x64
        updates.append(update + (0 if bias is None else bias.double()))
    weights = torch.softmax(torch.tensor(norms, dtype=torch.float64), dim=0)
    order = sorted(range(len(norms)), key=lambda e: -float(weights[e]))[:top_k]
    total = sum(float(weights[e]) for e in order)
    out = base.weight.double() @ x64 + (0 if base.bias is None else base.bias.double())
    for e in order:
        out = out + float(weights[e]) / total * updates[e]
    return out


def random_layer(seed: int, m: int = 12, n: int = 10, experts: int = 4, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(n, m, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(m, n, generator=gen))
        if bias:
            base.bias.copy_(torch.randn(m, generator=gen))
    deltas = [0.5 * torch.randn(m, n, generator=gen) for _ in range(experts)]
    biases = [0.1 * torch.randn(m, generator=gen) if bias else None for _ in range(experts)]
    return base, deltas, biases, gen


@pytest.mark.parametrize(("k", "gate_k", "top_k", "bias"), [(3, 3, 2, True), (2, 1, 1, True), (5, 2, 3, False),
                                                             (10, 10, 4, True)])
def test_layer_matches_the_per_token_reference(k: int, gate_k: int, top_k: int, bias: bool) -> None:
    base, deltas, biases, gen = random_layer(k + 7 * top_k, bias=bias)
    layer = SmileLinear(base, deltas, biases, k=k, gate_k=gate_k, top_k=top_k)
    x = torch.randn(3, 5, 10, generator=gen)  # [batch, tokens, features]: every token routed on its own
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (3, 5, 12)
    for b in range(3):
        for t in range(5):
            want = reference_token(x[b, t], base, deltas, biases, k, gate_k, top_k)
            torch.testing.assert_close(out[b, t].double(), want, atol=1e-5, rtol=1e-5)


def test_tokens_pick_different_experts() -> None:
    """The gate is per token: tokens lying in different experts' input subspaces pick those experts."""
    gen = torch.Generator().manual_seed(0)
    n = 8
    base = nn.Linear(n, 6, bias=False)
    axes = torch.eye(n)
    deltas = [torch.randn(6, 1, generator=gen) @ axes[e : e + 1] for e in range(3)]  # rank 1 along axis e
    layer = SmileLinear(base, deltas, [None] * 3, k=1, gate_k=1, top_k=1)
    _, picked = layer.routing(3.0 * axes[:3])
    assert picked.flatten().tolist() == [0, 1, 2]


def test_rank_deficient_expert_is_exact_and_gates_on_its_own_directions() -> None:
    """A rank-2 delta under k = 4 is reconstructed exactly; its gate has no arbitrary null-space directions
    (they are zero columns), so a token orthogonal to the delta's row space scores zero for it."""
    gen = torch.Generator().manual_seed(1)
    base = nn.Linear(6, 5, bias=False)
    low = torch.randn(5, 2, generator=gen) @ torch.randn(2, 6, generator=gen)
    layer = SmileLinear(base, [low, torch.randn(5, 6, generator=gen)], [None, None], k=4, gate_k=4, top_k=1)
    x = torch.randn(6, generator=gen)
    torch.testing.assert_close(layer.SV[0] @ layer.U[0].T, low.T, atol=1e-5, rtol=1e-5)
    null = x - torch.linalg.pinv(low) @ (low @ x)  # component of x outside the row space of `low`
    gate_scores = (layer.gate @ null).view(2, 4).norm(dim=1)
    assert float(gate_scores[0]) < 1e-5 < float(gate_scores[1])


def test_top_k_above_the_number_of_experts_is_an_option_error() -> None:
    base, deltas, biases, _ = random_layer(0, experts=2)
    with pytest.raises(OptionError, match="top_k 3"):
        SmileLinear(base, deltas, biases, k=2, gate_k=2, top_k=3)


def tiny_bert(seed: int) -> nn.Module:
    from transformers import BertModel

    torch.manual_seed(seed)
    return BertModel(bert_config(), add_pooling_layer=False).eval()


def expert_of(base: nn.Module, seed: int, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The base's state with a random change on every Linear weight and bias (``keys``: only those)."""
    gen = torch.Generator().manual_seed(seed)
    state = {key: value.clone() for key, value in base.state_dict().items()}
    linears = {f"{name}.{p}" for name, m in base.named_modules() if isinstance(m, nn.Linear) for p in ("weight", "bias")}
    for key in sorted(linears if keys is None else keys):
        state[key] = state[key] + 0.05 * torch.randn(state[key].shape, generator=gen)
    return state


def outputs(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(5))
    if state is not None:
        model = tiny_bert(0)
        model.load_state_dict(state)
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_one_expert_at_full_rank_is_that_expert() -> None:
    """T = 1, k = min(m, n): every changed Linear is the expert's own, so the model is the expert."""
    base = tiny_bert(0)
    expert = expert_of(base, 1)
    smile = build_smile(base, [task_vector(base.state_dict(), expert)], SmileSettings(k=32, top_k=1))
    torch.testing.assert_close(outputs(smile), outputs(base, expert), atol=1e-4, rtol=1e-4)


def test_equal_experts_top2_is_that_expert() -> None:
    """Two copies of one expert with top_k = 2: the renormalized weights sum to 1 over the same update."""
    base = tiny_bert(0)
    expert = expert_of(base, 2)
    tv = task_vector(base.state_dict(), expert)
    smile = build_smile(base, [tv, tv], SmileSettings(k=32, top_k=2))
    torch.testing.assert_close(outputs(smile), outputs(base, expert), atol=1e-4, rtol=1e-4)


def test_unchanged_layers_stay_the_base_and_storage_counts_what_is_kept() -> None:
    base = tiny_bert(0)
    changed = {"encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.intermediate.dense.bias"}
    tvs = [task_vector(base.state_dict(), expert_of(base, seed, changed)) for seed in (3, 4)]
    smile = build_smile(base, tvs, SmileSettings(k=3, gate_k=2))
    swapped = [name for name, m in smile.named_modules() if isinstance(m, SmileLinear)]
    assert swapped == ["encoder.layer.0.intermediate.dense"]
    assert type(base.encoder.layer[0].intermediate.dense) is nn.Linear  # the base itself is untouched
    m, n = base.encoder.layer[0].intermediate.dense.weight.shape  # 64 x 32
    extra = 2 * (m * 3 + n * 3) + 2 * 2 * n + 2 * m  # U, sV^T, gate and bias deltas of 2 experts
    base_numel = sum(v.numel() for v in base.state_dict().values() if v.is_floating_point())
    assert storage_factor(smile, base) == pytest.approx((base_numel + extra) / base_numel)


def test_default_ranks_follow_the_mass_rank_rule() -> None:
    base = tiny_bert(0)
    tvs = [task_vector(base.state_dict(), expert_of(base, seed)) for seed in range(4)]
    smile = build_smile(base, tvs)
    layer = smile.encoder.layer[1].intermediate.dense  # 64 x 32 at T = 4: floor(32 / 4) = 8
    assert isinstance(layer, SmileLinear) and layer.U.shape == (4, 64, 8) and layer.gate.shape == (32, 32)
    assert layer.top_k == 2
