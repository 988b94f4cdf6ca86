"""The README's Python blocks and its self-contained shell commands, executed, so they cannot go
stale: the loading block against tiny checkpoints written under the folder names it uses, the
methods block as it stands (MiniCoIN's smoke base, built into a temporary cache), and every
`python run.py` command on a built-in benchmark (or on the runs those make) at the smoke preset."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import hf_llava, write_hub, write_original

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def shell_commands() -> list[list[str]]:
    """Every `python run.py ...` of the README's bash blocks, continuation lines joined, comments
    dropped, each `&&` part on its own."""
    text = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S)).replace("\\\n", " ")
    parts = [part.strip() for line in text.splitlines() for part in line.split("&&")]
    return [shlex.split(part, comments=True) for part in parts if part.startswith("python run.py")]


def self_contained(argv: list[str]) -> bool:
    """Needs no data the user brings: a built-in benchmark, or a run folder such a command made."""
    if "--tasks" in argv:
        return argv[argv.index("--tasks") + 1].startswith("mini")
    return any(flag in argv and argv[argv.index(flag) + 1].startswith("runs/") for flag in ("--rescore", "--evaluate"))


def block(marker: str) -> str:
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"one README Python block with {marker!r}, found {len(found)}"
    return found[0]


def test_every_python_block_is_run_here():
    assert len(BLOCKS) == 3


def test_the_qwen2_vl_loading_block_runs(tmp_path):
    from test_qwen2_vl import CONFIGS, hf_qwen2_vl

    hf_qwen2_vl(tmp_path / "qwen", **CONFIGS[0])
    code = block("Qwen2VL.from_pretrained")
    assert code.count('"Qwen2-VL-2B-Instruct"') == 2 and 'device="cuda"' in code
    code = code.replace('"Qwen2-VL-2B-Instruct"', repr(str(tmp_path / "qwen"))).replace('device="cuda"', 'device="cpu"')
    scope = {}
    exec(compile("import torch\n" + code, "README.md", "exec"), scope)
    assert type(scope["model"]).__name__ == "Qwen2VL"  # load_model's choice, from config.json's model_type


def test_the_loading_block_runs(tmp_path, monkeypatch):
    ref = hf_llava("gqa")
    hub = write_hub(ref, tmp_path / "hub")
    llm, clip, proj = write_original(ref, tmp_path / "original", projector="bin")
    code = block("vision_tower=")
    for name, path in (("llava-1.5-7b-hf", hub), ("vicuna-7b-v1.5", llm), ("clip-vit-large-patch14-336", clip),
                       ("llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin", proj)):
        assert f'"{name}"' in code, name
        code = code.replace(f'"{name}"', repr(str(path)))
    assert 'device="cuda"' in code
    exec(compile(code.replace('device="cuda"', 'device="cpu"'), "README.md", "exec"), {})


def test_the_methods_block_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMCIT_CACHE", str(tmp_path / "cache"))
    scope = {}
    exec(compile(block("make_method"), "README.md", "exec"), scope)
    assert scope["answer"].shape[0] == len(scope["tasks_hat"]) == 4




def test_the_readme_minicoin_commands_run_at_the_smoke_preset(tmp_path):
    commands = [argv for argv in shell_commands() if self_contained(argv)]
    shown = [" ".join(argv) for argv in commands]
    # the Quick-start run, and the README's MiniCoIN examples that reuse one run folder
    assert "python run.py --method branchlora --tasks minicoin" in shown
    assert any("--resume" in a for a in commands) and any("--rescore" in a for a in commands)
    assert any("--evaluate" in a for a in commands) and len(commands) >= 7, shown
    env = {**os.environ, "MINIMCIT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    for argv in commands:
        assert argv[:2] == ["python", "run.py"]
        extra = ["--preset", "smoke", "--quiet"] if "--tasks" in argv else []
        done = subprocess.run([sys.executable, str(ROOT / "run.py"), *argv[2:], *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(argv)}\n{done.stderr[-3000:]}"
    assert (tmp_path / "runs" / "seqlora" / "evaluations" / "stage_3").is_dir()
    assert (tmp_path / "runs" / "branchlora-minicoin-smoke" / "results.json").is_file()
