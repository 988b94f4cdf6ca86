"""What a run folder holds and how it is kept: results.json, per-stage predictions and adapter
checkpoints, later evaluations, and the lock that lets one run at a time write there. Every file
is written to a temporary name and renamed, so a crash never leaves half of one.
"""

from __future__ import annotations

import json
import os
import pickle
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from torch import nn

from . import distributed as dist
from .checkpoint import atomic_write
from .method import stream_seed


@contextmanager
def run_lock(out: Path):
    """out/run.lock holds the pid of the run writing to `out`; a second run into the same folder is
    refused while that process lives, and a lock left by a dead one is taken over."""
    if not dist.is_main():  # under torchrun rank 0 holds the lock and does all the writing
        yield
        return
    lock = out / "run.lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise FileExistsError(f"{out} is in use by another process (pid {pid}, see {lock}): wait for it "
                                      "to finish (a new run may choose another --out)") from None
            lock.unlink(missing_ok=True)  # left by a run that died: take it over
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    except BaseException:
        with suppress(OSError):  # the error that stopped the run is the one to report
            lock.unlink(missing_ok=True)
        raise
    try:
        lock.unlink(missing_ok=True)
    except OSError as e:
        raise OSError(f"could not remove the run lock {lock}: {e.strerror or e}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def seeded_start_task(method, k: int, cfg) -> None:
    """New task parameters drawn from (seed, task) alone, so a resumed run draws the same ones."""
    torch.manual_seed(stream_seed(cfg.seed, "new task parameters", k))
    method.start_task(k)


def first_difference(old, new, where: str = ""):
    """(setting, old value, new value) of the first place two run descriptions differ, else None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            found = first_difference(old.get(key), new.get(key), key if key.startswith("--") else
                                     f"{where}.{key}".strip("."))
            if found:
                return found
        return None
    return None if old == new else (where or "the run description", old, new)


# What every results.json holds, whatever wrote it; rescore, resume and --evaluate read these.
RESULTS_KEYS = ("method", "tasks", "stages", "protocol", "acc_matrix", "format_matrix", "scoring", "config")


def read_results(out: Path, purpose: str) -> dict:
    """out/results.json, refused with the reason (and what `purpose` then cannot do) when it is
    missing, unreadable, truncated or not a run's results file."""
    path = out / "results.json"
    if not out.is_dir():
        raise ValueError(f"{out} is not a folder: {purpose} needs the folder a run wrote (its --out)")
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} not found: {purpose} needs a run folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({e}), so {purpose} cannot use it; it may have been cut short: "
                         "move it aside (the checkpoints and predictions beside it are kept)") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path} holds a JSON {type(results).__name__}, not a run's results: {purpose} needs the "
                         "results.json a run writes")
    missing = [k for k in RESULTS_KEYS if k not in results]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(repr(k) for k in missing)}: not a results file written by "
                         f"run.py, so {purpose} cannot use it")
    return results


def save_results(out: Path, results: dict) -> None:
    if not dist.is_main():
        return
    text = json.dumps(results, indent=1)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(ckpt_dir: Path, stage: int, method, projector: list) -> None:
    """Adapter-only state after `stage`: the method's tensors, the names of those frozen, and
    the projector when it is trained."""
    if not dist.is_main():
        return
    state = {"stage": stage, "num_tasks": method.num_tasks, "adapters": method.adapter_state_dict(),
             "frozen": sorted(n for n, v in method.adapter_tensors().items()
                              if isinstance(v, nn.Parameter) and not v.requires_grad)}
    if projector:
        state["projector"] = method.model.projector.state_dict()
    atomic_write(ckpt_dir / f"after_stage_{stage}.pt", lambda tmp: torch.save(state, tmp))


def stages_done(results: dict) -> int:
    """How many stages a results file holds: its rows after the base one, counted by stage."""
    rows, done = len(results["acc_matrix"]) - 1, 0
    while done < len(results["stages"]) and rows >= len(results["stages"][done]):
        rows -= len(results["stages"][done])
        done += 1
    return done


def load_checkpoint(path: Path, method, model, cfg) -> None:
    """Restore the method (and the trained projector) as they were after a stage: the tasks it had
    started, every tensor, and which of them were frozen."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; cannot restore the adapters of that stage")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: cannot read this checkpoint ({e}); it may be truncated, so the run cannot "
                         "resume from it: start afresh in another --out") from None
    while method.num_tasks < state["num_tasks"]:
        seeded_start_task(method, method.num_tasks, cfg)  # shapes only: the values come from the checkpoint
    method.load_adapter_state_dict(state["adapters"], source=str(path))
    frozen = set(state["frozen"])
    for name, v in method.adapter_tensors().items():
        if isinstance(v, nn.Parameter):
            v.requires_grad_(name not in frozen)
    if "projector" in state:
        model.projector.load_state_dict(state["projector"])


def write_predictions(out: Path, stage: int, items: dict) -> None:
    """predictions/stage_<k>/<task>.jsonl: every test item's prediction, gold and per-item scores."""
    if not dist.is_main():
        return
    folder = out / "predictions" / f"stage_{stage}"
    folder.mkdir(parents=True, exist_ok=True)
    _write_items(folder, items)


def _write_items(folder: Path, items: dict) -> None:
    """<task>.jsonl in `folder`, one per-item record a line."""
    for task, records in items.items():
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(folder / f"{task}.jsonl", lambda tmp, text=text: Path(tmp).write_text(text))


def write_evaluation(out: Path, stage: int, ev, primary: str, argv: list) -> Path:
    """A new evaluation of a run's saved adapters, beside the run and never over it:
    out/evaluations/stage_<k>[.n]/ with evaluation.json (a row per protocol, the format row,
    selector accuracy) and the per-item predictions."""
    root = out / "evaluations"
    folder, n = root / f"stage_{stage}", 1
    if not dist.is_main():
        return folder
    while folder.exists():
        n += 1
        folder = root / f"stage_{stage}.{n}"
    folder.mkdir(parents=True)
    _write_items(folder, ev.items)
    summary = {"stage": stage, "protocol": primary, "row": ev.rows[primary],
               **{f"row_{p}": row for p, row in ev.rows.items() if p != primary}, "format_row": ev.format,
               "selector_accuracy": round(100 * sum(ev.hits) / len(ev.hits), 2) if ev.hits else None, "argv": argv}
    atomic_write(folder / "evaluation.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    return folder
