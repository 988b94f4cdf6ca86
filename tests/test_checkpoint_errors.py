"""Bad checkpoints fail loudly, naming the key, field, file or folder at fault."""

import json

import pytest
import torch
from conftest import hf_llava, write_hf, write_original
from safetensors.torch import load_file, save_file

from minimcit.model import Llava


@pytest.fixture
def ckpt(tmp_path):
    return write_hf(hf_llava("mha"), tmp_path / "ckpt")


def rewrite(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_missing_key_is_named(ckpt):
    rewrite(ckpt, lambda s: s.pop("language_model.model.norm.weight"))
    with pytest.raises(KeyError, match=r"language_model\.norm\.weight") as e:
        Llava.from_pretrained(ckpt)
    assert "model.safetensors" in str(e.value)


def test_wrong_shape_names_key_and_file(ckpt):
    def shrink(s):
        s["multi_modal_projector.linear_1.weight"] = s["multi_modal_projector.linear_1.weight"][:, :-1].contiguous()
    rewrite(ckpt, shrink)
    with pytest.raises(ValueError, match=r"model\.safetensors: key 'multi_modal_projector\.linear_1\.weight' has shape \(32, 31\)"):
        Llava.from_pretrained(ckpt)


def test_unexpected_key_is_named(ckpt):
    rewrite(ckpt, lambda s: s.update({"language_model.model.extra.weight": torch.zeros(2)}))
    with pytest.raises(KeyError, match=r"language_model\.model\.extra\.weight"):
        Llava.from_pretrained(ckpt)


def test_missing_config_field_is_named(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["vision_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: missing field 'vision_config'"):
        Llava.from_pretrained(ckpt)


def test_unsupported_config_value_is_named(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="yarn"):
        Llava.from_pretrained(ckpt)


def test_missing_config_file_and_folders_are_named(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Llava.from_pretrained(tmp_path / "nowhere")
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt/config\.json"):
        Llava.from_pretrained(ckpt)


def test_original_layout_missing_parts_are_named(tmp_path):
    llm, clip, _ = write_original(hf_llava("mha"), tmp_path, projector="bin")
    with pytest.raises(FileNotFoundError, match="no_clip"):
        Llava.from_pretrained(llm, vision_tower=tmp_path / "no_clip")
    with pytest.raises(FileNotFoundError, match=r"mm_projector\.nope"):
        Llava.from_pretrained(llm, vision_tower=clip, projector=tmp_path / "mm_projector.nope")
    # without its projector file, the projector's parameters are reported missing
    with pytest.raises(KeyError, match=r"multi_modal_projector\.linear_1"):
        Llava.from_pretrained(llm, vision_tower=clip)


def test_missing_shard_and_bin_only_folders(tmp_path):
    sharded = write_hf(hf_llava("mha"), tmp_path / "sharded", shard=True)
    victim = sorted(sharded.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        Llava.from_pretrained(sharded)
    bins = tmp_path / "bins"
    bins.mkdir()
    (bins / "config.json").write_text((sharded / "config.json").read_text())
    torch.save({}, bins / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        Llava.from_pretrained(bins)
