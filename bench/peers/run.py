"""massmerge against FusionBench and mergekit: the same merges of the same experts, each tool through its own public
entry point, in child processes measured side by side.

Experts: seeded experts of all-MiniLM-L6-v2 (``zoo.py``). Tools and entry points:
- massmerge: ``massmerge merge`` (the CLI users run);
- FusionBench: ``fusion_bench`` (its hydra CLI) with a ``BaseModelPool`` of ``AutoModel.from_pretrained`` models;
- mergekit: ``mergekit-yaml`` through ``mergekit_run.py`` (one runtime fix for BERT, explained there).
Settings are equivalent (the table in docs/BENCHMARKS.md lists them and the semantic differences that remain).

Every cell (method, T, tool) runs ``--rounds`` times; rounds are interleaved (each round runs every cell once,
in a shuffled order) because the machine is shared. Each child is measured from ``os.wait4``: wall time, CPU
seconds (user + sys) and peak RSS (``ru_maxrss``). Also measured: the read floor (a child that imports torch and
reads every tensor of the base and the T experts once) and, for the SVD methods, the CPU seconds massmerge
spends inside SVD calls alone (``svd_floor.py``). After the rounds, massmerge's output is compared tensor by
tensor with each peer's where the method is the same.

Set-up (optional, by hand): ``bash bench/peers/setup.sh``. Run: ``python bench/peers/run.py`` (defaults: T = 4 8 16,
3 rounds, every method and tool; about an hour on 2 busy cores). Writes ``bench/results/peers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import zoo  # noqa: E402
from _common import RESULTS, table, write_json  # noqa: E402

VENVS = HERE / ".venvs"
METHODS = ("weight_average", "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts")
SVD_METHODS = ("tsv_m", "iso_c", "iso_cts")
TA_ALPHA = 0.3
TIES_DENSITY = 0.2
ISO_CTS_COMMON = 0.8

# FusionBench method configs (its own names and settings) equivalent to massmerge's defaults.
FUSION_BENCH = {
    "weight_average": ["method=simple_average"],
    "task_arithmetic": ["method=task_arithmetic", f"method.scaling_factor={TA_ALPHA}"],
    "ties": ["method=ties_merging", "method.scaling_factor=1.0", f"method.threshold={int(TIES_DENSITY * 100)}",
             "method.merge_func=mean"],
    "tsv_m": ["method=task_singular_vector/TaskSingularVectorMerging", "method.alpha=1"],
    "iso_c": ["method=isotropic_merging/iso_c", "method.scaling_factor=1.0"],
    "iso_cts": ["method=isotropic_merging/iso_cts", "method.scaling_factor=1.0",
                f"method.common_space_fraction={ISO_CTS_COMMON}"],
}
# mergekit has no TSV-M or Iso; its TIES trims per tensor (a different method: timed, not compared).
MERGEKIT = {
    "weight_average": ("linear", {}, {"weight": 1.0}),
    "task_arithmetic": ("task_arithmetic", {"lambda": TA_ALPHA}, {"weight": 1.0}),
    "ties": ("ties", {}, {"weight": 1.0, "density": TIES_DENSITY}),
}
SAME_METHOD = {("fusion-bench", m) for m in METHODS} | {("mergekit", "weight_average"),
                                                         ("mergekit", "task_arithmetic")}


@dataclass
class Sample:
    """One child process: what it cost."""

    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    peak_rss_mib: float


def measure(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> Sample:
    """Run ``cmd`` and read its own resource usage from ``os.wait4`` (not the machine's, which is shared)."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {code}; see {log}")
    return Sample(wall, usage.ru_utime + usage.ru_stime, usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024)


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # Passive waits: on a shared machine an OpenMP thread whose partner is descheduled would otherwise spin,
    # and the spinning shows up as CPU seconds of whichever tool happened to run then.
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE",
               TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    return env


class Runner:
    """Builds each tool's command line for one cell and knows where its merged weights end up."""

    def __init__(self, work: Path, base: Path, experts: list[Path]) -> None:
        self.work, self.base, self.experts = work, base, experts

    def out_dir(self, tool: str, method: str, tasks: int) -> Path:
        return self.work / "out" / f"{tool}-{method}-T{tasks}"

    def command(self, tool: str, method: str, tasks: int) -> tuple[list[str], Path]:
        """(argv, working directory) of one run."""
        out = self.out_dir(tool, method, tasks)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        experts = [str(p) for p in self.experts[:tasks]]
        if tool == "massmerge":
            options = {"task_arithmetic": ["--alpha", str(TA_ALPHA)], "ties": ["--ties-density", str(TIES_DENSITY)],
                       "iso_cts": ["--common-fraction", str(ISO_CTS_COMMON)]}.get(method, [])
            massmerge = shutil.which("massmerge") or "massmerge"
            return [massmerge, "merge", "--method", method, "--base", str(self.base), "--experts", *experts,
                    "--output", str(out / "model.safetensors"), *options], out
        if tool == "fusion-bench":
            config = self._fusion_bench_pool(tasks)
            return [str(VENVS / "fusion-bench" / "bin" / "fusion_bench"), "--config-dir", str(config.parent.parent),
                    "--config-name", "fabric_model_fusion", f"modelpool={config.stem}", *FUSION_BENCH[method],
                    "taskpool=dummy", "fabric.accelerator=cpu", "print_config=false",
                    f"merged_model_save_path={out / 'model.bin'}", f"hydra.run.dir={out / 'hydra'}"], out
        if tool == "mergekit":
            config = self._mergekit_config(method, tasks, out)
            return [str(VENVS / "mergekit" / "bin" / "python"), str(HERE / "mergekit_run.py"), str(config),
                    str(out / "merged")], out
        if tool == "read-floor":
            return [sys.executable, str(HERE / "read_floor.py"), str(self.base), *experts], out
        if tool == "svd-floor":
            return [sys.executable, str(HERE / "svd_floor.py"), method, str(self.base), *experts,
                    "--json", str(out / "svd.json")], out
        raise ValueError(tool)

    def _fusion_bench_pool(self, tasks: int) -> Path:
        path = self.work / "fusion_bench_config" / "modelpool" / f"massmerge_bench_T{tasks}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["_target_: fusion_bench.modelpool.BaseModelPool", "models:"]
        for name, source in [("_pretrained_", self.base), *((p.name, p) for p in self.experts[:tasks])]:
            lines += [f"  {name}:", "    _target_: transformers.AutoModel.from_pretrained",
                      f"    pretrained_model_name_or_path: {source}"]
        path.write_text("\n".join(lines) + "\n")
        return path

    def _mergekit_config(self, method: str, tasks: int, out: Path) -> Path:
        name, global_params, model_params = MERGEKIT[method]
        config = {"merge_method": name, "dtype": "float32", "parameters": global_params,
                  "models": [{"model": str(p), "parameters": model_params} for p in self.experts[:tasks]]}
        if name != "linear":
            config["base_model"] = str(self.base)
        path = out / "mergekit.yml"
        path.write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
        return path

    def merged_state(self, tool: str, method: str, tasks: int) -> dict:
        """The merged weights a tool wrote for one cell."""
        import torch
        from safetensors.torch import load_file

        out = self.out_dir(tool, method, tasks)
        if tool == "massmerge":
            return load_file(str(out / "model.safetensors"))
        if tool == "fusion-bench":
            return torch.load(str(out / "model.bin"), map_location="cpu", weights_only=True)
        state: dict = {}
        for file in sorted((out / "merged").glob("*.safetensors")):
            state.update(load_file(str(file)))
        return state


def tools_for(method: str, tools: list[str]) -> list[str]:
    peers = [t for t in tools if t != "massmerge" and (t != "mergekit" or method in MERGEKIT)
             and (t != "fusion-bench" or method in FUSION_BENCH)]
    return (["massmerge"] if "massmerge" in tools else []) + peers


def available(tool: str) -> bool:
    if tool == "fusion-bench":
        return (VENVS / "fusion-bench" / "bin" / "fusion_bench").exists()
    if tool == "mergekit":
        return (VENVS / "mergekit" / "bin" / "python").exists()
    return True


def agreement(a: dict, b: dict) -> dict:
    """Per-tensor agreement of two merged state dicts over their common floating keys."""
    import torch

    keys = [k for k in a if k in b and a[k].is_floating_point()]
    worst_rel, worst_abs, equal, worst_key = 0.0, 0.0, 0, ""
    per_key = {}
    for key in keys:
        x, y = a[key].double(), b[key].double()
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        rel = float((x - y).norm() / y.norm().clamp_min(1e-30))
        per_key[key] = rel
        equal += bool(torch.equal(a[key], b[key].to(a[key].dtype)))
        if rel > worst_rel:
            worst_key = key
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
    others = [rel for key, rel in per_key.items() if key != worst_key]
    return {"tensors": len(keys), "bitwise_equal": equal, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
            "worst_key": worst_key, "max_rel_diff_other_keys": max(others, default=0.0),
            "missing_in_peer": len([k for k in a if k not in b])}


def run(args: argparse.Namespace) -> dict:
    base, experts = zoo.ready(args.zoo, max(args.tasks))
    tools = [t for t in args.tools if available(t)]
    skipped = sorted(set(args.tools) - set(tools))
    if skipped:
        print(f"not installed (run bench/peers/setup.sh): {', '.join(skipped)}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="massmerge-peers-", dir=args.work))
    runner = Runner(work, base, experts)
    cells = [(m, t, tool) for t in args.tasks for m in args.methods for tool in tools_for(m, tools)]
    cells += [("read", t, "read-floor") for t in args.tasks]
    cells += [(m, t, "svd-floor") for t in args.tasks for m in args.methods if m in SVD_METHODS]
    samples: dict[tuple[str, int, str], list[Sample]] = {c: [] for c in cells}
    svd_seconds: dict[tuple[str, int], list[float]] = {}
    env = child_env(args.threads)
    rng = random.Random(0)
    for round_index in range(args.rounds):
        order = cells[:]
        rng.shuffle(order)
        for method, tasks, tool in order:
            cmd, cwd = runner.command(tool, method, tasks)
            sample = measure(cmd, cwd=cwd, env=env, log=cwd / "log.txt")
            samples[(method, tasks, tool)].append(sample)
            if tool == "svd-floor":
                svd_seconds.setdefault((method, tasks), []).append(json.loads((cwd / "svd.json").read_text())["svd_cpu_s"])
            print(f"round {round_index + 1}/{args.rounds} {tool:>12} {method:>15} T={tasks:<2} "
                  f"cpu {sample.cpu_s:6.1f}s wall {sample.wall_s:6.1f}s rss {sample.peak_rss_mib:6.0f} MiB",
                  file=sys.stderr, flush=True)
    rows = summarize(samples, svd_seconds)
    checks = {f"{m}/T{t}/{tool}": agreement(runner.merged_state("massmerge", m, t), runner.merged_state(tool, m, t))
              for m, t, tool in cells if (tool, m) in SAME_METHOD and "massmerge" in tools}
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "agreement": checks, "rounds": args.rounds, "threads": args.threads,
            "zoo": {"base": str(base), "recipe": json.loads((args.zoo / "zoo.json").read_text())},
            "versions": peer_versions(tools)}


def summarize(samples: dict, svd_seconds: dict) -> list[dict]:
    """Median of each cell, with massmerge/peer ratios (CPU and RSS) measured in the same interleaved run."""
    med = {c: Sample(*(statistics.median(getattr(s, f) for s in v) for f in Sample.__dataclass_fields__))
           for c, v in samples.items() if v}
    rows = []
    for (method, tasks, tool), m in sorted(med.items(), key=lambda i: (i[0][1], i[0][0], i[0][2] != "massmerge")):
        row = {"method": method, "T": tasks, "tool": tool, **{k: round(v, 2) for k, v in asdict(m).items()},
               "cpu_samples": [round(s.cpu_s, 2) for s in samples[(method, tasks, tool)]]}
        mine = med.get((method, tasks, "massmerge"))
        if mine is not None and tool not in ("massmerge", "svd-floor", "read-floor"):
            row["massmerge_cpu_ratio"] = round(mine.cpu_s / m.cpu_s, 3)
            row["massmerge_rss_ratio"] = round(mine.peak_rss_mib / m.peak_rss_mib, 3)
        if tool == "massmerge":
            floor = med.get(("read", tasks, "read-floor"))
            if floor is not None:
                row["x_read_floor"] = round(m.cpu_s / floor.cpu_s, 3)
            if (method, tasks) in svd_seconds:
                svd = statistics.median(svd_seconds[(method, tasks)])
                row["svd_cpu_s"] = round(svd, 2)
                row["x_svd_alone"] = round(m.cpu_s / svd, 3)
        rows.append(row)
    return rows


def peer_versions(tools: list[str]) -> dict[str, str]:
    out = {}
    for tool, package in (("fusion-bench", "fusion-bench"), ("mergekit", "mergekit")):
        if tool in tools:
            pip = subprocess.run([str(VENVS / tool / "bin" / "python"), "-m", "pip", "show", package],
                                 capture_output=True, text=True).stdout
            out[tool] = next((line.split()[-1] for line in pip.splitlines() if line.startswith("Version:")), "?")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tools", nargs="+", default=["massmerge", "fusion-bench", "mergekit"],
                        choices=["massmerge", "fusion-bench", "mergekit"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of every child")
    parser.add_argument("--zoo", type=Path, default=RESULTS / "peers-zoo", help="where the seeded experts live")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory for outputs (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs")
    parser.add_argument("--name", default="peers", help="JSON name under bench/results/")
    args = parser.parse_args()
    result = run(args)
    columns = ["method", "T", "tool", "wall_s", "cpu_s", "peak_rss_mib", "massmerge_cpu_ratio",
               "massmerge_rss_ratio", "x_read_floor", "svd_cpu_s", "x_svd_alone"]
    print(table(result["rows"], columns))
    print()
    print(table([{"cell": k, **v} for k, v in result["agreement"].items()],
                ["cell", "tensors", "bitwise_equal", "max_abs_diff", "max_rel_diff", "worst_key",
                 "max_rel_diff_other_keys", "missing_in_peer"]))
    path = write_json(args.name, result)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
