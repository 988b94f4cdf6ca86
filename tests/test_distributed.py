"""torchrun with two CPU processes (gloo) against one process: the same results."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_run import SMOKE, load

import run

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.run([TORCHRUN, "--nproc_per_node", str(nproc), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dcache")


def adapters(out, stage):
    return torch.load(out / "checkpoints" / f"after_stage_{stage}.pt", weights_only=True)


@pytest.mark.parametrize("method,extra", [("branchlora", ["--task-identity", "selector"]), ("lilora", []),
                                          ("smolora", [])])
def test_two_processes_give_the_results_of_one(method, extra, tmp_path, cache):
    flags = ["--method", method, *SMOKE, "--cache", str(cache), "--grad-accum", "2", *extra]
    assert run.main([*flags, "--out", str(tmp_path / "one")]) == 0
    done = torchrun("run.py", *flags, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = load(tmp_path / "one"), load(tmp_path / "two")
    for key in ("acc_matrix", "acc_matrix_official", "format_matrix", "summary", "selector_accuracy", "params"):
        assert one[key] == two[key], key
    # Only rounding differs (summation order, one thread per process against two), and AdamW
    # amplifies it: each element moves by about lr whatever its gradient's size, so a rounding
    # difference in a small gradient becomes one in the step. After the first task the adapters
    # agree within 1e-5 (absolute, or relative for large buffers such as gate counts); after six,
    # every tensor within 0.1% of its norm (lilora: 4e-4 at worst elementwise, 3.4e-4 of the norm).
    a, b = adapters(tmp_path / "one", 1), adapters(tmp_path / "two", 1)
    for k in a["adapters"]:
        torch.testing.assert_close(a["adapters"][k], b["adapters"][k], rtol=1e-5, atol=1e-5)
    a, b = adapters(tmp_path / "one", 6), adapters(tmp_path / "two", 6)
    assert a["frozen"] == b["frozen"] and a["adapters"].keys() == b["adapters"].keys()
    for k in a["adapters"]:
        assert (a["adapters"][k] - b["adapters"][k]).norm() <= 1e-3 * a["adapters"][k].norm(), k


def test_every_process_holds_the_same_method_state(tmp_path):
    done = torchrun(str(ROOT / "tests" / "dist_worker.py"), str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "branchlora.ok").is_file() and (tmp_path / "lilora.ok").is_file()


def test_resume_at_another_world_size(tmp_path, cache):
    """Interrupted after stage 2 of a one-process run, finished by two processes."""
    flags = ["--method", "branchlora", *SMOKE, "--cache", str(cache), "--grad-accum", "2",
             "--task-identity", "selector"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run.main([*flags, "--out", str(whole)]) == 0
    shutil.copytree(whole, cut)
    r = load(cut)
    for key in ("acc_matrix", "acc_matrix_official", "format_matrix"):
        r[key] = r[key][:3]  # the base and two stages
    r.update(stage_seconds=r["stage_seconds"][:2], loss_curves=r["loss_curves"][:2], complete=False,
             summary=None, summary_official=None)
    (cut / "results.json").write_text(json.dumps(r))
    for k in range(3, 7):
        (cut / "checkpoints" / f"after_stage_{k}.pt").unlink()
    done = torchrun("run.py", *flags, "--out", str(cut), "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load(whole), load(cut)
    for key in ("acc_matrix", "acc_matrix_official", "format_matrix", "summary"):
        assert a[key] == b[key], key
