"""Merge time and peak RSS of building MASS factors from T streamed experts, T = 2..20.

Each T runs in a fresh subprocess (peak RSS is per process): it loads the base, then
``massmerge.mass.stream.build_factors`` opens the experts one at a time from safetensors files. The budget the
issue sets is ``base + 2 experts + factors`` on top of the process's own footprint (Python + torch + the base,
measured before the first expert is read); "flat in T" means peak RSS varies by at most 10% across T.

Run by hand:  python bench/merge_memory.py [--models minilm vit_b] [--tasks 2 4 8 12 16 20] [--vit-depth 4]
(default: ViT-B width with 1 of its 12 blocks, to stay near 10 minutes on 2 busy cores; add --models minilm
and --vit-depth 12 for the full models: each expert then takes about a minute to factorize here).

``--cli`` measures the commands users run instead: ``massmerge merge --method M`` and ``massmerge build`` on the
seeded all-MiniLM-L6-v2 experts of ``bench/peers/zoo.py``, each T in its own child process, peak RSS from
``os.wait4`` (``ru_maxrss``). The budget is the child's footprint before it reads any weight (a child that only
imports the CLI) + base + 2 experts + result (+ the float32 factors of T tasks for tsv_m and build). ``build``
also gets a budget on the footprint of a child that imports what build imports before it reads a weight
(``BUILD_IMPORTS``: the text adapter, transformers' model and tokenizer code, ~160 MiB more than the bare CLI).
  python bench/merge_memory.py --cli [--tasks 4 8 16] [--methods task_arithmetic ties tsv_m ...] [--no-build]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MODELS,
    current_rss_bytes,
    factors_bytes,
    mib,
    peak_rss_bytes,
    random_expert,
    reset_peak_rss,
    state_bytes,
    table,
    write_heads,
    write_json,
)


def child(directory: Path, tasks: int) -> None:
    """Build factors from the first ``tasks`` experts and print one JSON line of measurements."""
    import torch

    from massmerge.checkpoints import load_state_dict
    from massmerge.mass.stream import build_factors
    from massmerge.memory import tune_allocator_for_streaming

    torch.set_num_threads(2)
    tune_allocator_for_streaming()  # as the CLI does
    base = load_state_dict(directory / "base.safetensors")
    import gc

    torch.linalg.svd(torch.randn(64, 48), full_matrices=False)  # page in LAPACK's code: a constant, not merge data
    torch.linalg.qr(torch.randn(64, 48))
    gc.collect()
    reset_peak_rss()  # the peak from here on is the merge's own, not the imports'
    baseline = current_rss_bytes()
    experts = [directory / f"expert{t}.safetensors" for t in range(tasks)]
    start = time.perf_counter()
    factors = build_factors(base, experts, [f"task{t}" for t in range(tasks)])
    seconds = time.perf_counter() - start
    factor_bytes = factors_bytes(factors)
    print(json.dumps({"tasks": tasks, "merge_s": seconds, "baseline_rss": baseline, "peak_rss": peak_rss_bytes(),
                      "factor_bytes": factor_bytes}))


def prepare(model_name: str, directory: Path, count: int, vit_depth: int) -> tuple[int, int]:
    """Write the base and ``count`` experts as safetensors files; returns (base bytes, expert bytes)."""
    from massmerge.checkpoints import save_state_dict

    model = MODELS[model_name](vit_depth) if model_name == "vit_b" else MODELS[model_name]()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_state_dict(base, directory / "base.safetensors")
    for t in range(count):
        save_state_dict(random_expert(base, seed=100 + t), directory / f"expert{t}.safetensors")
    return state_bytes(base), state_bytes(base)


def run(model_name: str, task_counts: list[int], vit_depth: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="massmerge-bench-") as tmp:
        directory = Path(tmp)
        base_bytes, expert_bytes = prepare(model_name, directory, max(task_counts), vit_depth)
        for tasks in task_counts:
            out = subprocess.run([sys.executable, __file__, "--child", str(directory), str(tasks)],
                                 check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            budget = result["baseline_rss"] + 2 * expert_bytes + result["factor_bytes"]
            rows.append({
                "model": model_name, "T": tasks, "merge_s": result["merge_s"],
                "base_MiB": mib(base_bytes), "baseline_MiB": mib(result["baseline_rss"]),
                "factors_MiB": mib(result["factor_bytes"]), "peak_MiB": mib(result["peak_rss"]),
                "growth_MiB": mib(result["peak_rss"] - result["baseline_rss"]),
                "budget_MiB": mib(budget), "within_budget": result["peak_rss"] <= budget,
            })
            print(f"  {model_name} T={tasks}: {rows[-1]['merge_s']:.1f}s peak {rows[-1]['peak_MiB']:.0f} MiB",
                  file=sys.stderr)
    peaks = [r["peak_MiB"] for r in rows]
    spread = (max(peaks) - min(peaks)) / min(peaks)
    for row in rows:
        row["peak_spread_over_T"] = spread
    return rows


def cli_factor_bytes(base: dict, tasks: int) -> int:
    """Float32 bytes of T tasks' factors at rank 1/T (matrices) plus their non-matrix deltas."""
    from massmerge.lowrank import rank_for

    total = 0
    for value in base.values():
        if not value.is_floating_point():
            continue
        if value.ndim == 2:
            m, n = value.shape
            total += tasks * rank_for(value.shape, 1.0 / tasks) * (m + n + 1) * 4
        else:
            total += tasks * value.numel() * 4
    return total


