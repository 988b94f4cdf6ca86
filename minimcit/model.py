"""LLaVA-1.5 written out: a CLIP ViT vision tower, the mlp2x_gelu projector, a LLaMA decoder.

Module names follow transformers' LlavaModel tree without its `model.` prefix
(`vision_tower.encoder.layers.0.self_attn.q_proj`, `language_model.layers.0.mlp.up_proj`,
`lm_head`), so every checkpoint layout maps onto it with a few prefix rewrites
(checkpoint.py) and adapters can target layers by their full name.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

IGNORE_INDEX = -100  # the label of a position that carries no loss (prompt, image, padding)

# --------------------------------------------------------------------------- config


@dataclass
class VisionConfig:
    # Defaults are transformers' CLIPVisionConfig defaults, because llava-hf configs omit
    # fields that equal them.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    # Defaults are transformers' LlamaConfig defaults (LLaMA-7B), for the same reason.
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: multi-head attention
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool | None = None  # None: attention_bias; Qwen2 biases q, k and v but not o
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias


@dataclass
class LlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 32000
    vision_feature_layer: int = -2  # hidden state of the penultimate CLIP layer
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    # What the memory plan (plan.py) needs to know of a backbone, which Qwen2VLConfig says for its own.
    def build(self) -> "Llava":
        return Llava(self)

    @property
    def vision_layers(self) -> int:
        return self.vision.num_hidden_layers

    def with_layers(self, text: int, vision: int) -> "LlavaConfig":
        return replace(self, text=replace(self.text, num_hidden_layers=text),
                       vision=replace(self.vision, num_hidden_layers=vision))

    def tiny(self) -> "LlavaConfig":
        """The same layers, image size and vocabulary at a tiny width: the same data-dependent values."""
        return replace(self, vision=replace(self.vision, hidden_size=32, intermediate_size=64, num_attention_heads=2),
                       text=replace(self.text, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                    num_key_value_heads=2, head_dim=None))

    def fake_images(self, n: int, slots: int | None, generator):  # -> pixel_values of n images, slots each
        v = self.vision
        return torch.randn(n, 3, v.image_size, v.image_size, generator=generator), self.num_image_tokens

    def vision_layer(self) -> nn.Module:
        return CLIPEncoderLayer(self.vision)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "LlavaConfig":
        """From a llava-hf `config.json` dict (transformers 4 or 5 spelling). `source`
        names the file in errors."""
        for key in ("vision_config", "text_config"):
            if not isinstance(d.get(key), dict):
                raise ValueError(f"{source}: missing field {key!r} (a LLaVA config needs both "
                                 "'vision_config' and 'text_config')")
        text = dict(d["text_config"])
        # transformers >= 5 writes rope_parameters={"rope_type", "rope_theta"}; older, rope_theta.
        rope = text.get("rope_parameters") or {}
        if "rope_theta" in rope:
            text["rope_theta"] = rope["rope_theta"]
        scaling = text.get("rope_scaling") or rope
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ValueError(f"{source}: text_config rope type {scaling.get('rope_type')!r} is not "
                             "supported (LLaVA-1.5 uses plain RoPE)")
        if "tie_word_embeddings" not in text and "tie_word_embeddings" in d:
            text["tie_word_embeddings"] = d["tie_word_embeddings"]
        layer = d.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(f"{source}: vision_feature_layer must be one integer, got {layer!r}")
        cfg = cls(
            vision=_from_fields(VisionConfig, d["vision_config"]),
            text=_from_fields(TextConfig, text),
            image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
            vision_feature_layer=layer,
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=d.get("multimodal_projector_bias", True),
        )
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        check_config(source, self.vision, self.text, [
            (self.vision.hidden_act in ACT, "vision_config.hidden_act", self.vision.hidden_act),
            (self.text.hidden_act == "silu", "text_config.hidden_act", self.text.hidden_act),
            (self.projector_hidden_act in ACT, "projector_hidden_act", self.projector_hidden_act),
            (self.vision_feature_select_strategy in ("default", "full"),
             "vision_feature_select_strategy", self.vision_feature_select_strategy),
            (-self.vision.num_hidden_layers <= self.vision_feature_layer <= self.vision.num_hidden_layers,
             "vision_feature_layer", self.vision_feature_layer),
            (self.text.num_attention_heads % self.text.num_key_value_heads == 0,
             "text_config.num_key_value_heads", self.text.num_key_value_heads),
        ])

    def to_dict(self) -> dict:
        """The llava-hf config.json spelling, so a saved model reads back through from_dict."""
        vision = {f.name: getattr(self.vision, f.name) for f in fields(VisionConfig)}
        text = {f.name: getattr(self.text, f.name) for f in fields(TextConfig)}
        return {
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "vision_config": {"model_type": "clip_vision_model", **vision},
            "text_config": {"model_type": "llama", **text},
            "image_token_index": self.image_token_index,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": self.projector_bias,
            "tie_word_embeddings": self.text.tie_word_embeddings,
        }


def check_config(source: str, vision, text, checks, sizes=("_size", "_layers", "_heads")) -> None:
    """Refuse a backbone's config by field: every size and count (a field ending in one of `sizes`) a
    positive integer, or the model cannot be built; then each (ok, field, value) of `checks`."""
    for part, c in (("vision_config", vision), ("text_config", text)):
        for f in fields(c):
            value = getattr(c, f.name)
            if f.name.endswith(sizes) and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"{source}: field '{part}.{f.name}' should be a positive integer, got {value!r}")
    for ok, name, value in checks:
        if not ok:
            raise ValueError(f"{source}: unsupported value {value!r} for field {name!r}")


def _from_fields(cls, d: dict):
    """The dataclass fields present in d; everything else in a config.json is ignored."""
    return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})


ACT = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's activation
    "gelu": F.gelu,
    "silu": F.silu,
}

# --------------------------------------------------------------------------- vision tower (CLIP ViT)


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(c.hidden_size) * 0.02)
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.position_embedding = nn.Embedding(c.num_patches + 1, c.hidden_size)

    def forward(self, pixel_values):  # (N, 3, H, W)
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (N, P, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, C)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (N, P+1, C)


class CLIPAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.n_head = c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x):  # (N, T, C)
        N, T, C = x.shape
        q, k, v = (p(x).view(N, T, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (N, h, T, hd), no mask: every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(N, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.act = ACT[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # sic: the checkpoints' spelling
        self.encoder = CLIPEncoder(c)
        # Kept so checkpoints load strictly; LLaVA's features come from before it.
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values, feature_layer: int = -2):
        """Hidden state `feature_layer` in transformers' numbering: hidden_states[0] is the
        embedding output, hidden_states[i] the output of layer i, so -2 is the penultimate layer.
        Layers after it are never run."""
        n_run = feature_layer % (len(self.encoder.layers) + 1)
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (N, P+1, C)
        for layer in self.encoder.layers[:n_run]:
            x = layer(x)
        return x


class Projector(nn.Module):
    """mlp2x_gelu: Linear(vision, text) -> GELU -> Linear(text, text)."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.linear_1 = Linear(cfg.vision.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias)
        self.act = ACT[cfg.projector_hidden_act]
        self.linear_2 = Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias)

    def forward(self, x, tokens=None):  # tokens: the images' Tokens (one row per image), for adapters
        return self.linear_2(self.act(self.linear_1(x, tokens)), tokens)


