"""massmerge's SMILE (``massmerge.smile.build_smile``) against FusionBench's own SMILE, to 1e-5, on a tiny BERT.

What it checks: a random BERT (hidden 32, 4 layers, vocabulary 99, dropout 0) and T = 4 seeded experts (the
base plus a random dense change of every ``nn.Linear`` weight and bias) are saved as HF checkpoints
(safetensors) in a temp dir. A child process in FusionBench's venv loads them with ``BertModel.from_pretrained``,
builds ``SmileUpscalingAlgorithm(device="cpu", upscaling_accelerator=None, full_matrices=True,
routing_use_diff=True, average_experts=False, k, gate_k, top_k).merge(pretrained, finetuned)`` and writes, per
setting, ``last_hidden_state`` of fixed ``input_ids`` plus, for every ``SmileMoELinear``, the hidden input it saw,
its output and the experts its gate picked. This script builds ``build_smile(base, task vectors,
SmileSettings(k, gate_k, top_k))`` from the same checkpoints and compares, all in float32:
- ``model``: max |difference| of ``last_hidden_state``;
- ``layer``: max |difference| over every layer of our ``SmileLinear`` output and FusionBench's on FusionBench's
  own input to that layer (the worst layer is named);
- ``routing``: tokens, over all layers, whose set of picked experts differs;
- ``vs base``: max |difference| of FusionBench's SMILE output from the plain base's (that SMILE changed the model).
Exit status 1 if ``model`` or ``layer`` exceeds ``--tol`` (1e-5) or any routing differs.

Known designed difference, avoided here: massmerge's truncated SVD drops numerically-null directions (a delta of
rank r < k keeps r), while FusionBench keeps the arbitrary null-space singular vectors LAPACK returns, which
enter its gate norms; random dense deltas have full rank, so both keep the same k directions. Settings with
``gate_k >= 32`` (the hidden size: the input width of every layer but the FFN output) and ``top_k < T`` are
refused: a full-rank delta's top-32 right singular vectors span all of R^32, every gate logit is ``||x||``, and
``top_k`` then breaks exact ties by rounding noise in both tools (no parity to check).
``--intermediate 128`` (4 x hidden, BERT's own ratio) makes the FFN matrices 128 x 32 and so sends them through
massmerge's Gram-matrix exact SVD (aspect >= 4) instead of LAPACK's; the default 64 keeps every matrix on LAPACK.
Measured: every layer agrees to ~5e-8 on LAPACK's path; on the Gram path the FFN layers differ by ~4e-6, which is
FusionBench's float32 ``torch.linalg.svd`` error (its rank-k reconstructions are ~7e-7 off the float64 SVD's,
massmerge's Gram-path ones ~1e-8): within 1e-5 here, but it grows with the matrix size.

Optional, by hand, never in CI. Set-up: ``bash bench/peers/setup.sh fusion-bench``. Run (massmerge's python):
``python bench/peers/smile_parity.py [--intermediate 128] [--settings 4,4,2 8,1,1 16,4,2]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging

from massmerge.smile import SmileLinear, SmileSettings, build_smile
from massmerge.task_vectors import task_vector

HERE = Path(__file__).resolve().parent
PEER_PYTHON = HERE / ".venvs" / "fusion-bench" / "bin" / "python"
SETTINGS = ("4,4,2", "8,1,1", "16,4,2")
NUM_EXPERTS = 4
HIDDEN = 32
DELTA_SCALE = 0.02  # BERT's init std: each expert moves every Linear as much as the weights themselves

CHILD = r'''
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import BertModel
from fusion_bench.method import SmileUpscalingAlgorithm
from fusion_bench.models.smile_moe.linear_from_module import SmileMoELinear

job = json.loads(sys.argv[1])
input_ids = load_file(job["inputs"])["input_ids"]

def load(path):
    return BertModel.from_pretrained(path, attn_implementation="eager").float().eval()

def record(name, store):
    def hook(module, args, out):
        x = args[0].reshape(-1, module.in_features)
        picked = torch.softmax(module.gate(x), dim=1).topk(module.top_k, dim=1).indices
        store["in." + name] = args[0].detach().clone()
        store["out." + name] = out.detach().clone()
        store["experts." + name] = picked.sort(dim=1).values.contiguous()
    return hook

for k, gate_k, top_k in job["settings"]:
    algorithm = SmileUpscalingAlgorithm(device="cpu", upscaling_accelerator=None, full_matrices=True, gate_k=gate_k,
                                        k=k, top_k=top_k, routing_use_diff=True, average_experts=False)
    with torch.no_grad():
        model = algorithm.merge(load(job["base"]), [load(p) for p in job["experts"]]).eval()
        store = {}
        for name, module in model.named_modules():
            if isinstance(module, SmileMoELinear):
                module.register_forward_hook(record(name, store))
        store["last_hidden_state"] = model(input_ids=input_ids).last_hidden_state.contiguous()
    save_file(store, f"{job['out']}/fb_{k}_{gate_k}_{top_k}.safetensors")
'''


def parser_with_peer_options() -> argparse.ArgumentParser:
    """The options both SMILE parity scripts take (settings, tolerance, the peer's python)."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help="k,gate_k,top_k triples")
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    return parser


def checked_settings(args: argparse.Namespace, width: int, experts: int) -> list[tuple[int, int, int]]:
    """The parsed settings, once the peer's venv is there (transformers' logs quieted); a gate of ``width`` or more
    directions with ``top_k < experts`` is refused (the gate is constant: the module doc)."""
    if not args.peer_python.exists():
        raise SystemExit(f"no FusionBench venv at {args.peer_python}: run `bash bench/peers/setup.sh fusion-bench`")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    settings = [parse_setting(s) for s in args.settings]
    for _, gate_k, top_k in settings:
        if gate_k >= width and top_k < experts:
            raise SystemExit(f"gate_k {gate_k} >= width {width} with top_k < T: the gate is constant (docstring)")
    return settings


def parse_setting(text: str) -> tuple[int, int, int]:
    k, gate_k, top_k = (int(v) for v in text.split(","))
    return k, gate_k, top_k


def bert_config(intermediate: int) -> BertConfig:
    return BertConfig(vocab_size=99, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=intermediate, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def expert_state(base: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The base's state with a random dense change on every ``nn.Linear`` weight and bias."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for name, module in base.named_modules():
        if type(module) is nn.Linear:
            for key in (f"{name}.weight", f"{name}.bias"):
                if key in state:
                    state[key] += DELTA_SCALE * torch.randn(state[key].shape, generator=gen)
    return state


def write_models(root: Path, intermediate: int) -> tuple[Path, list[Path]]:
    """A random base BERT and ``NUM_EXPERTS`` seeded experts, saved with ``save_pretrained`` (safetensors)."""
    torch.manual_seed(0)
    base = BertModel(bert_config(intermediate)).eval()
    base.save_pretrained(root / "base", safe_serialization=True)
    experts = []
    for i in range(NUM_EXPERTS):
        model = BertModel(bert_config(intermediate)).eval()
        model.load_state_dict(expert_state(base, seed=100 + i))
        model.save_pretrained(root / f"expert_{i}", safe_serialization=True)
        experts.append(root / f"expert_{i}")
    return root / "base", experts


def load(path: Path) -> nn.Module:
    return BertModel.from_pretrained(path, attn_implementation="eager").float().eval()


def run_peer(peer_python: Path, job: dict[str, object], root: Path, child: str = CHILD) -> None:
    """Run ``child`` (FusionBench's side) in the peer's venv with ``job`` as its argument (shared with
    smile_t5_parity.py)."""
    script = root / "fusion_bench_child.py"
    script.write_text(child, encoding="utf-8")
    proc = subprocess.run([str(peer_python), str(script), json.dumps(job)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"FusionBench child failed (exit {proc.returncode})")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def compare(model: nn.Module, input_ids: torch.Tensor, peer: dict[str, torch.Tensor]) -> dict[str, object]:
    """Model, worst-layer and routing differences between our SMILE model and FusionBench's recorded one."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SmileLinear)}
    peer_layers = sorted(key[len("out."):] for key in peer if key.startswith("out."))
    if sorted(layers) != peer_layers:
        raise SystemExit(f"SMILE layers differ: ours {sorted(layers)} vs FusionBench {peer_layers}")
    worst, worst_layer, flips, tokens = 0.0, "", 0, 0
    with torch.no_grad():
        out = model(input_ids=input_ids).last_hidden_state
        for name, layer in layers.items():
            x = peer[f"in.{name}"]
            diff = max_diff(layer(x), peer[f"out.{name}"])
            if diff >= worst:
                worst, worst_layer = diff, name
            ours = layer.routing(x.reshape(-1, x.shape[-1]))[1].sort(dim=1).values
            flips += int((ours != peer[f"experts.{name}"]).any(dim=1).sum())
            tokens += ours.shape[0]
    return {"model": max_diff(out, peer["last_hidden_state"]), "layer": worst, "worst_layer": worst_layer,
            "routing": f"{flips}/{tokens}"}


def main() -> None:
    parser = parser_with_peer_options()
    parser.add_argument("--intermediate", type=int, default=64, help="BERT intermediate size (128: Gram SVD path)")
    args = parser.parse_args()
    settings = checked_settings(args, HIDDEN, NUM_EXPERTS)
    with tempfile.TemporaryDirectory(prefix="smile_parity_") as tmp:
        root = Path(tmp)
        base_dir, expert_dirs = write_models(root, args.intermediate)
        input_ids = torch.randint(0, 99, (2, 16), generator=torch.Generator().manual_seed(1))
        save_file({"input_ids": input_ids}, str(root / "inputs.safetensors"))
        job = {"base": str(base_dir), "experts": [str(p) for p in expert_dirs], "settings": settings,
               "inputs": str(root / "inputs.safetensors"), "out": str(root)}
        run_peer(args.peer_python, job, root)
        base = load(base_dir)
        base_state = base.state_dict()
        vectors = [task_vector(base_state, load(p).state_dict()) for p in expert_dirs]
        with torch.no_grad():
            plain = base(input_ids=input_ids).last_hidden_state
        rows = []
        for k, gate_k, top_k in settings:
            ours = build_smile(base, vectors, SmileSettings(k=k, gate_k=gate_k, top_k=top_k))
            peer = load_file(str(root / f"fb_{k}_{gate_k}_{top_k}.safetensors"))
            row = compare(ours, input_ids, peer) | {"vs base": max_diff(plain, peer["last_hidden_state"])}
            rows.append(((k, gate_k, top_k), row))
    failed = report(rows, args.tol, args.intermediate)
    sys.exit(1 if failed else 0)


def report(rows: list[tuple[tuple[int, int, int], dict[str, object]]], tol: float, intermediate: int) -> bool:
    print(f"SMILE parity, massmerge vs FusionBench: BERT hidden {HIDDEN} x intermediate {intermediate}, T={NUM_EXPERTS}, "
          f"tolerance {tol:g}")
    print(f"{'k,gate_k,top_k':>15} {'model max|d|':>13} {'layer max|d|':>13} {'routing flips':>14} {'vs base':>9}"
          "  worst layer")
    failed = False
    for (k, gate_k, top_k), r in rows:
        bad = r["model"] > tol or r["layer"] > tol or not str(r["routing"]).startswith("0/")
        failed |= bad
        print(f"{f'{k},{gate_k},{top_k}':>15} {r['model']:>13.2e} {r['layer']:>13.2e} {r['routing']:>14} {r['vs base']:>9.2e}  "
              f"{r['worst_layer']}{'  FAIL' if bad else ''}")
    return failed


if __name__ == "__main__":
    main()