# What `massmerge build` imports before it reads a weight (the text adapter loads the base with transformers'
# model class and reads its tokenizer): the fixed code footprint the build's budget sits on.
BUILD_IMPORTS = ("import torch, massmerge.cli, massmerge.cli.build, massmerge.adapters.text, massmerge.artifact, "
                 "massmerge.mass.stream, massmerge.mass.model, massmerge.mass.budget; "
                 "from transformers import AutoConfig, AutoModel, AutoTokenizer, BertModel")


def cli_rows(task_counts: list[int], methods: list[str], build: bool) -> list[dict]:
    """Peak RSS of ``massmerge merge`` / ``massmerge build`` child processes over T (see the module docstring)."""
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
    import zoo  # noqa: PLC0415
    from run import child_env, measure  # noqa: PLC0415

    from massmerge.checkpoints import load_state_dict

    base_dir, experts = zoo.ready(Path(__file__).resolve().parent / "results" / "peers-zoo", max(task_counts))
    base = load_state_dict(base_dir)
    base_bytes = state_bytes(base)
    env = child_env(2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="massmerge-cli-mem-") as tmp:
        work = Path(tmp)
        heads = write_heads(work, max(task_counts), base["embeddings.word_embeddings.weight"].shape[1])
        idle = measure([sys.executable, "-c", "import torch, massmerge.cli"], cwd=work, env=env, log=work / "idle.log")
        idle_build = measure([sys.executable, "-c", BUILD_IMPORTS], cwd=work, env=env, log=work / "idle_build.log")
        massmerge = shutil.which("massmerge") or "massmerge"
        commands = [(m, lambda t, m=m: [massmerge, "merge", "--method", m, "--base", str(base_dir), "--experts",
                                         *map(str, experts[:t]), "--output", str(work / "out.safetensors")])
                    for m in methods]
        if build:
            commands.append(("build", lambda t: [massmerge, "build", "--base", str(base_dir), "--experts",
                                                 *map(str, experts[:t]), "--heads", *map(str, heads[:t]),
                                                 "--output", str(work / f"artifact{t}")]))
        for name, command in commands:
            for tasks in task_counts:
                sample = measure(command(tasks), cwd=work, env=env, log=work / f"{name}{tasks}.log")
                factors = cli_factor_bytes(base, tasks) if name in ("tsv_m", "build") else 0
                result = base_bytes if name != "build" else 0
                budget = idle.peak_rss_mib * 2**20 + base_bytes + 2 * base_bytes + result + factors
                # build also imports transformers' model and tokenizer code before it reads a weight
                code = (idle_build if name == "build" else idle).peak_rss_mib * 2**20
                rows.append({"command": name, "T": tasks, "cpu_s": round(sample.cpu_s, 1),
                             "wall_s": round(sample.wall_s, 1), "idle_MiB": round(idle.peak_rss_mib),
                             "peak_MiB": round(sample.peak_rss_mib), "budget_MiB": round(mib(budget)),
                             "within_budget": sample.peak_rss_mib * 2**20 <= budget,
                             "imports_MiB": round(mib(code)),
                             "budget_with_imports_MiB": round(mib(budget - idle.peak_rss_mib * 2**20 + code)),
                             "within_budget_with_imports": sample.peak_rss_mib * 2**20 <= budget
                             - idle.peak_rss_mib * 2**20 + code})
                print(f"  {name} T={tasks}: cpu {sample.cpu_s:.1f}s peak {sample.peak_rss_mib:.0f} MiB",
                      file=sys.stderr, flush=True)
            peaks = [r["peak_MiB"] for r in rows if r["command"] == name]
            for row in rows:
                if row["command"] == name:
                    row["spread_over_T"] = round((max(peaks) - min(peaks)) / min(peaks), 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_b"], choices=sorted(MODELS))
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 4, 8, 12, 16, 20])
    parser.add_argument("--vit-depth", type=int, default=1, help="ViT-B blocks (12 = the whole model)")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--cli", action="store_true", help="measure `massmerge merge` and `massmerge build`")
    parser.add_argument("--methods", nargs="*", default=["weight_average", "task_arithmetic", "ties", "tsv_m",
                                                         "iso_c", "iso_cts"])
    parser.add_argument("--no-build", action="store_true", help="with --cli: skip `massmerge build`")
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), int(args.child[1]))
        return
    if args.cli:
        tasks = args.tasks if args.tasks != parser.get_default("tasks") else [4, 8, 16]
        rows = cli_rows(tasks, args.methods, not args.no_build)
        print(table(rows, ["command", "T", "cpu_s", "wall_s", "idle_MiB", "peak_MiB", "budget_MiB", "within_budget",
                           "imports_MiB", "budget_with_imports_MiB", "within_budget_with_imports", "spread_over_T"]))
        print(f"\nwrote {write_json('merge_memory_cli', {'rows': rows})}")
        return
    rows = [row for name in args.models for row in run(name, args.tasks, args.vit_depth)]
    columns = ["model", "T", "merge_s", "base_MiB", "baseline_MiB", "factors_MiB", "peak_MiB", "growth_MiB",
               "budget_MiB", "within_budget", "peak_spread_over_T"]
    print(table(rows, columns))
    path = write_json("merge_memory", {"vit_depth": args.vit_depth, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
