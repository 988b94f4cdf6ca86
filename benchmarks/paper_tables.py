"""The two papers' tables re-made at laptop scale, each row beside the paper's number for it.

    python benchmarks/paper_tables.py --table lilora-table1 --seeds 0 1 2      # MiniCVIT, 8 runs a seed
    python benchmarks/paper_tables.py --table lilora-table3 --seeds 0 1 2      # MiniCVIT, 5 runs a seed
    python benchmarks/paper_tables.py --table branchlora-main --seeds 0 1 2    # MiniCoIN, 6 runs a seed
    python benchmarks/paper_tables.py --table branchlora-ablation --seeds 0 1 2  # MiniCoIN, 3 new runs a seed
    python benchmarks/paper_tables.py --table lilora-table1 --report-only      # complete rows only, runs nothing
    python benchmarks/paper_tables.py --table lilora-table5 --commands         # Qwen2-VL-2B on real CVIT: GPU runs

LiLoRA's Table 5 needs real CVIT data and Qwen2-VL-2B (MiniCVIT's base is a tiny LLaVA; a Qwen2-VL
base for it would need its own stage 1): --commands prints each row's run.py command, writing to
<out>/lilora-table5/<method>, and the table is read from those folders (one run a row) when they are
complete.

A row is one run.py command (printed with --commands). Runs are shared with minicoin_table.py and
ablations.py by what they run (minicoin_table.run_folder), reused when complete and resumed when
not, so a table can be built over several sittings. Paper numbers are copied from
../shared/papers/lilora-paper.txt (Tables 1 and 3, single-type instructions, LLaVA-1.5-7B on
CVIT) and, for BranchLoRA, from the figures its issue quotes (CoIN ACC at 7B, a secondary source
not checked against the paper, whose text is not in ../shared/papers). Paper r=128 and 64 map to
our r=32 (MiniCoIN's preset) and 16, with alpha = 2r so that s = 2 throughout.

The orderings: for each pair of rows that both have the paper's AP and at least two seeds here,
"kept" when our means differ in the paper's direction by more than two of the larger of the two
rows' sds, "reversed" when they differ the other way by as much, else "not told apart".
"""

import itertools
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.minicoin_table import METRICS, mean_sd, run_folder, run_or_reuse, table_args  # noqa: E402

ZERO_SHOT = "zero-shot"  # the base model's row 0 of the seed's runs, AP over every task
NO_SOURCE = "no source"  # a row whose rules no primary source states: not built


@dataclass(frozen=True)
class Row:
    name: str
    method: str  # a run.py method, ZERO_SHOT or NO_SOURCE
    flags: tuple = ()
    paper: tuple | None = None  # the paper's (AP, MAP, BWT, MIF); None where it gives none
    final: tuple | None = None  # the paper's score per task after the last, in the table's task order


