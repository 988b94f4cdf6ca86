"""The memory plan (minimcit/plan.py): its prediction against the same steps on real tensors, the
shallow-twin extrapolation against the full-depth prediction, the choices it makes for a given
memory, and a real-data run that follows, prints and records it."""

import dataclasses
import json

import pytest
import torch

from minimcit import plan
from minimcit.model import LlavaConfig, TextConfig, VisionConfig
from minimcit.plan import GiB, Shape, make_plan, peak_model, predict_bytes
from minimcit.qwen2_vl import Qwen2VLConfig
from minimcit.qwen2_vl import VisionConfig as QwenVision
from minimcit.train import TrainConfig

TINY = LlavaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                        image_size=56, patch_size=14),
    text=TextConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2),
    image_token_index=299)
CFG = TrainConfig(batch_size=4, grad_accum=2, train_projector=True, max_new_tokens=3)


@pytest.mark.parametrize("method,ckpt,evaluation", [("seqlora", False, False), ("branchlora", True, False),
                                                    ("lilora", False, True), ("moelora", False, False)])
def test_fake_prediction_matches_the_real_step(method, ckpt, evaluation):
    cfg = dataclasses.replace(CFG, gradient_checkpointing=ckpt, train_projector=method != "lilora")
    hp = {"r": 8, "lora_alpha": 16, "dropout": 0.05, **({"num_experts": 4} if method == "moelora" else {})}
    shape = Shape(3, 40, 5)
    fake = predict_bytes(TINY, method, hp, cfg, shape, tasks=2, evaluation=evaluation)
    real = predict_bytes(TINY, method, hp, cfg, shape, tasks=2, evaluation=evaluation, fake=False)
    assert fake["held"] == real["held"]
    # A real boolean index builds its integer indices inside the kernel, unseen, where the replay
    # builds them as tensors, and checkpointing keeps RNG states the two count differently: a few
    # KiB whatever the model's width, 0.75% of this tiny step at most.
    assert abs(fake["peak"] - real["peak"]) <= max(4096, 0.01 * real["peak"])
    assert fake["peak"] > fake["held"] + 3 * 40 * 48 * 4  # activations were counted at all


@pytest.mark.parametrize("method,ckpt,evaluation", [("branchlora", True, False), ("dirlora", False, False),
                                                    ("seqlora", False, True)])
def test_four_shallow_predictions_give_the_full_depth_peak(method, ckpt, evaluation):
    """The peak is affine in the batch and in the decoder's depth: the shallow twin's four
    predictions, extrapolated, equal the prediction of the whole model at another batch."""
    deep = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, num_hidden_layers=6))
    cfg = dataclasses.replace(CFG, gradient_checkpointing=ckpt)
    hp = {"r": 8, "lora_alpha": 16}
    shape = Shape(1, 40, 5)
    model = peak_model(deep, method, hp, cfg, shape, tasks=2, evaluation=evaluation)
    for batch in (1, 5):
        want = predict_bytes(deep, method, hp, cfg, dataclasses.replace(shape, batch=batch), tasks=2,
                             evaluation=evaluation)["peak"]
        assert abs(model(batch) - want) <= 256 * batch, (batch, model(batch), want)


QWEN = Qwen2VLConfig(vision=QwenVision(depth=3, embed_dim=32, hidden_size=64, num_heads=2),
                     text=TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, qkv_bias=True,
                                     tie_word_embeddings=True),
                     mrope_section=(2, 3, 3), image_token_index=299, vision_start_token_id=297, vision_end_token_id=298)


@pytest.mark.parametrize("method,ckpt,evaluation", [("seqlora", False, False), ("smolora", True, False),
                                                    ("branchlora", False, True)])
