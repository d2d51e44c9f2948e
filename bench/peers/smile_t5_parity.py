"""massmerge's SMILE (``massmerge.smile.build_smile``) against FusionBench's own SMILE, to 1e-5, on a tiny T5.

What it checks: a random ``T5ForConditionalGeneration`` (d_model 32, 2 + 2 blocks, 4 heads, d_ff 64, gated-gelu,
vocabulary 99, an untied LM head as Flan-T5's, dropout 0) and T = 4 seeded experts (the base plus a random dense
change of EVERY tensor: Linear weights, the shared embedding, relative-attention biases and norms) are saved as HF
checkpoints (safetensors). A child process in FusionBench's venv loads them with
``T5ForConditionalGeneration.from_pretrained``, builds ``SmileUpscalingAlgorithm(device="cpu",
upscaling_accelerator=None, full_matrices=True, routing_use_diff=True, average_experts=False, k, gate_k,
top_k).merge(pretrained, finetuned)`` and records, per setting, one forward of fixed ``input_ids`` (one prompt
padded), ``attention_mask`` and ``decoder_input_ids``: the encoder's and the decoder's last hidden states and the
logits, plus, for every ``SmileMoELinear``, the input it saw, its output and the experts its gate picked; then
greedy ``generate(max_new_tokens=8)`` of the prompts. This script builds ``build_smile(base, task vectors,
SmileSettings(k, gate_k, top_k))`` from the same checkpoints and compares, all in float32:
- ``layers``: that both upscale the same modules (every encoder, decoder and LM-head Linear; the embedding,
  relative biases and norms stay the base's in both, FusionBench's ``average_experts: false``);
- ``encoder`` / ``decoder`` / ``logits``: max |difference| of the forward's outputs;
- ``layer``: max |difference| over every layer of our ``SmileLinear`` output and FusionBench's on FusionBench's
  own input to that layer (the worst layer is named);
- ``routing``: tokens, over all layers, whose set of picked experts differs;
- ``generate``: whether the greedy token ids are identical;
- ``vs base``: max |difference| of FusionBench's SMILE logits from the plain base's (that SMILE changed the model).
Exit status 1 if ``encoder``, ``decoder``, ``logits`` or ``layer`` exceeds ``--tol`` (1e-5), any routing differs
or the generated ids differ. The settings refused and why: bench/peers/smile_parity.py's docstring (``gate_k`` at
the input width makes every gate logit ``||x||``).

Optional, by hand, never in CI. Set-up: ``bash bench/peers/setup.sh fusion-bench``. Run (massmerge's python):
``python bench/peers/smile_t5_parity.py [--settings 4,4,2 8,1,1 16,4,2]``.
Measured (2026-12-05, fusion-bench 0.2.33, torch 2.13.0+cpu, transformers 5.25.0; default settings), max |d|:
encoder 6.0e-7 to 1.2e-6, decoder 8.3e-7 to 8.9e-7, logits 6.2e-6 to 7.6e-6 (the base's logits reach 22), worst
layer 9.5e-7 to 1.9e-6 (``lm_head``), 0/660 routing flips, identical greedy ids, all 37 Linears upscaled by both;
docs/BENCHMARKS.md, "SMILE parity with FusionBench", has the table.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from smile_parity import checked_settings, max_diff, parser_with_peer_options, run_peer
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from massmerge.smile import SmileLinear, SmileSettings, build_smile
from massmerge.task_vectors import task_vector

NUM_EXPERTS = 4
D_MODEL = 32
VOCAB = 99
DELTA_SCALE = 0.2  # each tensor moves by 0.2 x its mean |value|, as tests/glue_fixtures.py's experts do
NEW_TOKENS = 8

CHILD = r'''
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import T5ForConditionalGeneration
from fusion_bench.method import SmileUpscalingAlgorithm
from fusion_bench.models.smile_moe.linear_from_module import SmileMoELinear

job = json.loads(sys.argv[1])
batch = load_file(job["inputs"])

def load(path):
    return T5ForConditionalGeneration.from_pretrained(path).float().eval()

def record(name, store):
    def hook(module, args, out):
        x = args[0].reshape(-1, module.in_features)
        picked = torch.softmax(module.gate(x), dim=1).topk(module.top_k, dim=1).indices
        store["in." + name] = args[0].detach().clone().contiguous()
        store["out." + name] = out.detach().clone().contiguous()
        store["experts." + name] = picked.sort(dim=1).values.contiguous()
    return hook

for k, gate_k, top_k in job["settings"]:
    algorithm = SmileUpscalingAlgorithm(device="cpu", upscaling_accelerator=None, full_matrices=True, gate_k=gate_k,
                                        k=k, top_k=top_k, routing_use_diff=True, average_experts=False)
    with torch.no_grad():
        model = algorithm.merge(load(job["base"]), [load(p) for p in job["experts"]]).eval()
        store, hooks = {}, []
        for name, module in model.named_modules():
            if isinstance(module, SmileMoELinear):
                hooks.append(module.register_forward_hook(record(name, store)))
        out = model(**batch, output_hidden_states=True)
        for hook in hooks:
            hook.remove()
        store["encoder"] = out.encoder_last_hidden_state.contiguous()
        store["decoder"] = out.decoder_hidden_states[-1].contiguous()
        store["logits"] = out.logits.contiguous()
        prompt = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        store["generated"] = model.generate(**prompt, max_new_tokens=job["new_tokens"], do_sample=False,
                                            num_beams=1).contiguous()
    save_file(store, f"{job['out']}/fb_{k}_{gate_k}_{top_k}.safetensors")
'''


def t5_config() -> T5Config:
    config = T5Config(vocab_size=VOCAB, d_model=D_MODEL, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      dropout_rate=0.0)
    config.tie_word_embeddings = False  # Flan-T5's untied head (transformers 5's constructor forces the tie on)
    config.scale_decoder_outputs = False
    return config


def expert_state(base: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The base's state with a random dense change of every tensor (SMILE must keep the non-Linear ones)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for value in state.values():
        value += DELTA_SCALE * value.abs().mean() * torch.randn(value.shape, generator=gen)
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):  # tied to shared, as saved
        state[alias] = state["shared.weight"]
    return state


def write_models(root: Path) -> tuple[Path, list[Path]]:
    """A random base T5 and ``NUM_EXPERTS`` seeded experts, saved with ``save_pretrained`` (safetensors)."""
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(t5_config()).eval()
    base.save_pretrained(root / "base", safe_serialization=True)
    experts = []
    for i in range(NUM_EXPERTS):
        model = T5ForConditionalGeneration(t5_config()).eval()
        model.load_state_dict(expert_state(base, seed=100 + i))
        model.save_pretrained(root / f"expert_{i}", safe_serialization=True)
        experts.append(root / f"expert_{i}")
    return root / "base", experts


def load(path: Path) -> nn.Module:
    return T5ForConditionalGeneration.from_pretrained(path).float().eval()


def fixed_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, 8:], mask[1, 8:] = 0, 0  # the second prompt padded
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(2, VOCAB, (2, 6), generator=gen)}


def compare(model: nn.Module, batch: dict[str, torch.Tensor], peer: dict[str, torch.Tensor]) -> dict[str, object]:
    """Forward, worst-layer, routing and generation differences between our SMILE T5 and FusionBench's."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SmileLinear)}
    peer_layers = sorted(key[len("out."):] for key in peer if key.startswith("out."))
    if sorted(layers) != peer_layers:
        raise SystemExit(f"SMILE layers differ: ours {sorted(layers)} vs FusionBench {peer_layers}")
    worst, worst_layer, flips, tokens = 0.0, "", 0, 0
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        for name, layer in layers.items():
            x = peer[f"in.{name}"]
            diff = max_diff(layer(x), peer[f"out.{name}"])
            if diff >= worst:
                worst, worst_layer = diff, name
            ours = layer.routing(x.reshape(-1, x.shape[-1]))[1].sort(dim=1).values
            flips += int((ours != peer[f"experts.{name}"]).any(dim=1).sum())
            tokens += ours.shape[0]
        prompt = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        generated = model.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)
    same = generated.shape == peer["generated"].shape and bool(torch.equal(generated, peer["generated"]))
    return {"layers": len(layers), "encoder": max_diff(out.encoder_last_hidden_state, peer["encoder"]),
            "decoder": max_diff(out.decoder_hidden_states[-1], peer["decoder"]),
            "logits": max_diff(out.logits, peer["logits"]), "layer": worst, "worst_layer": worst_layer,
            "routing": f"{flips}/{tokens}", "generate": "same" if same else "DIFFERENT"}


