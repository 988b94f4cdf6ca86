"""Does a change leave a run's numbers alone? Runs each method on MiniCoIN with an earlier revision
of minimcit and with this one, and compares the two run folders: results.json without the keys
that must differ (`stage_seconds`, `argv`), and every prediction file byte for byte.

    python benchmarks/same_results.py --against d6a83fd --preset smoke seqlora lilora "branchlora --route sequence"

Each spec is a method name and any flags; one run at a time (2 cores). `--against REV` checks REV
out in a temporary git worktree. Prints one line per spec and exits 1 if any differ.
"""

import argparse
import filecmp
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(code: Path, spec: str, preset: str, out: Path) -> None:
    argv = [sys.executable, str(code / "run.py"), "--method", *shlex.split(spec), "--tasks", "minicoin",
            "--preset", preset, "--quiet", "--out", str(out)]  # the cached MiniCoIN base, as a user's runs
    done = subprocess.run(argv, cwd=out.parent, env={**os.environ, "PYTHONPATH": str(code)},
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{code}: {' '.join(argv[2:])} failed:\n{done.stderr[-2000:]}")


def differences(a: Path, b: Path) -> list[str]:
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for r in (ra, rb):
        r.pop("stage_seconds", None), r.pop("argv", None)
    found = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k))
    pa, pb = sorted((a / "predictions").rglob("*.jsonl")), sorted((b / "predictions").rglob("*.jsonl"))
    if [p.relative_to(a) for p in pa] != [p.relative_to(b) for p in pb]:
        found.append("the set of prediction files")
    found += [str(p.relative_to(a)) for p, q in zip(pa, pb) if not filecmp.cmp(p, q, shallow=False)]
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="+", help='a method and its flags, e.g. "branchlora --route sequence"')
    p.add_argument("--against", required=True, help="the earlier revision (git)")
    p.add_argument("--preset", default="smoke")
    args = p.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "old-code"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.against],
                       check=True, capture_output=True)
        try:
            for n, spec in enumerate(args.specs):
                folders = [tmp / f"{side}-{n}" for side in ("old", "new")]
                for code, out in zip((old, ROOT), folders):
                    run(code, spec, args.preset, out)
                diff = differences(*folders)
                lines = sum(len(f.read_text().splitlines()) for f in (folders[1] / "predictions").rglob("*.jsonl"))
                ap = (json.loads((folders[1] / "results.json").read_text())["summary"] or {}).get("AP")
                print(f"{spec:50s} {'differ: ' + ', '.join(diff) if diff else 'identical'} "
                      f"({lines} predictions, AP {ap})", flush=True)
                failed += bool(diff)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
