"""Serving cost of each router variant of the suite's ablation, on the served path (issue 9's "cost in time
per input").

One artifact, loaded once per variant with serve-setting overrides (``load(dir, router=..., pooling=...)``, as
``massmerge predict --router/--pooling`` does), then the Predictor (what the CLI runs) on real mixed
texts after a warm-up batch, and the first pass + router alone (``MASSModel.route``, on batches tokenized
beforehand). The base is a plain HF forward + mean pool of the same pre-tokenized batches, formed as
``predict`` forms its first-pass batches (by length within windows). Rounds interleave every row;
the minimum CPU time per row is kept (the least disturbed round on a shared machine).

    python bench/router_cost.py --artifact mass-art/ [--inputs 1024] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402
from predict_throughput import base_batches, served_lengths, suite_texts, task_count, timed  # noqa: E402

VARIANTS = {  # name -> load() overrides of the artifact's own serve settings
    "paper (--router paper)": {"router": "paper"},
    "artifact's router": {},
    "artifact's router, --pooling tokens": {"pooling": "tokens"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument("--inputs", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=None, help="[default: the artifact's serve.batch_size]")
    parser.add_argument("--max-length", type=int, default=None, help="[default: the artifact's serve.max_length]")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModel, AutoTokenizer

    from massmerge.artifact import MODEL_DIR
    from massmerge.artifact.predictor import Predictor, predict_file_rows
    from massmerge.mass.pooling import masked_mean

    args.batch_size, args.max_length = served_lengths(args.artifact, args.batch_size, args.max_length)
    texts = suite_texts(args.inputs, 0)
    numbered = list(enumerate(texts, start=1))
    tokenizer = AutoTokenizer.from_pretrained(str(args.artifact / MODEL_DIR))
    base = AutoModel.from_pretrained(str(args.artifact / MODEL_DIR)).eval()
    batches = list(base_batches(texts, tokenizer, args.batch_size, args.max_length, task_count(args.artifact)))

    def plain() -> None:
        with torch.inference_mode():
            for enc in batches:
                masked_mean(base(**enc).last_hidden_state, enc["attention_mask"])

    cpu: dict[str, list[float]] = {"base": []}
    for _ in range(args.rounds):
        cpu["base"].append(timed(plain)[1])
        for name, overrides in VARIANTS.items():
            kwargs = dict(overrides)
            predictor = Predictor(args.artifact, router=kwargs.pop("router", None), batch_size=args.batch_size,
                                  max_length=args.max_length, **kwargs)
            model = predictor.model
            list(predict_file_rows(predictor, numbered[:args.batch_size]))  # warm-up
            cpu.setdefault(f"{name}: predict", []).append(timed(lambda p=predictor: list(predict_file_rows(
                p, numbered)))[1])
            cpu.setdefault(f"{name}: first pass + router", []).append(
                timed(lambda m=model: [m.route(enc) for enc in batches])[1])
    best = {name: min(values) for name, values in cpu.items()}
    rows = [{"measure": name, "cpu_s": round(seconds, 2), "ms_per_input": round(1000 * seconds / args.inputs, 2),
             "base_over_this": round(best["base"] / seconds, 3)} for name, seconds in best.items()]
    print(table(rows, ["measure", "cpu_s", "ms_per_input", "base_over_this"]))
    print(f"\nartifact: {args.artifact}; {args.inputs} real suite texts, batch {args.batch_size}, max length "
          f"{args.max_length}, {args.threads} torch threads; CPU seconds, minimum of {args.rounds} rounds")
    write_json("router_cost", {"args": vars(args) | {"artifact": str(args.artifact)}, "rows": rows, "cpu": cpu})


if __name__ == "__main__":
    main()
