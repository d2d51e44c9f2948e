"""Cost of routed generation (issue 29): MASS ``generate()`` against plain HF ``generate()`` of the base.

The model: ``T5ForConditionalGeneration`` with flan-t5-base's real shapes (d_model 768, d_kv 64, 12 heads, d_ff
2048 gated-gelu, vocab 32128) and random weights (no download); ``--layers`` encoder and decoder blocks (12 is
flan-t5-base; fewer for a quick run, said in the output). Experts, T = 8:

- ``full``: every matrix a seeded low-rank delta at MASS's design rank (1/T of min(m, n) per task, orthonormal
  U and V, small spectra: the shapes full fine-tunes give after factoring), relative-attention biases and norms
  as non-matrix deltas;
- ``lora16``: rank-16 deltas on ``q`` and ``v`` only (FusionBench's ``_lora-16`` experts).

Per batch size (mixed task sets: each prompt a seeded set of 1 to 3 tasks, as the router's eta / K rule can pick,
or exactly ``--set-size`` tasks):

- prompt throughput: prompts per second of the encoder pass (plain vs under the task sets);
- decode tokens per second: new tokens per second of ``generate()`` past the encoder (whole generate time
  minus the encoder's), greedy, exactly ``--new-tokens`` tokens (``min_new_tokens``); the decode ratio is the
  median over rounds of each round's plain / routed decode seconds (wall, and CPU seconds of this process); the
  steady decode ratio leaves out the first decode step (generate of ``--new-tokens`` minus generate of one token:
  the first step also projects the prompt for cross-attention and lays out each pass's mixing);
- what exact side branches can reach at best (:func:`bounds`): the flop bound (every row multiplies its own set's
  factors) and the traffic bound (every distinct set's factors and core read once per step);
- the router's own cost: ``MASSModel.route`` (first pass to the routing layer + router) per batch;
- memory: the process's RSS once set up (base + plain copy + factors), its peak over the timed runs of each
  kind, the difference (the working set of generation, plain and routed: activations, caches, gathered rows,
  any dense weight), and the factors' and base's bytes.

``--grouped``: instead, ``GROUP_WINDOW`` batches of mixed prompts decoded in the input's order and in batches cut
in set order (``Predictor.generate``'s order, so ``massmerge predict``'s: every other window backwards), each
against plain generate of the same prompts; decode seconds are generate of ``--new-tokens`` minus generate of one
token.

Plain and routed calls alternate within each of ``--repeats`` rounds after a warm-up round, so a noisy
neighbour slows both alike; wall and CPU seconds are both printed (compare the ratios within one run). A set's
dense weights are bought matrix by matrix as its side branches pay for them (rent or buy,
``massmerge.mass.second_pass.buy_dense``), so a set's cost falls over its first calls: the decode ratio is given
as the median over rounds and for the first and the last round.

    python bench/generate_cost.py [--layers 12] [--batches 1 16 64] [--prompt-tokens 32] [--new-tokens 8]
        [--kinds full lora16] [--repeats 3] [--set-size 1|2|3] [--threads N] [--grouped] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    current_rss_bytes,
    factors_bytes,
    mib,
    orthonormal,
    peak_rss_bytes,
    reset_peak_rss,
    table,
    write_json,
)

TASKS = 8


def flan_t5_base(layers: int) -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=layers,
                      num_decoder_layers=layers, num_heads=12, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).eval()


def expert_factors(model: torch.nn.Module, kind: str) -> Any:
    """T seeded low-rank experts with the shapes of ``kind`` (module doc)."""
    from massmerge.adapters.seq2seq import is_factored, merged_keys
    from massmerge.lowrank import LowRank, rank_for
    from massmerge.mass import ExpertFactors

    names = [f"task{t}" for t in range(TASKS)]
    factors = ExpertFactors(task_names=names, rank_fraction=1.0 / TASKS)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(1)
    for key in merged_keys(model):
        value = state[key]
        if kind == "lora16" and not key.endswith(("SelfAttention.q.weight", "SelfAttention.v.weight",
                                                  "EncDecAttention.q.weight", "EncDecAttention.v.weight")):
            continue
        if is_factored(key, value):
            k = 16 if kind == "lora16" else rank_for(tuple(value.shape), 1.0 / TASKS)
            factors.matrices[key] = [LowRank(orthonormal(value.shape[0], k),
                                             0.05 * torch.rand(k, generator=gen).sort(descending=True).values,
                                             orthonormal(value.shape[1], k)) for _ in names]
        elif kind == "full":
            factors.non_matrix[key] = [0.01 * torch.randn(value.shape, generator=gen) for _ in names]
    factors.apply_deredundancy(0.3)
    return factors


def mixed_sets(size: int, seed: int, set_size: int | None) -> list[tuple[int, ...]]:
    """A task set per prompt: ``set_size`` tasks (None: 1 to 3, uniformly, as the eta / K rule can pick), seeded."""
    rng = random.Random(seed)
    return [tuple(sorted(rng.sample(range(TASKS), set_size or rng.randint(1, 3)))) for _ in range(size)]


def prompts(size: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 32000, (size, length), generator=gen)
    mask = torch.ones(size, length, dtype=torch.long)
    for row in range(size):  # ragged prompts: padding on the right, as a tokenizer pads
        cut = int(torch.randint(0, length // 2, (1,), generator=gen))
        if cut:
            ids[row, -cut:], mask[row, -cut:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Per name, (wall, CPU seconds) of each round; the functions alternate within a round (one warm-up round
    first), so that a noisy neighbour slows plain and routed alike."""
    for fn in fns.values():
        fn()
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            cpu, start = cpu_seconds(), time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - start, cpu_seconds() - cpu))
    return out


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def decoder_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """The matrices one decode step multiplies per token: the decoder's (cross-attention's k and v run on the
    encoder's output once, not per step) and the LM head."""
    return {f"{name}.weight": tuple(module.weight.shape) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and (name.startswith("decoder.") or name == "lm_head")
            and not name.endswith(("EncDecAttention.k", "EncDecAttention.v"))}


