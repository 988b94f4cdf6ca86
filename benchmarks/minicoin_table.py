"""Every method on MiniCoIN: the README's results table, over one seed or several.

    python benchmarks/minicoin_table.py                      # seed 0, default preset, 2-core CPU, ~25 min
    python benchmarks/minicoin_table.py --seeds 0 1 2        # mean +- standard deviation over three seeds
    python benchmarks/minicoin_table.py --preset smoke       # seconds, a check of the script itself
    python benchmarks/minicoin_table.py --seeds 0 1 2 --report-only   # what is complete so far, running nothing

Each run goes through run.py into runs/table-<tasks>-<preset>[-seed<k>]/<method>/. A run whose
results.json is complete is reused and an interrupted one resumed, so a table can be built over
several sittings. BranchLoRA runs identity-free (its task selector); DirLoRA and LiLoRA use
oracle task identity, the setting of their papers' upper bounds. Also writes ap_vs_params.png
(AP against trainable parameters, one point per method) next to the runs.
"""

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run  # noqa: E402
from minimcit.pretrain import base_name  # noqa: E402
from minimcit.report import scatter  # noqa: E402

ORDER = ["seqlora", "replay", "ewc", "lwf", "olora", "moelora", "smolora", "branchlora", "dirlora", "lilora", "joint"]
IDENTITY = {"branchlora": ["--task-identity", "selector"]}
METRICS = ("AP", "MAP", "BWT", "MIF")


def folder(root: Path, tasks: str, preset: str, seed: int, table: str = "table") -> Path:
    """Where one table's runs at one seed live: runs/<table>-<tasks>-<preset>[-seed<k>]."""
    return root / (f"{table}-{tasks}-{preset}" + ("" if seed == 0 else f"-seed{seed}"))


def run_folder(root: Path, tasks: str, preset: str, seed: int, method: str, flags: list) -> Path:
    """Where a run of `method` with `flags` lives, named by what it runs so that every table asking
    for the same run shares it: this table's runs in runs/table-*/<method>, the others in
    runs/ablations-*/<method>-<flags>."""
    if flags == IDENTITY.get(method, []):
        return folder(root, tasks, preset, seed) / method
    name = "-".join([method, *(f.lstrip("-") for f in flags)])
    return folder(root, tasks, preset, seed, "ablations") / re.sub(r"[^A-Za-z0-9.]+", "-", name)


def run_or_reuse(out: Path, method: str, flags: list, tasks: str, preset: str, seed: int,
                 report_only: bool = False) -> dict | None:
    """results.json of `method` with `flags` in `out`: reused when complete, else run (or resumed);
    with report_only, None instead of running."""
    results = out / "results.json"
    done = json.loads(results.read_text()) if results.is_file() else {}
    made_on, now = Path(done.get("config", {}).get("model", "")).name, base_name(preset, seed)
    if done and made_on != now:  # the base's name changes with the world and stage 1 (pretrain.RECIPE_VERSION)
        sys.exit(f"{out}: made on MiniCoIN base {made_on}, but this code builds {now}; move the folder away "
                 "to run it again")
    if not done.get("complete"):
        if report_only:
            return None
        t0 = time.time()
        argv = ["--method", method, "--tasks", tasks, "--preset", preset, "--seed", str(seed), "--out", str(out),
                "--quiet", *flags] + (["--resume"] if results.is_file() else [])
        if run.main(argv) != 0:
            sys.exit(f"{out}: run.py {' '.join(argv)} failed")
        print(f"{out}: done in {time.time() - t0:.0f}s", file=sys.stderr)
    return json.loads(results.read_text())


def mean_sd(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table_args(doc: str) -> argparse.ArgumentParser:
    """The flags both tables take: this one and benchmarks/ablations.py."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default")
    p.add_argument("--tasks", default="minicoin")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs")
    p.add_argument("--report-only", action="store_true",
                   help="tabulate the runs already complete (a partial table); run nothing")
    return p


def main():
    p = table_args(__doc__)
    p.add_argument("--methods", nargs="+", default=ORDER, choices=ORDER)
    args = p.parse_args()
    runs = {m: [run_or_reuse(folder(args.out, args.tasks, args.preset, s) / m, m, IDENTITY.get(m, []),
                             args.tasks, args.preset, s, args.report_only) for s in args.seeds] for m in args.methods}
    runs = {m: [r for r in rs if r] for m, rs in runs.items() if any(rs)}
    seeds = ", ".join(map(str, args.seeds))
    print(f"MiniCoIN ({args.tasks}, preset {args.preset}), seeds {seeds}: mean ± sd where more than one\n")
    print("| method | seeds | " + " | ".join(METRICS) + " | selector acc | trainable | total added | train+eval s |")
    print("|---|" + "---|" * (len(METRICS) + 5))
    for m, rs in runs.items():
        cells = [mean_sd([r["summary"][k] for r in rs]) for k in METRICS]
        sel = mean_sd([r.get("selector_accuracy") for r in rs])
        secs = statistics.mean(sum(r["stage_seconds"]) for r in rs)
        print(f"| {m} | {len(rs)} | " + " | ".join(cells) + f" | {sel} | {rs[0]['params']['trainable'] / 1e3:.0f}K | "
              f"{rs[0]['params']['total_added'] / 1e3:.0f}K | {secs:.0f} |")
    tasks = next(iter(runs.values()))[0]["tasks"]
    print(f"\nfinal-stage score per task ({', '.join(tasks)}), mean over seeds, and the base model (row 0):")
    print(f"| method | {' | '.join(tasks)} | mean |")
    print("|---|" + "---|" * (len(tasks) + 1))
    rows = {"base (row 0)": [r["acc_matrix"][0] for r in next(iter(runs.values()))]}
    rows.update({m: [r["acc_matrix"][-1] for r in rs] for m, rs in runs.items()})
    for name, lasts in rows.items():
        cells = [statistics.mean(last[j] for last in lasts) for j in range(len(tasks))]
        print(f"| {name} | {' | '.join(f'{v:.0f}' for v in cells)} | {statistics.mean(cells):.1f} |")
    points = [(m, rs[0]["params"]["trainable"], statistics.mean(r["summary"]["AP"] for r in rs),
               statistics.stdev([r["summary"]["AP"] for r in rs]) if len(rs) > 1 else None) for m, rs in runs.items()]
    png = folder(args.out, args.tasks, args.preset, 0) / "ap_vs_params.png"
    scatter(points, png, f"MiniCoIN {args.preset}: AP against trainable parameters (seeds {seeds})",
            "trainable parameters while task 1 trains (log)", "AP")
    print(f"\n{png}")


if __name__ == "__main__":
    main()