def test_qwen2_vl_fake_prediction_matches_the_real_step_and_extrapolates(method, ckpt, evaluation):
    """The same prediction on Qwen2-VL (M-RoPE's positions and the per-image merger run on fake tensors: no
    step reads a value), with images of 12 merged tokens on a 6 x 8 patch grid."""
    cfg = dataclasses.replace(CFG, gradient_checkpointing=ckpt, train_projector=method != "smolora")
    hp = {"r": 8, "lora_alpha": 16, **({"num_experts": 4} if method == "smolora" else {})}
    shape = Shape(2, 40, 5, image=12)
    fake = predict_bytes(QWEN, method, hp, cfg, shape, tasks=2, evaluation=evaluation)
    real = predict_bytes(QWEN, method, hp, cfg, shape, tasks=2, evaluation=evaluation, fake=False)
    assert fake["held"] == real["held"]
    assert abs(fake["peak"] - real["peak"]) <= max(4096, 0.01 * real["peak"])
    assert fake["peak"] > fake["held"] + 2 * 40 * 64 * 4
    deep = QWEN.with_layers(6, 3)
    model = peak_model(deep, method, hp, cfg, dataclasses.replace(shape, batch=1), tasks=2, evaluation=evaluation)
    want = predict_bytes(deep, method, hp, cfg, dataclasses.replace(shape, batch=3), tasks=2,
                         evaluation=evaluation)["peak"]
    assert abs(model(3) - want) <= 256 * 3


def fixed_peaks(monkeypatch, train, evaluate):
    """Stand-in peak models (bytes as a function of the batch) so the plan's choices can be checked
    against hand values."""
    def fake_model(c, method, hp, cfg, shape, *, tasks, evaluation, dtype=None, batches=None):
        return evaluate if evaluation else train[cfg.gradient_checkpointing]
    monkeypatch.setattr(plan, "peak_model", fake_model)


def test_plan_keeps_the_global_batch_and_prefers_no_checkpointing_when_enough_tokens_fit(monkeypatch):
    cfg = dataclasses.replace(CFG, batch_size=14, grad_accum=64)  # CoIN: 896 a step
    fixed_peaks(monkeypatch, {False: lambda b: (20 + 7 * b) * GiB, True: lambda b: (20 + b) * GiB},
                lambda b: (20 + 0.5 * b) * GiB)
    p = make_plan(TINY, "seqlora", {}, cfg, memory=80 * GiB, train=Shape(1, 700, 30), evaluation=Shape(1, 670, 32),
                  tasks=8, given=set(), progress=lambda _: None)
    # budget 72 GiB: without checkpointing 20 + 7b <= 72 gives b <= 7; 7 divides 896 and 7 x 700 >= 2048
    assert (p.batch_size, p.grad_accum, p.gradient_checkpointing) == (7, 128, False)
    assert p.batch_size * p.grad_accum == 896 and p.train_peak == 69 * GiB
    assert p.eval_batch_size == 64 and p.eval_peak == 52 * GiB  # 2^k <= 256 with 20 + k/2 <= 72
    # 24 GiB: budget 21.6; without checkpointing nothing fits, with it 20 + b <= 21.6 gives b = 1
    p = make_plan(TINY, "seqlora", {}, cfg, memory=24 * GiB, train=Shape(1, 700, 30), evaluation=Shape(1, 670, 32),
                  tasks=8, given=set(), progress=lambda _: None)
    assert (p.batch_size, p.grad_accum, p.gradient_checkpointing, p.eval_batch_size) == (1, 896, True, 2)
    # a micro-batch of too few tokens without checkpointing gives way to a larger one with it
    fixed_peaks(monkeypatch, {False: lambda b: (60 + 11 * b) * GiB, True: lambda b: (20 + b) * GiB},
                lambda b: 20 * GiB)
    p = make_plan(TINY, "seqlora", {}, cfg, memory=80 * GiB, train=Shape(1, 700, 30), evaluation=Shape(1, 670, 32),
                  tasks=8, given=set(), progress=lambda _: None)
    assert (p.batch_size, p.gradient_checkpointing) == (14, True)  # 1 x 700 tokens off, the recipe's 14 on