def bounds(model: torch.nn.Module, factors: Any, sets: list[tuple[int, ...]]) -> dict[str, float]:
    """What exact side branches can reach at best, per decode step: ``flop bound`` = plain multiply-adds / (plain +
    every row's side branch ``K_S (m + n)``); ``traffic bound`` = plain's weight reads / (plain's + every distinct
    set's factor rows and core, each read once per step: ``K_S (m + n) + K_S^2``). Memory-bound decoding (small
    batches) sits near the traffic bound, compute-bound decoding (large batches) near the flop bound."""
    shapes = decoder_shapes(model)
    plain = sum(m * n for m, n in shapes.values())
    rank = {key: [f.rank for f in factors.matrices[key]] for key in shapes if key in factors.matrices}

    def k_of(key: str, tasks: tuple[int, ...]) -> int:
        return sum(rank[key][t] for t in tasks) if key in rank else 0

    side_rows = sum(k_of(key, s) * (m + n) for s in sets for key, (m, n) in shapes.items()) / len(sets)
    side_sets = sum(k_of(key, s) * (m + n + k_of(key, s)) for s in set(sets) for key, (m, n) in shapes.items())
    return {"flop bound": plain / (plain + side_rows), "traffic bound": plain / (plain + side_sets)}


def grouped(mass: Any, plain: torch.nn.Module, kind: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """``GROUP_WINDOW`` batches of ``size`` prompts with mixed sets, decoded in the input's order and in batches cut
    in set order (what ``Predictor.generate`` / ``massmerge predict`` do), against plain generate of the same
    batches. Decode seconds: generate of ``--new-tokens`` minus generate of one token, per window and round."""
    from massmerge.artifact.predictor import GROUP_WINDOW
    from massmerge.mass.batch import set_order

    count = size * GROUP_WINDOW
    every = prompts(count, args.prompt_tokens, count)
    chosen = mixed_sets(count, count, args.set_size)
    mask = torch.zeros(count, TASKS, dtype=torch.bool)
    for row, tasks in enumerate(chosen):
        mask[row, list(tasks)] = True
    order = set_order(mask)
    batches = {"input order": [torch.arange(i, i + size) for i in range(0, count, size)],
               "set order": [order[i:i + size] for i in range(0, count, size)],
               "set order, backwards": [order.flip(0)[i:i + size] for i in range(0, count, size)]}
    turns = {"set order": False}  # every other window backwards, as Predictor._window_order walks them

    def run(which: str | None, tokens: int) -> None:
        cut = which or "input order"
        if which == "set order":
            backwards, turns[which] = turns[which], not turns[which]
            cut = "set order, backwards" if backwards else which
        for index in batches[cut]:
            batch = {k: v[index].to(args.device) for k, v in every.items()}
            options = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False, "num_beams": 1}
            if which is None:
                plain.generate(**batch, **options)
                continue
            with mass.task_sets([chosen[i] for i in index.tolist()]):
                mass.model.generate(**batch, **options)

    fns = {f"{name} {tokens}": (lambda name=name, tokens=tokens: run(None if name == "plain" else name, tokens))
           for name in ("plain", "input order", "set order") for tokens in (1, args.new_tokens)}
    with torch.inference_mode():
        runs = interleaved(fns, args.repeats)

    def decode(name: str, pick: int) -> list[float]:
        return [b[pick] - a[pick] for a, b in zip(runs[f"{name} 1"], runs[f"{name} {args.new_tokens}"])]

    def ratios(name: str, pick: int) -> list[float]:
        return [p / max(m, 1e-9) for p, m in zip(decode("plain", pick), decode(name, pick))]

    def ratio(name: str, pick: int) -> float:
        return median(ratios(name, pick))

    def sets_per_batch(which: str) -> float:
        return sum(len({chosen[i] for i in b.tolist()}) for b in batches[which]) / GROUP_WINDOW

    return {"experts": kind, "batch": size, "prompts": count, "sets": len(set(chosen)),
            "mean |S|": sum(map(len, chosen)) / count, "sets per batch, input order": sets_per_batch("input order"),
            "sets per batch, set order": sets_per_batch("set order"),
            "decode ratio, input order": ratio("input order", 0), "decode ratio, set order": ratio("set order", 0),
            "set order, round 1": ratios("set order", 0)[0], "set order, last round": ratios("set order", 0)[-1],
            "CPU ratio, input order": ratio("input order", 1), "CPU ratio, set order": ratio("set order", 1)}