def main() -> None:
    args = parser_with_peer_options().parse_args()
    settings = checked_settings(args, D_MODEL, NUM_EXPERTS)
    with tempfile.TemporaryDirectory(prefix="smile_t5_parity_") as tmp:
        root = Path(tmp)
        base_dir, expert_dirs = write_models(root)
        batch = fixed_batch()
        save_file(batch, str(root / "inputs.safetensors"))
        job = {"base": str(base_dir), "experts": [str(p) for p in expert_dirs], "settings": settings,
               "inputs": str(root / "inputs.safetensors"), "out": str(root), "new_tokens": NEW_TOKENS}
        run_peer(args.peer_python, job, root, CHILD)
        base = load(base_dir)
        base_state = base.state_dict()
        vectors = [task_vector(base_state, load(p).state_dict()) for p in expert_dirs]
        with torch.no_grad():
            plain = base(**batch).logits
        rows = []
        for k, gate_k, top_k in settings:
            ours = build_smile(base, vectors, SmileSettings(k=k, gate_k=gate_k, top_k=top_k))
            peer = load_file(str(root / f"fb_{k}_{gate_k}_{top_k}.safetensors"))
            rows.append(((k, gate_k, top_k), compare(ours, batch, peer) | {"vs base": max_diff(plain, peer["logits"])}))
    sys.exit(1 if report(rows, args.tol) else 0)


def report(rows: list[tuple[tuple[int, int, int], dict[str, object]]], tol: float) -> bool:
    print(f"SMILE parity on T5, massmerge vs FusionBench: d_model {D_MODEL}, 2 + 2 blocks, vocab {VOCAB}, "
          f"T={NUM_EXPERTS}, tolerance {tol:g}")
    print(f"{'k,gate_k,top_k':>15} {'layers':>6} {'encoder':>9} {'decoder':>9} {'logits':>9} {'layer':>9} "
          f"{'routing':>9} {'generate':>9} {'vs base':>8}  worst layer")
    failed = False
    for (k, gate_k, top_k), r in rows:
        bad = (max(r["encoder"], r["decoder"], r["logits"], r["layer"]) > tol
               or not str(r["routing"]).startswith("0/") or r["generate"] != "same")
        failed |= bad
        print(f"{f'{k},{gate_k},{top_k}':>15} {r['layers']:>6} {r['encoder']:>9.2e} {r['decoder']:>9.2e} "
              f"{r['logits']:>9.2e} {r['layer']:>9.2e} {r['routing']:>9} {r['generate']:>9} {r['vs base']:>8.2e}  "
              f"{r['worst_layer']}{'  FAIL' if bad else ''}")
    return failed


if __name__ == "__main__":
    main()
