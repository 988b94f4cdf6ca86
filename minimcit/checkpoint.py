"""Reading (and writing) LLaVA checkpoints: three key layouts mapped onto model.py's names.

Loading is strict: every parameter must come from exactly one checkpoint tensor of the
right shape, and every checkpoint tensor must land somewhere unless a rule below says the
model does not use it. The model is built on the meta device and each tensor is read,
cast and moved on its own, so a 7B model needs about its own size in memory, not twice.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .model import Backbone, Llava, LlavaConfig
from .qwen2_vl import Qwen2VL, Qwen2VLConfig

# Each layout is an ordered list of (pattern, replacement): the first pattern that matches a
# checkpoint key rewrites it into our name; replacement None marks a tensor the model does not
# use. A key that no rule claims, or that lands on no parameter, is an error.
UNUSED = [
    (r"\.rotary_emb\.inv_freq$", None),  # a cache some LLaMA checkpoints saved
    (r"embeddings\.position_ids$", None),  # an arange buffer older CLIP checkpoints saved
]
HF_LAYOUT = UNUSED + [  # llava-hf hub (transformers 4) and transformers >= 5 save_pretrained
    (r"^(model\.)?vision_tower\.vision_model\.", "vision_tower."),
    (r"^(model\.)?vision_tower\.", "vision_tower."),
    (r"^(model\.)?multi_modal_projector\.", "multi_modal_projector."),
    (r"^(model\.)?language_model\.lm_head\.", "lm_head."),
    (r"^(model\.)?language_model\.model\.", "language_model."),
    (r"^(model\.)?language_model\.", "language_model."),
    (r"^lm_head\.", "lm_head."),
]
PROJECTOR = [  # original LLaVA names the mlp2x_gelu Sequential's two Linears 0 and 2
    (r"^(model\.)?mm_projector\.0\.", "multi_modal_projector.linear_1."),
    (r"^(model\.)?mm_projector\.2\.", "multi_modal_projector.linear_2."),
]
LLM_LAYOUT = UNUSED + PROJECTOR + [  # original LLaVA / Vicuna folder
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),
    (r"^model\.", "language_model."),
    (r"^lm_head\.", "lm_head."),
]
CLIP_LAYOUT = UNUSED + [  # a CLIPModel or CLIPVisionModel folder; the text tower is not used
    (r"^(text_model\.|logit_scale$|text_projection\.|visual_projection\.)", None),
    (r"^vision_model\.", "vision_tower."),
]

ORIGINAL_IMAGE_TOKEN_INDEX = -200  # LLaVA's IMAGE_TOKEN_INDEX


def rename(key: str, layout) -> str | None:
    for pattern, repl in layout:
        if re.search(pattern, key):
            return None if repl is None else re.sub(pattern, repl, key, count=1)
    return key  # claimed by no rule: load_weights reports it when it fits no parameter


def read_json(path: Path):
    """A JSON file's contents; a missing file or bad JSON raises an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: sharded (index.json) or single."""
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing field 'weight_map'")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index} lists shard {f.name}, which is not in {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {bins[:3]}: convert them to safetensors first)" if bins else ""
        raise FileNotFoundError(f"no *.safetensors weights in {folder}{hint}")
    return files


def iter_tensors(path: Path):
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be truncated: download or "
                             "copy it again") from None
    else:  # mm_projector.bin, written by torch.save
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path}: not a readable torch file ({e}); it may be truncated") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
        yield from state.items()


def load_weights(model: nn.Module, sources, dtype, device) -> None:
    """Fill a meta-device model from [(file, layout), ...], strictly."""
    params = dict(model.named_parameters())
    tied = getattr(model.config.text, "tie_word_embeddings", False)
    filled: dict[str, Path] = {}
    for path, layout in sources:
        for key, tensor in iter_tensors(path):
            name = rename(key, layout)
            if name is None or (tied and name == "lm_head.weight"):
                continue
            if name not in params:
                raise KeyError(f"{path}: key {key!r} (read as {name!r}) matches no parameter of the model")
            if name in filled:
                raise KeyError(f"{path}: key {key!r} fills {name!r}, already filled from {filled[name]}")
            want = params[name].shape
            if tensor.shape != want:
                raise ValueError(f"{path}: key {key!r} has shape {tuple(tensor.shape)}, but the config "
                                 f"gives {name!r} the shape {tuple(want)}")
            module_name, _, leaf = name.rpartition(".")
            value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            model.get_submodule(module_name).register_parameter(leaf, nn.Parameter(value))
            filled[name] = path
    missing = [n for n in params if n not in filled]
    if missing:
        files = ", ".join(str(p) for p, _ in sources)
        raise KeyError(f"{len(missing)} parameter(s) found in no checkpoint file ({files}); "
                       f"first missing: {missing[:5]}")
    if tied:
        model.lm_head.weight = model.language_model.embed_tokens.weight