# --------------------------------------------------------------------------- language model (LLaMA)


@dataclass
class Tokens:
    """What the model tells each of its linears about a call beyond x, as an argument of the call:
    a plain linear ignores it; an adapter that routes per sequence, counts its gates over the real
    tokens (BranchLoRA) or routes by the instruction (SMoLoRA) reads it. One per forward, and one
    per generation step sharing `memory` with the prompt's; the projector's linears get one with a
    row per image."""
    mask: torch.Tensor | None = None  # (B, T) True at the call's real tokens; None: every token is real
    decoding: bool = False  # a generation step after the prompt: one new token per row
    memory: dict = field(default_factory=dict)  # what a layer decided on the prompt, for the steps after it
    recomputing: bool = False  # True while gradient checkpointing recomputes a layer in the backward
    # (B, C) float32: each row's mean input embedding over its instruction span (the selector's e_txt), for
    # an adapter routed by the instruction (SMoLoRA); None when the call was given no instruction_mask.
    instruction: torch.Tensor | None = None

    @contextmanager
    def recompute(self):
        self.recomputing = True
        try:
            yield
        finally:
            self.recomputing = False


def masked_mean(x, mask):  # x (B, T, C), mask (B, T) or None -> (B, C)
    """Each row's mean of x over the positions `mask` marks (every position when None; 0 where none)."""
    w = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.float()
    return (x * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)