def test_plan_refuses_with_the_shortfall_and_flags_override_it(monkeypatch):
    fixed_peaks(monkeypatch, {False: lambda b: (30 + b) * GiB, True: lambda b: (25 + b) * GiB}, lambda b: 20 * GiB)
    with pytest.raises(MemoryError, match=r"needs 26.0 GiB .* 21.6 GiB to give .* short by 4.4 GiB"):
        make_plan(TINY, "seqlora", {}, CFG, memory=24 * GiB, train=Shape(1, 700, 30), evaluation=Shape(1, 670, 32),
                  tasks=8, given=set(), progress=lambda _: None)
    cfg = dataclasses.replace(CFG, batch_size=2, gradient_checkpointing=False, eval_batch_size=4)
    p = make_plan(TINY, "seqlora", {}, cfg, memory=24 * GiB, train=Shape(1, 700, 30), evaluation=Shape(1, 670, 32),
                  tasks=8, given={"batch_size", "gradient_checkpointing", "eval_batch_size"}, progress=lambda _: None)
    assert (p.batch_size, p.gradient_checkpointing, p.eval_batch_size) == (2, False, 4)
    # the flags' global batch (2 x the recipe's 2 accumulation steps) kept; a warning, not a refusal
    assert p.grad_accum == 2 and "over the" in p.over[0]


def test_real_data_run_follows_prints_and_records_its_plan(tmp_path, capsys):
    import run
    from test_run import coin_run, load

    data, images, args = coin_run(tmp_path)
    args = [a for a in args if a != "--quiet"]
    out = tmp_path / "out"
    assert run.main([*args, "--out", str(out), "--device-memory", "2", "--task-order", "ScienceQA,TextVQA"]) == 0
    err = capsys.readouterr().err
    r = load(out)
    p = r["plan"]
    assert "memory plan: micro-batch" in err and p["memory"] == 2 * GiB and p["budget"] == int(0.9 * 2 * GiB)
    assert p["batch_size"] * p["grad_accum"] == 14 * 64  # CoIN's global batch, kept
    assert r["execution"]["batch_size"] == p["batch_size"] and r["execution"]["eval_batch_size"] == p["eval_batch_size"]
    assert p["train_peak"] <= p["budget"] and p["eval_peak"] <= p["budget"]
    assert r["config"]["config"]["global_batch"] == 14 * 64 and "batch_size" not in r["config"]["config"]
    # too little memory for anything: refused before the model loads, naming the shortfall
    assert run.main([*args, "--out", str(tmp_path / "no"), "--device-memory", "0.0001"]) == 1
    assert "short by" in capsys.readouterr().err and not (tmp_path / "no" / "results.json").exists()
    json.dumps(p)  # stored as plain JSON
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("config", ["llava", "qwen2_vl"])
def test_the_plans_chord_over_the_candidate_batches_never_under_predicts(config):
    """peak_model from the smallest and largest candidate micro-batch: exact at both ends, on or above the
    full-depth prediction between them (the peak is a maximum of affine functions, convex in the batch)."""
    c = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, num_hidden_layers=5)) if config == "llava" \
        else QWEN.with_layers(5, 3)
    cfg = dataclasses.replace(CFG, gradient_checkpointing=True)
    hp = {"r": 8, "lora_alpha": 16}
    shape = Shape(1, 40, 5, image=12 if config == "qwen2_vl" else None)
    model = peak_model(c, "seqlora", hp, cfg, shape, tasks=2, evaluation=False, batches=(1, 6))
    for batch in (1, 3, 6):
        want = predict_bytes(c, "seqlora", hp, cfg, dataclasses.replace(shape, batch=batch), tasks=2)["peak"]
        assert model(batch) >= want - 256 * batch, (batch, model(batch), want)
        if batch in (1, 6):
            assert abs(model(batch) - want) <= 256 * batch, (batch, model(batch), want)
