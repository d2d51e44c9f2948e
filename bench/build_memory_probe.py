"""What `massmerge build`'s memory holds, expert by expert: anonymous memory against file-backed mappings.

Runs the real command in process (``massmerge.cli.main``, the entry point users run) on the seeded
all-MiniLM-L6-v2 experts of ``bench/peers/zoo.py``. After each expert (at the allocator release that ends it),
it records ``RssAnon`` and ``RssFile`` from ``/proc/self/status`` and the bytes of the factors built so far; after
the last expert, the largest resident mappings from ``/proc/self/smaps``. Why: ``bench/merge_memory.py`` gives one
peak per process. This shows whether anything is held twice (the base as a file mapping and as a copy), whether
slack builds up between experts, and how much of the footprint is code that build imports.

Run by hand (Linux only):  python bench/build_memory_probe.py [--tasks 8]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import status_bytes, write_heads  # noqa: E402


def status_mib() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in MiB."""
    return {field: (status_bytes(field) or 0) // 2**20 for field in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def largest_mappings(count: int = 6) -> list[tuple[int, str]]:
    """(resident MiB, path or [anon]) of the largest mappings."""
    sizes: dict[str, int] = {}
    name = "[anon]"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            name = parts[5] if len(parts) > 5 else "[anon]"
        elif line.startswith("Rss:"):
            sizes[name] = sizes.get(name, 0) + int(line.split()[1])
    return sorted(((kb // 1024, n) for n, kb in sizes.items()), reverse=True)[:count]


def expert_factor_bytes(base_dir: Path, tasks: int) -> int:
    """Bytes one expert's float32 factors take at the design ranks (rank 1/T): ``k (m + n + 1)`` per matrix plus
    every other float tensor's delta, computed from the base's shapes alone."""
    from massmerge.checkpoints import open_checkpoint
    from massmerge.lowrank import rank_for

    base = open_checkpoint(base_dir)
    total = 0
    for key in base:
        shape = base.shape(key)
        if base.dtype_name(key).startswith("F"):
            total += rank_for(shape, 1 / tasks) * (shape[0] + shape[1] + 1) if len(shape) == 2 else math.prod(shape)
    return 4 * total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE / "peers"))
    import zoo  # noqa: PLC0415

    from massmerge import progress
    from massmerge.cli import main as cli_main

    base_dir, experts = zoo.ready(HERE / "results" / "peers-zoo", args.tasks)
    per_expert = expert_factor_bytes(base_dir, args.tasks)
    rows: list[dict] = []
    mappings: list[tuple[int, str]] = []

    def after(stage: str, done: int, total: int | None) -> None:  # massmerge.progress.listen: the public hook
        if stage != "factorizing experts":
            return
        label = "model loaded, before expert 1" if done == 0 else f"expert {done}"
        rows.append({"after": label, **status_mib(), "factors_MiB": round(done * per_expert / 2**20, 1)})
        mappings[:] = largest_mappings()  # the last expert's: the model and the base's mapping are still alive

    with tempfile.TemporaryDirectory(prefix="massmerge-probe-") as tmp:
        work = Path(tmp)
        heads = write_heads(work, args.tasks, json.loads((base_dir / "config.json").read_text())["hidden_size"])
        sys.argv = ["massmerge", "build", "--base", str(base_dir), "--experts", *map(str, experts[:args.tasks]),
                    "--heads", *map(str, heads), "--output", str(work / "artifact")]
        try:
            with progress.listen(after):
                cli_main()
        except SystemExit as done:
            if done.code:
                raise
    print("| after | VmRSS | RssAnon | RssFile | factors MiB | peak so far (VmHWM) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['after']} | {row['VmRSS']} | {row['RssAnon']} | {row['RssFile']} | {row['factors_MiB']} "
              f"| {row['VmHWM']} |")
    print("\nlargest resident mappings after the last expert (MiB):")
    for size, name in mappings:
        print(f"  {size:6d}  {name}")


if __name__ == "__main__":
    main()
