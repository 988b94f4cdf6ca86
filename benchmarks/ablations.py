"""The papers' ablations on MiniCoIN: LiLoRA's Table 2 rows and BranchLoRA's components.

    python benchmarks/ablations.py                 # seed 0, default preset (17 runs of their own, ~45 min on 2 cores)
    python benchmarks/ablations.py --seeds 0 1 2   # mean +- standard deviation
    python benchmarks/ablations.py --preset smoke  # seconds, a check of the script itself
    python benchmarks/ablations.py --report-only   # the rows complete so far, running nothing

Runs go to runs/ablations-<tasks>-<preset>[-seed<k>]/<method>-<flags>/; a complete run is reused,
an interrupted one resumed, so the table can be built over several sittings, and paper_tables.py
shares the runs it also asks for. The full methods' rows are minicoin_table.py's runs of LiLoRA and
BranchLoRA (run here if that table has not yet).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.minicoin_table import METRICS, mean_sd, run_folder, run_or_reuse, table_args  # noqa: E402

ROWS = [  # (row, method, flags): named after the paper's row or the component removed
    ("LiLoRA (full: share A, decompose B, L_reg, learnable alpha)", "lilora", []),
    ("LiLoRA share A only", "lilora", ["--share-a-only"]),
    ("LiLoRA share A + decompose B, no L_reg", "lilora", ["--reg-weight", "0"]),
    ("LiLoRA alpha = 0", "lilora", ["--fixed-alpha", "0"]),
    ("LiLoRA alpha = 0.5", "lilora", ["--fixed-alpha", "0.5"]),
    ("LiLoRA alpha = 1", "lilora", ["--fixed-alpha", "1"]),
    ("LiLoRA B0 frozen after task 1 (released code)", "lilora", ["--freeze-basis-after-first-task"]),
    ("LiLoRA A frozen after task 1", "lilora", ["--freeze-a-after-first-task"]),
    ("LiLoRA share A only, A frozen after task 1", "lilora", ["--share-a-only", "--freeze-a-after-first-task"]),
    ("BranchLoRA (full: selector, per-task routers, tuning-freezing, k=2, N=8)", "branchlora",
     ["--task-identity", "selector"]),
    ("BranchLoRA oracle identity", "branchlora", ["--task-identity", "oracle"]),
    ("BranchLoRA no tuning-freezing", "branchlora", ["--task-identity", "selector", "--no-tuning-freezing"]),
    ("BranchLoRA one shared router", "branchlora", ["--task-identity", "selector", "--shared-router"]),
    ("BranchLoRA top-k 1", "branchlora", ["--task-identity", "selector", "--top-k", "1"]),
    ("BranchLoRA top-k 4", "branchlora", ["--task-identity", "selector", "--top-k", "4"]),
    ("BranchLoRA N 4", "branchlora", ["--task-identity", "selector", "--num-branches", "4"]),
    ("BranchLoRA N 16", "branchlora", ["--task-identity", "selector", "--num-branches", "16"]),
    ("BranchLoRA trunk frozen after task 1", "branchlora", ["--task-identity", "selector",
                                                           "--freeze-trunk-after-first-task"]),
    ("BranchLoRA routing per sequence", "branchlora", ["--task-identity", "selector", "--route", "sequence"]),
]


def main():
    p = table_args(__doc__)
    p.add_argument("--only", help="rows whose name contains this (e.g. LiLoRA)")
    args = p.parse_args()
    rows = [r for r in ROWS if not args.only or args.only.lower() in r[0].lower()]
    results = {}
    for name, method, flags in rows:
        results[name] = [
            r for s in args.seeds
            if (r := run_or_reuse(run_folder(args.out, args.tasks, args.preset, s, method, flags), method, flags,
                                  args.tasks, args.preset, s, args.report_only))]
    print(f"Ablations on MiniCoIN ({args.tasks}, preset {args.preset}), seeds {', '.join(map(str, args.seeds))}\n")
    print("| row | seeds | " + " | ".join(METRICS) + " | selector acc | trainable | total added |")
    print("|---|" + "---|" * (len(METRICS) + 4))
    for name, rs in results.items():
        if not rs:  # --report-only: not run yet
            print(f"| {name} | 0 | " + " | ".join("not run" for _ in METRICS) + " | | | |")
            continue
        cells = [mean_sd([r["summary"][k] for r in rs]) for k in METRICS]
        print(f"| {name} | {len(rs)} | " + " | ".join(cells) + f" | {mean_sd([r.get('selector_accuracy') for r in rs])} | "
              f"{rs[0]['params']['trainable'] / 1e3:.0f}K | {rs[0]['params']['total_added'] / 1e3:.0f}K |")
    print("\n(mean ± sample standard deviation over the seeds complete, where more than one)")


if __name__ == "__main__":
    main()