SELECTOR = ("--task-identity", "selector")
TABLES = {
    "lilora-table1": ("minicvit", "LiLoRA Table 1 (CVIT, single-type) on MiniCVIT", [
        Row("Zero-shot", ZERO_SHOT, (), (22.30, None, None, 17.84),
            (52.72, 2.95, 52.64, 22.10, 2.73, 0.65)),
        Row("DirLoRA", "dirlora", (), (88.13, 90.18, 0.00, 98.41),
            (83.75, 60.66, 164.20, 96.71, 58.55, 64.93)),
        Row("SeqLoRA", "seqlora", (), (46.21, 57.41, -48.10, 78.35),
            (55.31, 50.22, 33.89, 22.73, 50.52, 64.61)),
        Row("DoRA", "seqlora", ("--dora",), (44.07, 65.03, -31.12, 78.59),
            (51.26, 46.36, 36.41, 28.24, 45.29, 56.87)),
        Row("MoELoRA", "moelora", (), (45.27, 56.16, -48.05, 79.97),
            (55.01, 48.87, 32.04, 22.00, 50.03, 63.64)),
        Row("C-LoRA", NO_SOURCE, (), (45.78, 57.04, -19.58, 65.84),
            (57.25, 38.70, 56.50, 25.27, 42.89, 54.06)),
        Row("Replay", "replay", (), (49.70, 69.78, -22.71, 82.06),
            (75.61, 47.58, 31.97, 35.84, 48.51, 58.67)),
        Row("EWC", "ewc", (), (46.26, 56.19, -49.71, 78.90),
            (57.04, 50.02, 32.96, 22.85, 50.16, 64.54)),
        Row("EWC+TIR", NO_SOURCE, (), (47.19, 67.21, -25.64, 81.62),
            (72.22, 44.78, 34.54, 25.98, 46.86, 58.73)),
        Row("EProj", NO_SOURCE, (), (65.29, 73.53, -14.02, 89.81),
            (65.29, 52.87, 148.19, 39.45, 28.06, 57.86)),
        Row("SMoLoRA", "smolora", (), (83.44, 84.85, -3.23, 97.79),
            (77.36, 58.29, 151.99, 95.35, 51.96, 65.71)),
        Row("LiLoRA", "lilora", (), (84.88, 87.70, -3.13, 98.24),
            (77.88, 58.83, 152.93, 96.02, 58.28, 65.33)),
    ]),
    "lilora-table3": ("minicvit", "LiLoRA Table 3 (shared rank r, task rank r~) on MiniCVIT; paper r 128/64 = ours "
                      "32/16", [
        Row("r 32, r~ 16 (r/2; the default)", "lilora", (), (84.88, 87.70, -3.13, 98.24)),
        Row("r 32, r~ 8 (r/4)", "lilora", ("--r-task", "8"), (83.87, 86.70, -2.15, 97.82)),
        Row("r 32, r~ 4 (r/8)", "lilora", ("--r-task", "4"), (83.83, 86.42, -1.55, 97.94)),
        Row("r 16, r~ 8 (r/2)", "lilora", ("--r", "16", "--lora-alpha", "32", "--r-task", "8"),
            (84.31, 87.47, -2.28, 97.93)),
        Row("r 16, r~ 4 (r/4)", "lilora", ("--r", "16", "--lora-alpha", "32", "--r-task", "4"),
            (83.67, 86.76, -2.51, 97.63)),
        Row("r 16, r~ 2 (r/8)", "lilora", ("--r", "16", "--lora-alpha", "32", "--r-task", "2"),
            (83.63, 86.17, -1.67, 97.97)),
    ]),
    "lilora-table5": ("cvit", "LiLoRA Table 5 (CVIT, single-type) on Qwen2-VL-2B", [
        Row("DirLoRA", "dirlora", (), (67.55, 74.14, 0.00, 93.81)),
        Row("SeqLoRA", "seqlora", (), (45.41, 53.39, -6.42, 70.91)),
        Row("EProj", NO_SOURCE, (), (58.87, 61.21, -2.47, 90.12)),
        Row("LiLoRA", "lilora", (), (64.63, 68.30, -0.94, 92.94)),
    ]),
    "branchlora-main": ("minicoin", "BranchLoRA's main rows (CoIN ACC) on MiniCoIN", [
        Row("LoRA (sequential)", "seqlora"),
        Row("LwF", "lwf"),
        Row("EWC", "ewc"),
        Row("MoELoRA", "moelora", (), (37.13, None, None, None)),
        Row("BranchLoRA", "branchlora", SELECTOR, (44.20, None, None, None)),
        Row("Multi-task (joint)", "joint"),
    ]),
    "branchlora-ablation": ("minicoin", "BranchLoRA's cumulative ablation (CoIN ACC) on MiniCoIN", [
        Row("MoELoRA", "moelora", (), (37.13, None, None, None)),
        # One trunk A of rank r/N for N branches B_n, one router over all of them (dense: top-k = N), trained on
        # every task with nothing frozen: MoELoRA with its N A_n replaced by one shared A.
        Row("+ shared A", "branchlora", (*SELECTOR, "--shared-router", "--top-k", "8", "--no-tuning-freezing"),
            (38.19, None, None, None)),
        Row("+ top-k sparse routing (k=2)", "branchlora", (*SELECTOR, "--shared-router", "--no-tuning-freezing"),
            (39.96, None, None, None)),
        Row("+ tuning-freezing", "branchlora", (*SELECTOR, "--shared-router"), (42.22, None, None, None)),
        Row("+ task-specific routers (BranchLoRA)", "branchlora", SELECTOR, (44.20, None, None, None)),
    ]),
}


def row_results(args, tasks: str, row: Row) -> dict:
    """{seed: results.json} of the row's complete runs (run or resumed unless --report-only)."""
    if row.method in (NO_SOURCE, ZERO_SHOT):
        return {}  # zero-shot is filled in from the other rows' runs
    if tasks == "cvit":  # real data: the user's runs of --commands, read when complete
        results = real_folder(args.out, row) / "results.json"
        done = json.loads(results.read_text()) if results.is_file() else {}
        return {0: done} if done.get("complete") else {}
    runs = {s: run_or_reuse(run_folder(args.out, tasks, args.preset, s, row.method, list(row.flags)), row.method,
                            list(row.flags), tasks, args.preset, s, args.report_only) for s in args.seeds}
    return {s: r for s, r in runs.items() if r}


REAL = "--tasks cvit --data-root CVIT --image-root cl_dataset --model Qwen2-VL-2B-Instruct"  # the user's paths


def real_folder(out: Path, row: Row) -> Path:
    return out / "lilora-table5" / row.method


def zero_shot(results: dict, seeds: list) -> dict:
    """Row 0 of each seed's runs (every run of a seed shares its base) as a summary: the base's AP
    over every task, as the paper's zero-shot row averages all six, and its MIF likewise."""
    out = {}
    for s in seeds:
        r = next((rs[s] for rs in results.values() if s in rs), None)
        if r:
            f = r.get("format_matrix")
            out[s] = {"summary": {"AP": statistics.mean(r["acc_matrix"][0]), "MAP": None, "BWT": None,
                                  "MIF": statistics.mean(f[0]) if f else None},
                      "tasks": r["tasks"], "acc_matrix": r["acc_matrix"][:1]}  # its last row is the base's
    return out