class Linear(nn.Linear):
    """The LLM's and the projector's linears: nn.Linear (same keys, same math), told about the call's
    tokens, which it ignores. An adapter that wraps one (method.AdapterLinear) gets them as an argument."""

    def forward(self, x, tokens: Tokens | None = None):
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # w * x / sqrt(mean(x^2) + eps), computed in fp32 whatever x's dtype. Decision: torch's
        # rms_norm, one fused kernel forward and one backward on CUDA (on the CPU the same ops as
        # transformers' LlamaRMSNorm, bit for bit in fp32); in bf16 it rounds once, after the weight,
        # where LlamaRMSNorm rounds before it too: within one bf16 rounding (tests/test_model.py).
        # Outside autocast, whose CUDA policy would run it in fp32 and hand fp32 to the next layer.
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos/sin tables for rotary embeddings at integer `positions` (B, T) -> (B, 1, T, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2), in fp32 even under bf16
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, h, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # LLaMA's "rotate_half" pairing


class KVCache:
    """Preallocated keys/values for every layer; `pos` is how many positions are filled."""

    def __init__(self, c: TextConfig, batch: int, max_len: int, dtype, device):
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.pos = 0

    def update(self, layer: int, k, v):  # k, v (B, h_kv, T, hd) -> all keys/values so far
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class LlamaAttention(nn.Module):
    def __init__(self, c: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, self.n_head * self.head_dim, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(self.n_head * self.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, tokens: Tokens):  # x (B, T, C)
        B, T, _ = x.shape
        q = self.q_proj(x, tokens).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_proj(x, tokens).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, h_kv, T, hd)
        v = self.v_proj(x, tokens).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, h_kv, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv != self.n_head)  # (B, h, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1), tokens)


class LlamaMLP(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x, tokens: Tokens):
        return self.down_proj(F.silu(self.gate_proj(x, tokens)) * self.up_proj(x, tokens), tokens)  # SwiGLU


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(c, layer_idx)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, tokens: Tokens):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, tokens)
        return x + self.mlp(self.post_attention_layernorm(x), tokens)


class LlamaModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, rope, mask, cache: KVCache | None = None, tokens: Tokens | None = None,
                checkpointing: bool = False):  # x (B, T, C) embeddings; rope: (cos, sin), each (B, 1, T, hd)
        """`rope`: the rotary tables of the call's positions, which the backbone computes (plain
        RoPE for LLaVA, M-RoPE for Qwen2-VL). `checkpointing`: each layer's activations are dropped
        after the forward and recomputed in the backward, with `tokens.recomputing` set (an adapter
        that counts statistics in its forward must not count them twice)."""
        tokens = Tokens() if tokens is None else tokens
        cos, sin = rope
        for layer in self.layers:
            if checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, tokens, use_reentrant=False,
                                                      context_fn=lambda: (nullcontext(), tokens.recompute()))
            else:
                x = layer(x, cos, sin, mask, cache, tokens)
        if cache is not None:
            cache.pos += x.shape[1]
        return self.norm(x)


def attention_mask_4d(attention_mask, q_len: int, past: int):
    """Boolean (B, 1, q_len, past+q_len) mask from a (B, past+q_len) padding mask, or None
    when plain causal attention is already exact."""
    if past == 0 and (attention_mask is None or bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())):
        # No padding, or right padding only: causal masking already hides every pad key
        # from every real token, so SDPA's fused causal path is exact.
        return None
    S = past + q_len
    q_pos = torch.arange(past, S, device=attention_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos) & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    # A left-pad query has no real key before it; letting it see itself keeps its softmax
    # row non-empty (no NaN) and cannot leak into real tokens, which never see pad keys.
    return mask | (k_pos == q_pos)


# --------------------------------------------------------------------------- what every backbone shares


