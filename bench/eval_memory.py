"""Peak RSS of `massmerge evaluate` at N and 4N test items per task, and images/s of its passes (issue 27).

Why: the served MASS pass used to hold every preprocessed test image of every task in one list (602 KB per
224x224 float32 image: 49 GiB for the real 8-task benchmark). Now every pass streams. This builds a tiny replica
of examples/clip_vit_b32_8tasks.yaml: a small CLIP vision tower at 224x224 (patch 32), 8 experts with linear
heads, and 8 local parquet test sets (`data/test-00000-of-00001.parquet`, JPEG 224x224 synthetic images), then
runs `massmerge evaluate` in a child process at N and at 4N items per task and reads the child's peak RSS
(``ru_maxrss`` from ``wait4``). Flat within 10% is the target.

Then, in this process, images/s on the CPU at N: preprocessing (decode + CLIP transform) in the main process
and with the default workers, reading the uint8 cache, and each method's pass through the shared runner.

    python bench/eval_memory.py                       # N = 32
    python bench/eval_memory.py --n 32 --src /other/checkout/src   # the same figures for another tree
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TASKS, CLASSES, SIZE = 8, 10, 224
BATCH = 8  # serve's window is 4 batches per task (256 inputs at T = 8): N = 32 per task fills one window

def tiny_clip(root: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              image_size=SIZE, patch_size=32, projection_dim=32)
    model = CLIPVisionModel(config).eval()
    model.save_pretrained(str(root / "base"))
    return root / "base"


def experts(root: Path, base: Path) -> list[Path]:
    from safetensors.torch import load_file, save_file

    state = load_file(str(base / "model.safetensors"))
    out = []
    for t in range(TASKS):
        gen = torch.Generator().manual_seed(t + 1)
        expert = {k: (v + 0.05 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() and v.ndim == 2
                  else v.clone() for k, v in state.items()}
        expert["classifier.weight"] = torch.randn(CLASSES, 64, generator=gen)
        expert["classifier.bias"] = torch.zeros(CLASSES)
        (root / f"expert{t}").mkdir()
        save_file({k: v.contiguous() for k, v in expert.items()}, str(root / f"expert{t}" / "model.safetensors"))
        out.append(root / f"expert{t}")
    return out


def test_set(root: Path, task: int, count: int) -> Path:
    """``count`` JPEG images as an HF parquet shard (image struct of bytes and path, ClassLabel metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    gen = torch.Generator().manual_seed(100 + task)
    rows = []
    for _ in range(count):
        pixels = (torch.rand(SIZE // 8, SIZE // 8, 3, generator=gen) * 255).to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
        rows.append({"bytes": buffer.getvalue(), "path": None})
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image storage
    table = pa.table({"image": pa.array(rows, type=image_type), "label": [i % CLASSES for i in range(count)]})
    features = {"image": {"_type": "Image"}, "label": {"names": [f"c{i}" for i in range(CLASSES)], "_type": "ClassLabel"}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})  # as datasets
    folder = root / f"task{task}_{count}" / "data"
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "test-00000-of-00001.parquet", row_group_size=100)
    return folder.parent


def config(root: Path, base: Path, expert_dirs: list[Path], sets: list[Path], name: str) -> Path:
    import yaml

    tasks = [{"name": f"task{t}", "expert": str(e), "dataset": str(d), "classnames": [f"c{i}" for i in range(CLASSES)]}
             for t, (e, d) in enumerate(zip(expert_dirs, sets, strict=True))]
    body = {"family": "clip", "base": str(base), "heads": "linear", "tasks": tasks,
            "methods": ["zeroshot", "experts", "tsv_m", "mass"], "eval": {"batch_size": BATCH},
            "output": str(root / f"out_{name}")}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def peak_rss(path: Path, cache: Path, src: str | None) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `massmerge evaluate` child (its own and its reaped workers' peak)."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    log = path.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as err:
        child = subprocess.Popen([sys.executable, "-m", "massmerge", "evaluate", "--config", str(path),
                                  "--cache-dir", str(cache), "--device", "cpu"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # this child's peak alone (and its reaped workers')
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"evaluate failed: {log.read_text()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds


def rates(path: Path, cache: Path) -> dict[str, float]:
    """Images/s of each pass at this config's size, in this process, through the public library."""
    from massmerge.data.pixels import decoded_batches, default_workers
    from massmerge.experiments import evaluate, runner
    from massmerge.experiments.evaluate_config import load_benchmark_config
    from massmerge.merging import merge

    cfg = load_benchmark_config(path)
    wb = evaluate.prepare(cfg, log=lambda line: None)
    total = sum(len(d) for d in wb.datasets)
    out: dict[str, float] = {}

    def timed(name: str, run) -> None:
        start = time.perf_counter()
        run()
        out[name] = total / (time.perf_counter() - start)

    for workers in (0, default_workers()):
        timed(f"decode + transform, {workers} workers", lambda w=workers: [
            None for d in wb.datasets for _ in decoded_batches([k for k, _ in d.items], d.loader, wb.preprocess,
                                                               cfg.eval.batch_size, w)])
    pool = evaluate.task_pool(wb, cache / "pixels_rates")
    timed("first pass, writing the uint8 cache", lambda: [None for s in pool.split("test") for _ in s.batches()])
    timed("cached pass (uint8 read + normalize)", lambda: [None for s in pool.split("test") for _ in s.batches()])
    timed("zero-shot (one forward per image)", lambda: runner.score_static(pool, wb.model, None, label="zs"))
    state = merge("tsv_m", wb.base_state, [evaluate.expert_vector(wb, t) for t in range(TASKS)])
    timed("tsv_m (merged weights, forward only)", lambda: runner.score_static(pool, wb.model, state, label="tsv"))
    _, served = evaluate.build_mass(wb)
    timed("MASS served, task hidden", lambda: runner.score_mass(pool, served.mass))
    timed("MASS batch routing", lambda: runner.score_mass_batch_routing(pool, served.mass))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="test items per task of the small run (the large: 4x)")
    parser.add_argument("--src", default=None, help="PYTHONPATH of the child (another checkout's src)")
    parser.add_argument("--no-rates", action="store_true", help="peak RSS only")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = tiny_clip(root)
        expert_dirs = experts(root, base)
        paths = {}
        result: dict[str, object] = {"tasks": TASKS, "batch_size": BATCH, "image": f"{SIZE}x{SIZE} JPEG", "src": args.src or "installed"}
        for label, count in (("N", args.n), ("4N", 4 * args.n)):
            sets = [test_set(root, t, count) for t in range(TASKS)]
            path = paths[label] = config(root, base, expert_dirs, sets, label)
            rss, seconds = peak_rss(path, root / f"cache_{label}", args.src)
            result[label] = {"items_per_task": count, "peak_rss_mib": round(rss, 1), "seconds": round(seconds, 1)}
            print(f"{label}: {count} items/task, peak RSS {rss:.1f} MiB, {seconds:.1f} s", flush=True)
        result["ratio_4N_over_N"] = round(result["4N"]["peak_rss_mib"] / result["N"]["peak_rss_mib"], 3)
        print(f"peak RSS 4N / N = {result['ratio_4N_over_N']}")
        if not args.no_rates and args.src is None:
            result["images_per_s"] = {k: round(v, 1) for k, v in rates(paths["N"], root / "cache_rates").items()}
            for name, value in result["images_per_s"].items():
                print(f"  {name}: {value:.1f} images/s")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
