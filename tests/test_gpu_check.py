"""benchmarks/gpu_check.py, the script for a lent GPU, run at a tiny shape on the CPU so it cannot
rot: every part runs (SDPA kernels, planned steps against transformers + peft, an evaluation batch,
run.py end to end) and the JSON holds what the GPU run will report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backbone", ["llava", "qwen2_vl"])
def test_gpu_check_runs_tiny_on_the_cpu(tmp_path, backbone):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(out),
                           "--methods", "seqlora", "branchlora", "--reps", "1", "--backbone", backbone],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["sdpa"]) == {"vision", "training", "prefill", "decode"}
    assert [s["method"] for s in r["steps"]] == ["seqlora", "branchlora", "transformers+peft lora"]
    for s in r["steps"]:
        assert s["seconds"] > 0 and s["tokens_per_s"] > 0 and s["micro_batch"] >= 1
    assert r["steps"][0]["micro_batch"] == 14  # 4 GiB hold the tiny step at CoIN's micro-batch
    assert r["eval"]["eval_batch"] >= 1 and r["run"]["returncode"] == 0 and r["run"]["complete"]
    assert r["run"]["plan"]["batch_size"] * r["run"]["plan"]["grad_accum"] == 14 * 64
    assert "MFU" in done.stdout and "run.py, two tasks end to end: rc 0" in done.stdout
