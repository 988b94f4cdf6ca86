"""The README's Python blocks, executed, so they cannot go stale: the loading block against tiny
checkpoints written under the folder names it uses, the methods block as it stands (MiniCoIN's
smoke base, built into a temporary cache)."""

import re
from pathlib import Path

from conftest import hf_llava, write_hub, write_original

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def block(marker: str) -> str:
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"one README Python block with {marker!r}, found {len(found)}"
    return found[0]


def test_every_python_block_is_run_here():
    assert len(BLOCKS) == 2


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