def original_config(llm_folder: Path, clip_folder: Path, image_token_index) -> LlavaConfig:
    """Assemble a LlavaConfig from an original-LLaVA LLM config and a CLIP config."""
    llm_path, clip_path = llm_folder / "config.json", clip_folder / "config.json"
    llm, clip = read_json(llm_path), read_json(clip_path)
    if isinstance(llm, dict) and "vision_config" in llm:
        raise ValueError(f"{llm_path} is a whole model (it has vision_config), not an original-LLaVA LLM folder: "
                         "drop --vision-tower and --projector (vision_tower= and projector= in Python)")
    kind = llm.get("mm_projector_type", "mlp2x_gelu")
    if kind != "mlp2x_gelu":
        raise ValueError(f"{llm_path}: mm_projector_type {kind!r} is not supported (only mlp2x_gelu)")
    select = llm.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ValueError(f"{llm_path}: unsupported mm_vision_select_feature {select!r}")
    return LlavaConfig.from_dict({
        "text_config": llm,
        "vision_config": clip.get("vision_config", clip),  # CLIPModel nests it; CLIPVisionModel does not
        "image_token_index": ORIGINAL_IMAGE_TOKEN_INDEX if image_token_index is None else image_token_index,
        "vision_feature_layer": llm.get("mm_vision_select_layer", -2),
        "vision_feature_select_strategy": "default" if select == "patch" else "full",
        "tie_word_embeddings": llm.get("tie_word_embeddings", False),
    }, source=f"{llm_path} + {clip_path}")


def read_config(path, *, vision_tower=None, image_token_index=None):
    """The model's config from its folder (and the CLIP folder, original layout), no weights read:
    what the memory plan needs before the model loads. config.json's model_type picks the backbone:
    "qwen2_vl" a Qwen2VLConfig, anything else a LlavaConfig."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    if vision_tower is not None:
        return original_config(path, Path(vision_tower), image_token_index)
    raw = read_json(path / "config.json")
    if not isinstance(raw, dict):
        raise ValueError(f"{path / 'config.json'}: expected a JSON object of model settings, got a "
                         f"{type(raw).__name__}")
    if raw.get("model_type") == "qwen2_vl":
        if image_token_index is not None:
            raise ValueError(f"{path}: a Qwen2-VL checkpoint names its own image token; drop image_token_index")
        return Qwen2VLConfig.from_dict(raw, source=str(path / "config.json"))
    if "vision_config" not in raw:
        raise ValueError(f"{path / 'config.json'}: missing field 'vision_config'; for an original-LLaVA "
                         "LLM folder, give its CLIP folder too (run.py --vision-tower; vision_tower= in Python)")
    config = LlavaConfig.from_dict(raw, source=str(path / "config.json"))
    if image_token_index is not None:
        config.image_token_index = image_token_index
    return config


def load_llava(cls, path, *, vision_tower=None, projector=None, image_token_index=None,
               dtype=None, device=None) -> Llava:
    path = Path(path)
    dtype = dtype or torch.float32
    config = read_config(path, vision_tower=vision_tower, image_token_index=image_token_index)
    if vision_tower is None:
        sources = [(f, HF_LAYOUT) for f in weight_files(path)]
    else:
        vision_tower = Path(vision_tower)
        sources = [(f, LLM_LAYOUT) for f in weight_files(path)]
        sources += [(f, CLIP_LAYOUT) for f in weight_files(vision_tower)]
    if projector is not None:
        projector = Path(projector)
        if not projector.is_file():
            raise FileNotFoundError(f"projector file not found: {projector}")
        sources.append((projector, PROJECTOR))
    with torch.device("meta"):
        model = cls(config)
    load_weights(model, sources, dtype, device or "cpu")
    return model


def load_model(path, *, vision_tower=None, projector=None, dtype=None, device=None) -> Backbone:
    """Whichever backbone the folder holds (read_config's rule): run.py's --model DIR."""
    if isinstance(read_config(path, vision_tower=vision_tower), Qwen2VLConfig):
        if projector is not None:
            raise ValueError(f"{path}: a Qwen2-VL checkpoint holds its own merger; drop --projector")
        return Qwen2VL.from_pretrained(path, dtype=dtype, device=device)
    return Llava.from_pretrained(path, vision_tower=vision_tower, projector=projector, dtype=dtype, device=device)


def save_llava(model: Llava, folder) -> None:
    """Write config.json + model.safetensors in the llava-hf hub layout, each atomically."""
    save(model, folder, {"vision_tower.": "vision_tower.vision_model.", "language_model.": "language_model.model.",
                         "lm_head.": "language_model.lm_head."})


def save(model: Backbone, folder, prefixes: dict) -> None:
    """config.json (the config's to_dict) + model.safetensors, each atomically, our names' `prefixes`
    rewritten into the layout's (a tied lm_head is not written: the embedding holds it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, p in model.state_dict().items():
        if model.config.text.tie_word_embeddings and name == "lm_head.weight":
            continue
        prefix = next((k for k in prefixes if name.startswith(k)), "")
        state[prefixes.get(prefix, "") + name[len(prefix):]] = p.detach().contiguous().cpu()
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = json.dumps(model.config.to_dict(), indent=2)
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) then rename over `path`, so a crash never leaves half a file. The
    file gets the mode any new file gets (0666 less the umask): mkstemp makes it private."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