class Backbone(nn.Module):
    """A vision tower, a projector and a decoder, with the training loop's calls written once.

    A backbone (Llava below, qwen2_vl.Qwen2VL) sets `config` (its `.text` a TextConfig, its
    `.image_token_index` the id of an image slot), `language_model` (a LlamaModel) and `lm_head`, and
    says everything about itself in four methods: `embed` (token embeddings with each image's
    features at its slots), `positions` (the rotary positions of a prompt), `rope` (their cos/sin
    tables) and `image_embedding` (each image's mean feature, the task selector's e_img). Class
    attributes name its parts for the adapters: `TOWER` (a regex of the vision tower's module names,
    which no adapter may enter), `PROJECTOR` (the projector's linears) and `projector_name`."""

    TOWER: str
    PROJECTOR: str
    projector_name: str

    @property
    def projector(self) -> nn.Module:
        return self.get_submodule(self.projector_name)

    def embed(self, input_ids, pixel_values=None, instruction_mask=None):  # -> (B, T, C), (B, C) or None
        raise NotImplementedError

    def positions(self, input_ids, attention_mask, pixel_values=None):  # -> (B, T), or (3, B, T) for M-RoPE
        raise NotImplementedError

    def rope(self, positions, dtype):  # -> (cos, sin), each (B, 1, T, head_dim)
        raise NotImplementedError

    def image_embedding(self, pixel_values):  # -> (N, image_embedding_dim) float32
        raise NotImplementedError

    def instruction_embedding(self, input_ids, instruction_mask):  # -> (B, C) float32, no gradient
        """Each row's mean input embedding over the tokens `instruction_mask` marks, without the
        images: the selector's e_txt (Decision, SPEC §2); a forward computes the same in `embed`."""
        with torch.no_grad():
            is_image = input_ids == self.config.image_token_index
            emb = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0)).float()  # (B, T, C)
            return masked_mean(emb, instruction_mask)

    def hidden(self, input_ids, pixel_values=None, attention_mask=None, instruction_mask=None,
               checkpointing: bool = False):  # -> (B, T, C) the decoder's last hidden states
        x, instruction = self.embed(input_ids, pixel_values, instruction_mask)
        rope = self.rope(self.positions(input_ids, attention_mask, pixel_values), x.dtype)
        return self.language_model(x, rope, attention_mask_4d(attention_mask, input_ids.shape[1], 0),
                                   tokens=_tokens(attention_mask, instruction), checkpointing=checkpointing)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, instruction_mask=None):
        """Logits (B, T, V). `attention_mask` (B, T) marks real tokens; left or right padding.
        `instruction_mask` (B, T): the instruction span, for adapters routed by it (else unused)."""
        return self.lm_head(self.hidden(input_ids, pixel_values, attention_mask, instruction_mask))

    def answer_logits(self, input_ids, pixel_values=None, attention_mask=None, labels=None,
                      checkpointing: bool = False, instruction_mask=None):
        """Logits (n, V) at the n positions whose next token is labelled, and those tokens (n,).
        lm_head runs only there: in multimodal data most positions are prompt and image tokens, so
        this skips most of the vocabulary projection. `checkpointing`: LlamaModel.forward's."""
        h = self.hidden(input_ids, pixel_values, attention_mask, instruction_mask, checkpointing)  # (B, T, C)
        target = labels[:, 1:]  # position t predicts token t+1
        keep = target != IGNORE_INDEX
        return self.lm_head(h[:, :-1][keep]), target[keep]  # (n, V), (n,)

    def loss(self, input_ids, pixel_values=None, attention_mask=None, labels=None):
        """Summed next-token cross-entropy over labelled tokens, and their count. Returning the
        sum lets a training loop weight gradient accumulation by answer tokens."""
        logits, target = self.answer_logits(input_ids, pixel_values, attention_mask, labels)
        return F.cross_entropy(logits.float(), target, reduction="sum"), target.numel()

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 32,
                 eos_token_id: int | None = -1, pad_token_id: int | None = None, instruction_mask=None):
        """Greedy decoding with a KV cache over a left-padded batch -> new token ids (B, n <= max_new_tokens).
        A row that emits eos is padded with pad_token_id after it; decoding stops when all have.
        eos_token_id=-1 means the config's eos, None means never stop early."""
        c = self.config.text
        eos = c.eos_token_id if eos_token_id == -1 else eos_token_id
        pad = pad_token_id if pad_token_id is not None else (c.pad_token_id if c.pad_token_id is not None else eos)
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate needs left padding: every row's last token must be real")
        cache = KVCache(c, B, T + max_new_tokens, self.lm_head.weight.dtype, input_ids.device)
        mask2d = torch.cat([attention_mask.bool(), attention_mask.new_ones(B, max_new_tokens).bool()], dim=1)
        positions = self.positions(input_ids, attention_mask, pixel_values)  # (B, T) or (3, B, T)

        x, instruction = self.embed(input_ids, pixel_values, instruction_mask)
        prompt = _tokens(attention_mask, instruction)
        h = self.language_model(x, self.rope(positions, x.dtype), attention_mask_4d(attention_mask, T, 0), cache,
                                prompt)
        next_tok = self.lm_head(h[:, -1]).argmax(-1)  # (B,)
        out, done = [], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            if eos is not None:
                next_tok = next_tok.masked_fill(done, pad)
                done = done | (next_tok == eos)
            out.append(next_tok)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            # A new token is text: one past the last position on every axis (M-RoPE's too).
            positions = positions[..., -1:] + 1  # (B, 1) or (3, B, 1)
            mask = mask2d[:, None, None, :cache.pos + 1]  # (B, 1, 1, S): the new token sees every real key
            # The prompt's routing decisions stand, and its rows' instructions.
            step_tokens = Tokens(decoding=True, memory=prompt.memory, instruction=prompt.instruction)
            x = self.language_model.embed_tokens(next_tok[:, None])
            h = self.language_model(x, self.rope(positions, x.dtype), mask, cache, step_tokens)
            next_tok = self.lm_head(h[:, -1]).argmax(-1)
        return torch.stack(out, dim=1)