def paper_ap(row: Row):
    return row.paper[0] if row.paper else None


def ordering(rows: list[Row], results: dict, key: str = "AP", paper=paper_ap) -> dict:
    """Each pair with the paper's value of `key` (paper(row)) on both sides and two or more seeds here:
    kept, reversed or not told apart."""
    out = {"kept": [], "reversed": [], "not told apart": []}
    have = [r for r in rows if paper(r) is not None and len(results[r.name]) >= 2]
    for a, b in itertools.combinations(have, 2):
        if paper(a) == paper(b):
            continue
        hi, lo = (a, b) if paper(a) > paper(b) else (b, a)  # the paper's order: hi above lo
        ours = [[r["summary"][key] for r in results[x.name].values()] for x in (hi, lo)]
        diff = statistics.mean(ours[0]) - statistics.mean(ours[1])
        bar = 2 * max(statistics.stdev(v) for v in ours)
        verdict = "kept" if diff > bar else "reversed" if diff < -bar else "not told apart"
        out[verdict].append(f"{hi.name} > {lo.name} ({diff:+.1f} against 2 sd {bar:.1f})")
    return out


NO_CAPTION = "AP w/o caption"  # MiniCVIT's caption CIDEr (x100) reaches about 600 where the paper's Flickr30k
# reaches 164, so AP over six tasks mostly ranks the caption task; the mean of the five others' last scores beside it


def paper_without_caption(row: Row):
    """The paper's last scores without Flickr30k, its third task as MiniCVIT's caption is ours (None: not given)."""
    return statistics.mean(v for j, v in enumerate(row.final) if j != 2) if row.final else None


def without_caption(r: dict) -> float:
    last = r["acc_matrix"][-1]
    return statistics.mean(v for t, v in zip(r["tasks"], last) if t != "caption")


def main():
    p = table_args(__doc__)
    p.add_argument("--table", choices=sorted(TABLES), required=True)
    p.add_argument("--commands", action="store_true", help="print each row's run.py command and stop")
    args = p.parse_args()
    tasks, title, rows = TABLES[args.table]
    if args.commands:
        for row in rows:
            if row.method not in (ZERO_SHOT, NO_SOURCE):
                where = f"{REAL} --out {real_folder(args.out, row)}" if tasks == "cvit" else f"--tasks {tasks}"
                print(f"{row.name}: python run.py --method {row.method} {where} {' '.join(row.flags)}".rstrip())
        return
    results = {row.name: row_results(args, tasks, row) for row in rows}
    for row in rows:
        if row.method == ZERO_SHOT:
            results[row.name] = zero_shot(results, args.seeds)
    metrics = list(METRICS)
    if tasks == "minicvit":  # the paper's Flickr30k is its third task, as MiniCVIT's caption
        metrics.append(NO_CAPTION)
        for row in rows:
            for r in results[row.name].values():
                r["summary"][NO_CAPTION] = without_caption(r)
    seeds = ", ".join(map(str, args.seeds))
    scale = "real data, one run a row" if tasks == "cvit" else f"preset {args.preset}, seeds {seeds}"
    print(f"{title}, {scale}: ours (mean ± sd) | paper\n")
    print("| row | seeds | " + " | ".join(metrics) + " | paper " + " | paper ".join(metrics) + " |")
    print("|---|---|" + "---|" * (2 * len(metrics)))
    for row in rows:
        rs = results[row.name]
        ours = ([mean_sd([r["summary"][k] for r in rs.values()]) for k in metrics] if rs else
                [NO_SOURCE if row.method == NO_SOURCE else "not run"] * len(metrics))
        paper = list(row.paper or (None,) * len(METRICS))
        if NO_CAPTION in metrics:
            paper.append(paper_without_caption(row))
        print(f"| {row.name} | {len(rs)} | " + " | ".join(ours) + " | " +
              " | ".join("-" if v is None else f"{v:.2f}" for v in paper) + " |")
    orders = [("AP", paper_ap, "AP")]
    if NO_CAPTION in metrics and any(row.final for row in rows):
        orders.append((NO_CAPTION, paper_without_caption, NO_CAPTION))
    elif NO_CAPTION in metrics:  # Table 3 gives no per-task scores: ours without the caption against its AP
        orders.append((NO_CAPTION, paper_ap, "AP"))
    for key, paper_value, theirs in orders:
        print(f"\nour {key} orderings against the paper's {theirs}:")
        for verdict, pairs in ordering(rows, results, key, paper_value).items():
            print(f"- {verdict} ({len(pairs)}): " + ("; ".join(pairs) if pairs else "none"))


if __name__ == "__main__":
    main()
