"""Every method on MiniCoIN in one run: the README's results table.

    python benchmarks/minicoin_table.py                  # default preset, 2-core CPU, about 55 min
    python benchmarks/minicoin_table.py --preset smoke   # seconds, a check of the script itself

Each method runs through run.py into runs/table-<preset>/<method>/ (an existing complete run is
reused, so an interrupted table resumes). BranchLoRA runs identity-free (its task selector); DirLoRA
and LiLoRA use oracle task identity, the setting of their papers' upper bounds.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run  # noqa: E402

ORDER = ["seqlora", "replay", "ewc", "lwf", "olora", "moelora", "branchlora", "dirlora", "lilora", "joint"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="default")
    p.add_argument("--tasks", default="minicoin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "runs")
    p.add_argument("--methods", nargs="+", default=ORDER, choices=ORDER)
    args = p.parse_args()
    rows = []
    for method in args.methods:
        out = args.out / f"table-{args.tasks}-{args.preset}" / method
        results = out / "results.json"
        t0 = time.time()
        if not (results.is_file() and json.loads(results.read_text()).get("complete")):
            argv = ["--method", method, "--tasks", args.tasks, "--preset", args.preset, "--seed", str(args.seed),
                    "--out", str(out), "--quiet"] + (["--resume"] if results.is_file() else [])
            if method == "branchlora":
                argv += ["--task-identity", "selector"]
            if run.main(argv) != 0:
                sys.exit(f"{method} failed")
        r = json.loads(results.read_text())
        s = r["summary"]
        rows.append((method, s["AP"], s["MAP"], s["BWT"], s["ACC"], s["MIF"], r["selector_accuracy"],
                     r["params"]["trainable"], r["params"]["total_added"], sum(r["stage_seconds"]),
                     r["acc_matrix"][0], r["acc_matrix"][-1]))
        print(f"{method}: done in {time.time() - t0:.0f}s", file=sys.stderr)
    tasks = json.loads(results.read_text())["tasks"]
    print("| method | AP | MAP | BWT | ACC | MIF | selector acc | trainable | total added | train+eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, ap, map_, bwt, acc, mif, sel, tr, tot, sec, _, _ in rows:
        print(f"| {m} | {ap:.1f} | {map_:.1f} | {bwt:.1f} | {acc:.1f} | {mif:.1f} | "
              f"{'-' if sel is None else f'{sel:.1f}'} | {tr / 1e3:.0f}K | {tot / 1e3:.0f}K | {sec:.0f} |")
    print(f"\nfinal-stage score per task ({', '.join(tasks)}) and the base model (row 0):")
    print(f"| method | {' | '.join(tasks)} | mean |")
    print("|---|" + "---|" * (len(tasks) + 1))
    base = rows[0][10]
    print(f"| base (row 0) | {' | '.join(f'{v:.0f}' for v in base)} | {sum(base) / len(base):.1f} |")
    for m, *_, last in rows:
        print(f"| {m} | {' | '.join(f'{v:.0f}' for v in last)} | {sum(last) / len(last):.1f} |")


if __name__ == "__main__":
    main()
