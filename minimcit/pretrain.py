"""Stage 1 for MiniCoIN: a byte-level BPE tokenizer trained on the synthetic world's text, and
a tiny LLaVA (vision tower, projector, LLM, all from random init) trained on captions of the
world, like LLaVA's projector pre-training. The result is cached by preset, seed and recipe and
read back with `Llava.from_pretrained`, like any other checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from .checkpoint import save_llava
from .data import Collator
from .minicoin import caption_corpus, minicoin, preset
from .model import Llava, LlavaConfig, TextConfig, VisionConfig
from .processing import SYSTEM, LlavaPrompt, TextTokenizer
from .train import TrainConfig, train_stage

RECIPE_VERSION = 4  # bump when the world or stage 1 changes, so cached bases are rebuilt


def default_cache() -> Path:
    return Path(os.environ.get("MINIMCIT_CACHE", Path.home() / ".cache" / "minimcit"))


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with digits split one by one (boxes and counts read digit by digit)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return bpe


def _recipe(preset_name: str, seed: int) -> str:
    return json.dumps({"preset": preset_name, "seed": seed, "spec": preset(preset_name).base_spec(),
                       "version": RECIPE_VERSION}, sort_keys=True)


def base_name(preset_name: str = "default", seed: int = 0) -> str:
    """The cache folder's name of a base: it changes with anything that defines the base, so a
    run records which MiniCoIN it was made on (its config's "model")."""
    return f"minicoin-base-{preset_name}-{hashlib.sha1(_recipe(preset_name, seed).encode()).hexdigest()[:10]}"


def pretrain_base(preset_name: str = "default", seed: int = 0, cache: Path | None = None, device="cpu",
                  quiet: bool = False) -> Path:
    """The MiniCoIN base model of a preset, saved in the llava-hf layout with tokenizer.json;
    built once and cached."""
    p = preset(preset_name)
    recipe = _recipe(preset_name, seed)
    folder = (cache or default_cache()) / base_name(preset_name, seed)
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    t0 = time.time()
    corpus = caption_corpus(p.stage1["corpus"], p.image_size, seed)
    task_text = [f"{s.question} {s.answer}" for order in ("minicoin", "minicvit")
                 for t in minicoin(order, preset_name, seed) for s in t.train]
    bpe = train_tokenizer([SYSTEM + " USER: ASSISTANT:"] * 10 + [f"{s.question} {s.answer}" for s in corpus]
                          + task_text, p.vocab)
    cfg = LlavaConfig(vision=VisionConfig(**p.vision),
                      text=TextConfig(vocab_size=bpe.get_vocab_size(), bos_token_id=1, eos_token_id=2,
                                      pad_token_id=3, max_position_embeddings=1024, **p.text),
                      image_token_index=bpe.token_to_id("<image>"))
    torch.manual_seed(seed)
    model = Llava(cfg).to(device)
    with torch.no_grad():  # GPT-style small init: the default Linear init is too large for a deep residual stack
        for param in model.parameters():
            if param.dim() >= 2:
                torch.nn.init.normal_(param, std=0.02)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bpe.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "pad_token": "<pad>"}))
    collator = Collator(TextTokenizer(tmp), LlavaPrompt(cfg.num_image_tokens, cfg.image_token_index, p.image_size,
                                                        plain=True))
    tcfg = TrainConfig(epochs=p.stage1["epochs"], batch_size=p.stage1["batch"], lr=p.stage1["lr"], warmup_ratio=0.05,
                       weight_decay=0.01, seed=seed)
    curve = train_stage(model, [{"params": list(model.parameters())}], corpus, collator, tcfg, stage=0,
                        label="stage 1 (captions)", device=device, quiet=quiet)
    save_llava(model, tmp)
    (tmp / "pretrain.json").write_text(json.dumps({"recipe": json.loads(recipe), "final_loss": curve[-1][1],
                                                   "seconds": round(time.time() - t0, 1)}))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)  # the cache entry appears whole or not at all
    return folder