def measure(kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from massmerge.adapters.seq2seq import Seq2SeqAdapter
    from massmerge.mass import MASSModel, make_serve_settings

    device = torch.device(args.device)
    model = flan_t5_base(args.layers)
    plain = copy.deepcopy(model).to(device)
    factors = expert_factors(model, kind)
    adapter = Seq2SeqAdapter().bind(model)
    layer = adapter.routing_layer_for(model, factors.matrices)
    mass = MASSModel(model, factors, [], make_serve_settings(**adapter.default_router(model, layer)),
                     pool=adapter.pool, features=adapter.features, device=device)
    options = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
               "num_beams": 1}
    gc.collect()
    settled = current_rss_bytes()  # the model, the plain copy and the factors, set-up transients freed
    reset_peak_rss()
    if args.grouped:
        rows = [grouped(mass, plain, kind, size, args) for size in args.batches]
        print(table(rows, list(rows[0])), flush=True)
        return rows
    rows = []
    for size in args.batches:
        batch = {k: v.to(device) for k, v in prompts(size, args.prompt_tokens, size).items()}
        chosen = mixed_sets(size, size, args.set_size)
        sets = mass.task_sets(chosen)

        def routed_encoder(sets: Any = sets, batch: dict = batch) -> Any:
            with sets:
                return mass.model.encoder(**batch)

        def routed_generate(sets: Any = sets, batch: dict = batch, options: dict = options) -> Any:
            with sets:
                return mass.model.generate(**batch, **options)

        first = {**options, "max_new_tokens": 1, "min_new_tokens": 1}

        with torch.inference_mode():
            runs = interleaved({"enc plain": lambda batch=batch: plain.encoder(**batch), "enc MASS": routed_encoder,
                                "gen plain": lambda batch=batch: plain.generate(**batch, **options),
                                "gen MASS": routed_generate, "route": lambda batch=batch: mass.route(batch),
                                "gen1 plain": lambda batch=batch, first=first: plain.generate(**batch, **first),
                                "gen1 MASS": lambda sets=sets, batch=batch, first=first: routed_generate(sets, batch, first)},
                               args.repeats)
        wall = {name: median([w for w, _ in times]) for name, times in runs.items()}
        cpu = {name: median([c for _, c in times]) for name, times in runs.items()}
        tokens = size * args.new_tokens

        def decode_ratios(pick: int, runs: dict = runs) -> list[float]:  # per round: plain / routed decode seconds
            return [(gp[pick] - ep[pick]) / max(gm[pick] - em[pick], 1e-9) for ep, em, gp, gm in
                    zip(runs["enc plain"], runs["enc MASS"], runs["gen plain"], runs["gen MASS"])]

        def steady_ratios(runs: dict = runs) -> list[float]:  # per round: decode steps 2..N, plain / routed
            return [(gp[0] - p1[0]) / max(gm[0] - m1[0], 1e-9) for p1, m1, gp, gm in
                    zip(runs["gen1 plain"], runs["gen1 MASS"], runs["gen plain"], runs["gen MASS"])]

        rows.append({"experts": kind, "batch": size, "sets": len(set(chosen)),
                     "mean |S|": sum(map(len, chosen)) / size,
                     "prompts/s plain": size / wall["enc plain"], "prompts/s MASS": size / wall["enc MASS"],
                     "prompt ratio": wall["enc plain"] / wall["enc MASS"],
                     "decode tok/s plain": tokens / max(wall["gen plain"] - wall["enc plain"], 1e-9),
                     "decode tok/s MASS": tokens / max(wall["gen MASS"] - wall["enc MASS"], 1e-9),
                     "decode ratio": median(decode_ratios(0)), "decode ratio CPU": median(decode_ratios(1)),
                     "decode ratio, round 1": decode_ratios(0)[0], "decode ratio, last round": decode_ratios(0)[-1],
                     "steady decode ratio": median(steady_ratios()),
                     **bounds(model, mass.factors, chosen),
                     "router s": wall["route"], "router CPU s": cpu["route"],
                     "router / plain generate": wall["route"] / wall["gen plain"],
                     "generate s plain": wall["gen plain"], "generate CPU s plain": cpu["gen plain"],
                     "generate s MASS": wall["gen MASS"], "generate CPU s MASS": cpu["gen MASS"]})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    peak = peak_rss_bytes()
    for row in rows:
        row["set-up RSS MiB"] = mib(settled)
        row["peak RSS MiB"] = mib(peak)
        row["working set MiB"] = mib(peak - settled)
        row["factors MiB"] = mib(factors_bytes(mass.factors))
        row["base MiB"] = mib(sum(v.numel() * v.element_size() for v in plain.state_dict().values()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="encoder and decoder blocks (flan-t5-base: 12)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--kinds", nargs="+", default=["full", "lora16"], choices=["full", "lora16"])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians are reported)")
    parser.add_argument("--set-size", type=int, choices=[1, 2, 3], default=None,
                        help="tasks per prompt's set (default: 1 to 3 at random)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--grouped", action="store_true",
                        help="a window of batches decoded in input order and in set order (what predict does)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layers != 12:
        print(f"note: {args.layers} + {args.layers} blocks, not flan-t5-base's 12 + 12 (a quick run)", flush=True)
    wall = time.perf_counter()
    rows = [row for kind in args.kinds for row in measure(kind, args)]
    if args.grouped:
        print(f"total wall {time.perf_counter() - wall:.1f}s, threads {torch.get_num_threads()}")
        write_json("generate_cost_grouped", {"args": vars(args), "rows": rows})
        return
    columns = ["experts", "batch", "sets", "mean |S|", "prompts/s plain", "prompts/s MASS", "prompt ratio",
               "decode tok/s plain", "decode tok/s MASS", "decode ratio", "decode ratio CPU",
               "decode ratio, round 1", "decode ratio, last round", "steady decode ratio", "flop bound",
               "traffic bound", "router s", "router / plain generate", "generate s plain",
               "generate CPU s plain", "generate s MASS", "generate CPU s MASS", "set-up RSS MiB", "peak RSS MiB",
               "working set MiB", "factors MiB",
               "base MiB"]
    print(table(rows, columns))
    print(f"total wall {time.perf_counter() - wall:.1f}s, threads {torch.get_num_threads()}")
    write_json("generate_cost", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