def _tokens(attention_mask, instruction=None) -> Tokens:
    return Tokens(mask=None if attention_mask is None else attention_mask.bool(), instruction=instruction)


def text_positions(attention_mask, input_ids):
    """RoPE positions (B, T): count real tokens only, so a left-padded prompt starts at 0."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def per_image_instruction(instruction, images_per_row):  # (B, C), (B,) -> (n_images, C)
    """Each image's row of `instruction`: its sample's, for the projector's adapters. A row may hold
    no image (a text-only sample) or several."""
    if instruction is None or bool((images_per_row == 1).all()):  # one image a row: the usual batch
        return instruction
    return instruction.repeat_interleave(images_per_row, dim=0)


# --------------------------------------------------------------------------- LLaVA


class Llava(Backbone):
    TOWER = r"vision_tower\..*"
    PROJECTOR = r"multi_modal_projector\.linear_[12]"
    projector_name = "multi_modal_projector"

    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision)
        self.multi_modal_projector = Projector(config)
        self.language_model = LlamaModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    @classmethod
    def from_pretrained(cls, path, *, vision_tower=None, projector=None, image_token_index=None,
                        dtype=None, device=None) -> "Llava":
        """Load a llava-hf / transformers checkpoint folder, or an original-LLaVA LLM folder
        with `vision_tower=` a CLIP folder and optionally `projector=` an mm_projector file."""
        from .checkpoint import load_llava

        return load_llava(cls, path, vision_tower=vision_tower, projector=projector,
                          image_token_index=image_token_index, dtype=dtype, device=device)

    @property
    def image_embedding_dim(self) -> int:
        return self.config.vision.hidden_size

    def image_features(self, pixel_values, tokens: Tokens | None = None):  # (N, 3, H, W) -> (N, P, C_text)
        c = self.config
        h = self.vision_tower(pixel_values.to(self.lm_head.weight.dtype), c.vision_feature_layer)  # (N, P+1, C_vis)
        if c.vision_feature_select_strategy == "default":
            h = h[:, 1:]  # drop CLS
        return self.multi_modal_projector(h, tokens)

    def image_embedding(self, pixel_values):  # (N, 3, H, W) -> (N, C_vis)
        """The mean CLIP patch feature at the layer LLaVA reads, CLS excluded."""
        hidden = self.vision_tower(pixel_values.to(self.lm_head.weight.dtype), self.config.vision_feature_layer)
        return hidden[:, 1:].float().mean(1)

    def embed(self, input_ids, pixel_values=None, instruction_mask=None):
        """Token embeddings (B, T, C) with each image's projected features written, in order, at the
        positions holding image_token_index; and, given `instruction_mask` (B, T), each row's mean
        input embedding over that span, float32 (B, C), else None: the instruction an adapter may
        route by (SMoLoRA), which the projector's adapters see again one row per image."""
        is_image = input_ids == self.config.image_token_index  # (B, T)
        # The original layout's -200 is not a row of the table: look up a dummy row there.
        x = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, C)
        instruction = None if instruction_mask is None else masked_mean(x.detach().float(), instruction_mask)
        n_slots = int(is_image.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image tokens but no pixel_values were given")
            return x, instruction
        per_row = is_image.sum(1) // max(n_slots // len(pixel_values), 1)  # (B,) images in each row
        per_image = per_image_instruction(instruction, per_row)
        feats = self.image_features(pixel_values, None if per_image is None else Tokens(instruction=per_image))
        if n_slots != feats.shape[0] * feats.shape[1]:  # (N, P, C)
            raise ValueError(f"input_ids hold {n_slots} image tokens (id {self.config.image_token_index}) but "
                             f"{feats.shape[0]} image(s) give {feats.shape[0] * feats.shape[1]} features")
        return x.masked_scatter(is_image[..., None], feats.to(x.dtype)), instruction

    def positions(self, input_ids, attention_mask, pixel_values=None):
        return text_positions(attention_mask, input_ids)

    def rope(self, positions, dtype):
        c = self.config.text
        return rope_cos_sin(positions, c.head_dim, c.rope_theta, dtype)
