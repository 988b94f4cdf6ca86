"""Tiny random LLaVA checkpoints written by transformers, then re-keyed into every layout
our loader must read. transformers is the reference; it never computes our numbers."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

TINY = {
    # multi-head attention, 28px images in 14px patches (4 image tokens)
    "mha": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    image_size=28, patch_size=14),
        text=dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4),
        image_token_index=119),
    # grouped-query attention (8 query heads share 2 kv heads), 30px in 10px patches (9 tokens)
    "gqa": dict(
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=3,
                    image_size=30, patch_size=10),
        text=dict(vocab_size=150, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5),
        image_token_index=149),
}


def hf_llava(name: str, seed: int = 0, **text_overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    spec = TINY[name]
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"]),
                      text_config=LlamaConfig(**{**spec["text"], **text_overrides}),
                      image_token_index=spec["image_token_index"])
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    # transformers initialises with std 0.02, which leaves logits so flat that a wrong RoPE or
    # mask would hide under fp32 tolerance. Larger weights make every mistake visible.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    return model


def sample_inputs(hf_model, batch: int = 2, text_len: int = 9, seed: int = 1):
    """input_ids with one image's tokens after a short prefix, and random pixels."""
    c = hf_model.config
    g = torch.Generator().manual_seed(seed)
    n_img = (c.vision_config.image_size // c.vision_config.patch_size) ** 2
    ids = torch.randint(3, c.image_token_index, (batch, text_len + n_img), generator=g)
    ids[:, 2:2 + n_img] = c.image_token_index
    px = torch.randn(batch, 3, c.vision_config.image_size, c.vision_config.image_size, generator=g)
    return ids, px


def write_hf(model, folder: Path, shard: bool = False) -> Path:
    """transformers >= 5 save_pretrained layout, optionally sharded."""
    model.save_pretrained(folder, max_shard_size="20KB" if shard else "5GB")
    return folder


def _state(folder: Path) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def write_hub(model, folder: Path) -> Path:
    """llava-hf hub layout (transformers 4): vision_tower.vision_model.*, rope_theta spelling."""
    tmp = write_hf(model, folder.with_name(folder.name + "_v5"))
    state = {(k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k): v
             for k, v in _state(tmp).items()}
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors")
    config = json.loads((tmp / "config.json").read_text())
    rope = config["text_config"].pop("rope_parameters")
    config["text_config"]["rope_theta"] = rope["rope_theta"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_original(model, folder: Path, projector: str = "inside") -> tuple[Path, Path, Path | None]:
    """Original LLaVA: an LLM folder (model.*, lm_head, maybe model.mm_projector.{0,2}), a CLIP
    folder (vision_model.* plus a text tower the loader must skip), maybe mm_projector.bin."""
    tmp = write_hf(model, folder / "v5")
    state, config = _state(tmp), json.loads((tmp / "config.json").read_text())
    llm, clip, proj = {}, {}, {}
    for k, v in state.items():
        if k.startswith("language_model.model."):
            llm["model." + k[len("language_model.model."):]] = v
        elif k == "language_model.lm_head.weight":
            llm["lm_head.weight"] = v
        elif k.startswith("vision_tower."):
            clip["vision_model." + k[len("vision_tower."):]] = v
        elif k.startswith("multi_modal_projector."):
            idx = {"linear_1": "0", "linear_2": "2"}[k.split(".")[1]]
            proj[f"model.mm_projector.{idx}.{k.split('.')[2]}"] = v
    clip["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 4)
    clip["logit_scale"] = torch.tensor(1.0)
    proj_file = None
    if projector == "inside":
        llm.update(proj)
    else:
        proj_file = folder / f"mm_projector.{projector}"
        if projector == "bin":
            torch.save(proj, proj_file)
        else:
            save_file(proj, proj_file)
    llm_dir, clip_dir = folder / "llm", folder / "clip"
    llm_dir.mkdir(), clip_dir.mkdir()
    save_file(llm, llm_dir / "model.safetensors")
    save_file(clip, clip_dir / "model.safetensors")
    text = config["text_config"]
    text.update(mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                mm_hidden_size=config["vision_config"]["hidden_size"], architectures=["LlavaLlamaForCausalLM"])
    (llm_dir / "config.json").write_text(json.dumps(text))
    (clip_dir / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": config["vision_config"]}))
    return llm_dir, clip_dir, proj_file


@pytest.fixture(params=sorted(TINY))
def tiny_name(request):
    return request.param
