"""Evaluation alone, every stage of a finished run as the run evaluated it, timed against an
earlier revision of minimcit in the same run, with the predictions compared item by item.

    python benchmarks/bench_eval.py runs/branchlora-minicoin-default --against d917398 --reps 2

Each measurement is a fresh process (this file with --child) that rebuilds the run from its
recorded command, loads the adapters saved after each stage and answers the tasks that stage
answered (`metrics.tasks_answered_per_stage`), timing `train.evaluate` alone (not the loading). The
revisions alternate, A B A B, so drift in the machine's speed hits both. `--against REV` checks
REV out in a temporary git worktree; that code evaluates the same checkpoints.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(out: Path) -> None:
    """Runs under whichever minimcit PYTHONPATH names; prints one JSON line."""
    import run
    try:
        from minimcit.metrics import tasks_answered_per_stage
    except ImportError:  # revisions before the rename
        from minimcit.metrics import answered_after as tasks_answered_per_stage
    from minimcit.runfolder import load_checkpoint, stages_done
    try:
        from minimcit.runfolder import seeded_start_task
    except ImportError:  # revisions before the rename
        from minimcit.runfolder import start_task as seeded_start_task
    from minimcit.train import evaluate

    results = json.loads((out / "results.json").read_text())
    args = run.parse_args(results["argv"])
    args.quiet = True
    s = run.build(args)
    upto = tasks_answered_per_stage(results["stages"], len(s.tasks))
    seconds, preds = [], {}
    for stage in range(stages_done(results) + 1):
        if stage:
            load_checkpoint(out / "checkpoints" / f"after_stage_{stage}.pt", s.method, s.model, s.cfg)
        else:
            seeded_start_task(s.method, 0, s.cfg)
        t0 = time.perf_counter()
        trained = s.method.num_tasks if stage else 0
        if hasattr(run, "Experiment"):  # build returns the run's one settings object (issue 23)
            ev = evaluate(s, trained=trained, upto=upto[stage])
        else:
            ev = evaluate(s.model, s.tasks, s.collator, s.cfg, method=s.method, trained=trained,
                          identity=s.identity, device=s.device, quiet=True, upto=upto[stage])
        seconds.append(time.perf_counter() - t0)
        preds[stage] = {t: [r["prediction"] for r in items] for t, items in ev.items.items()}
    print(json.dumps({"seconds": seconds, "predictions": preds}))


def measure(code: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, __file__, "--child", str(out)], cwd=code, env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, nargs="?", help="a finished run folder")
    p.add_argument("--against", help="the git revision to compare with")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child.resolve())
    out = args.out.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        codes = {"this": ROOT}
        if args.against:
            old = Path(tmp) / "old"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.against], check=True,
                           capture_output=True)
            codes[args.against] = old
        try:
            runs = {name: [] for name in codes}
            for rep in range(args.reps):
                for name, code in codes.items():
                    runs[name].append(measure(code, out))
                    print(f"rep {rep + 1} {name}: {sum(runs[name][-1]['seconds']):.1f} s", file=sys.stderr, flush=True)
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    best = {name: min(sum(r["seconds"]) for r in rs) for name, rs in runs.items()}
    print(f"evaluation of {out.name}, all stages, best of {args.reps} (s): "
          + ", ".join(f"{n} {v:.1f}" for n, v in best.items()))
    if args.against:
        print(f"speed-up this / {args.against}: {best[args.against] / best['this']:.2f}x")
        a, b = runs["this"][0]["predictions"], runs[args.against][0]["predictions"]
        items = differ = 0
        for stage in a:
            for task in a[stage]:
                for x, y in zip(a[stage][task], b[stage][task]):
                    items += 1
                    differ += x != y
        print(f"predictions: {differ} of {items} differ ({100 * differ / items:.2f}%)")


if __name__ == "__main__":
    main()
