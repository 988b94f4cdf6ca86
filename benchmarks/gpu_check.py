"""The one prepared script for a lent GPU (at most 8 minutes on one H100/H200): one JSON file and
a printed table.

    python benchmarks/gpu_check.py --out gpu_check.json            # on the GPU, LLaVA-1.5-7B shape
    python benchmarks/gpu_check.py --tiny --out check.json         # CPU, tiny shape: what CI runs
    python benchmarks/gpu_check.py --backbone qwen2_vl --out qwen.json   # Qwen2-VL-2B shape (--tiny too)

1. The SDPA kernel each attention call takes (vision tower, training step, prefill, decode), as
   torch._fused_sdp_choice picks it for that call's tensors.
2. For each method, a training step at the 7B (or Qwen2-VL-2B) shape with random weights, at the micro-batch and
   checkpointing its memory plan (minimcit/plan.py) chooses for this device: time, peak memory
   against the plan's prediction, tokens/s and MFU; and transformers + peft LoRA on the same batch.
3. One evaluation batch at the plan's evaluation batch size, timed.
4. A two-task `run.py` run end to end on a 7B-shaped random checkpoint and fixture data.
MFU counts the FLOPs of the step without recomputation (FlopCounterMode on the step itself).
"""

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from benchmarks.bench_7b import PROMPT, QWEN_PROMPT, QWEN_TRAIN, TRAIN, recipe  # noqa: E402
from benchmarks.param_table import LLAVA_7B, QWEN2_VL_2B  # noqa: E402
from minimcit.methods import METHODS  # noqa: E402
from minimcit.model import LlavaConfig, TextConfig, VisionConfig  # noqa: E402
from minimcit.plan import GiB, Shape, _train_step, build, device_memory, make_plan, synthetic_batch  # noqa: E402
from minimcit.qwen2_vl import ImagePatches, Qwen2VLConfig, save_qwen2_vl  # noqa: E402
from minimcit.qwen2_vl import VisionConfig as QwenVisionConfig  # noqa: E402
from minimcit.train import autocast  # noqa: E402

TINY = LlavaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=56, patch_size=14),
    text=TextConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2), image_token_index=119)
TINY_QWEN = Qwen2VLConfig(
    vision=QwenVisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2),
    text=TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, qkv_bias=True, tie_word_embeddings=True, bos_token_id=None, eos_token_id=2),
    mrope_section=(2, 3, 3), image_token_index=120, vision_start_token_id=121, vision_end_token_id=122)
# backbone -> (shape, tiny shape, (training sample, evaluation prompt), and the tiny shape's)
SHAPES = {"llava": (LLAVA_7B, TINY, (TRAIN, PROMPT), (TRAIN, PROMPT)),
          "qwen2_vl": (QWEN2_VL_2B, TINY_QWEN, (QWEN_TRAIN, QWEN_PROMPT),
                       (Shape(1, 140, 30, 16), Shape(1, 110, 32, 16)))}
BACKENDS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def on_device(c, method, hp, cfg, device):
    """The run's model (bf16, initialised as nn.Linear does, on the device itself) and method, the
    trainable tensors and AdamW: plan.build, the plan's own construction, on `device`."""
    with torch.device(device):
        return build(c, method, hp, cfg, 1, torch.bfloat16)


def sdpa_kernels(c, device, shapes) -> dict:
    """Which kernel SDPA picks at each call site of one training step and one generation."""
    seen, original = {}, F.scaled_dot_product_attention
    where = ["vision"]

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        site = where[0] if where[0] != "generate" else ("prefill" if q.shape[2] > 1 else "decode")
        if attn_mask is None and not is_causal:  # only the vision tower attends without a mask or causality
            site = "vision"
        choice = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        seen.setdefault(site, set()).add(BACKENDS.get(int(choice), str(choice)))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)

    cfg, hp = recipe("seqlora")
    model, m, params, opt = on_device(c, "seqlora", hp, cfg, device)
    F.scaled_dot_product_attention = spy
    try:
        where[0] = "training"
        model.train()
        _train_step(model, m, params, opt, to(synthetic_batch(c, dataclasses.replace(shapes[0], batch=2)), device), cfg,
                    0)
        where[0] = "generate"
        model.eval()
        b = to(synthetic_batch(c, dataclasses.replace(shapes[1], batch=2), prompt_only=True), device)
        b["attention_mask"][0, :3] = 0  # left padding, as evaluation batches have
        with autocast(device, model):
            model.generate(b["input_ids"], b["pixel_values"], b["attention_mask"], max_new_tokens=2, eos_token_id=None)
    finally:
        F.scaled_dot_product_attention = original
    return {k: sorted(v) for k, v in seen.items()}


def to(b, device):
    return {k: None if v is None else v.to(device) for k, v in b.items()}


def one_sample(b: dict) -> dict:
    """The first sample of a synthetic batch (its first image: one per sample)."""
    def first(v):
        if isinstance(v, ImagePatches):
            t, h, w = v.grid[0]
            return ImagePatches(v.patches[:t * h * w], v.grid[:1])
        return None if v is None else v[:1]
    return {k: first(v) for k, v in b.items()}


def step_row(c, method, device, memory, reps, peak_tflops, shapes):
    cfg, hp = recipe(method)
    plan = make_plan(c, method, hp, cfg, memory=memory, train=shapes[0], evaluation=shapes[1], tasks=1,
                     given={"eval_batch_size"}, dtype=torch.bfloat16, progress=lambda _: None)
    cfg = dataclasses.replace(cfg, gradient_checkpointing=plan.gradient_checkpointing)
    model, m, params, opt = on_device(c, method, hp, cfg, device)
    model.train()
    b = to(synthetic_batch(c, dataclasses.replace(shapes[0], batch=plan.batch_size)), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    secs = timed(lambda: _train_step(model, m, params, opt, b, cfg, 0), device, reps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    flops = FlopCounterMode(display=False)  # one sample without recomputation, times the micro-batch
    with flops:
        _train_step(model, m, params, opt, one_sample(b),
                    dataclasses.replace(cfg, gradient_checkpointing=False), 0)
    tokens = b["input_ids"].numel()
    row = {"method": method, "micro_batch": plan.batch_size, "checkpointing": plan.gradient_checkpointing,
           "seconds": secs, "peak_gib": None if peak is None else peak / GiB, "predicted_gib": plan.train_peak / GiB,
           "tokens_per_s": tokens / secs,
           "mfu": flops.get_total_flops() * plan.batch_size / secs / (peak_tflops * 1e12)}
    return row, b  # the model goes with this frame: the next method's is built after


def hf_twin(c, device):
    """transformers' model of shape c in bf16 on device, the path to its projector after peft wraps it, and the
    step's inputs from one of our batches."""
    if isinstance(c, Qwen2VLConfig):
        from transformers import Qwen2VLConfig as HFQwen2VLConfig
        from transformers import Qwen2VLForConditionalGeneration

        with torch.device(device):
            hf = Qwen2VLForConditionalGeneration(HFQwen2VLConfig(**c.to_dict())).to(torch.bfloat16)

        def inputs(b):
            px = b["pixel_values"]
            return dict(input_ids=b["input_ids"], pixel_values=px.patches.bfloat16(),
                        image_grid_thw=px.grid_thw.to(device), mm_token_type_ids=(b["input_ids"] == c.image_token_index
                                                                                  ).int(),
                        attention_mask=b["attention_mask"], labels=b["labels"])
        return hf, "base_model.model.model.visual.merger", inputs

    from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration
    from transformers import LlavaConfig as HFLlavaConfig

    v, t = c.vision, c.text
    cfg = HFLlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                       num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                                       image_size=v.image_size, patch_size=v.patch_size),
        text_config=LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                                num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps),
        image_token_index=c.image_token_index)
    with torch.device(device):
        hf = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)

    def inputs(b):
        return dict(input_ids=b["input_ids"], pixel_values=b["pixel_values"].bfloat16(),
                    attention_mask=b["attention_mask"], labels=b["labels"])
    return hf, "base_model.model.model.multi_modal_projector", inputs


def peft_row(c, b, device, reps, peak_tflops):
    """transformers' model with peft LoRA (r=128 on the LLM's linears, the projector trained), same batch."""
    from peft import LoraConfig, get_peft_model

    hf, projector, inputs = hf_twin(c, device)
    hf.requires_grad_(False)
    target = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    hf = get_peft_model(hf, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05, target_modules=target))
    proj = list(hf.get_submodule(projector).parameters())
    for p in proj:
        p.data = p.data.float()
        p.requires_grad_(True)
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=device.type == "cuda")
    hf.train()

    def one():
        with torch.autocast(device.type, torch.bfloat16):
            loss = hf(**inputs(b)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    secs = timed(one, device, reps)
    flops = FlopCounterMode(display=False)
    with flops:
        one()
    peak = torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else None
    return {"method": "transformers+peft lora", "micro_batch": len(b["input_ids"]), "checkpointing": False,
            "seconds": secs, "peak_gib": peak, "predicted_gib": None, "tokens_per_s": b["input_ids"].numel() / secs,
            "mfu": flops.get_total_flops() / secs / (peak_tflops * 1e12)}


def eval_row(c, device, memory, shapes, method="branchlora"):
    cfg, hp = recipe(method)
    plan = make_plan(c, method, hp, cfg, memory=memory, train=shapes[0], evaluation=shapes[1], tasks=8,
                     given={"batch_size", "gradient_checkpointing"}, progress=lambda _: None)
    model, m, _, _ = on_device(c, method, hp, cfg, device)
    model.eval()
    b = to(synthetic_batch(c, dataclasses.replace(shapes[1], batch=plan.eval_batch_size), prompt_only=True), device)

    def gen():
        with torch.no_grad(), autocast(device, model):
            model.generate(b["input_ids"], b["pixel_values"], b["attention_mask"], max_new_tokens=cfg.max_new_tokens,
                           eos_token_id=None)
    secs = timed(gen, device, 1)
    return {"method": method, "eval_batch": plan.eval_batch_size, "seconds": secs, "new_tokens": cfg.max_new_tokens,
            "items_per_s": plan.eval_batch_size / secs, "predicted_gib": plan.eval_peak / GiB}


def end_to_end(c, device, folder: Path) -> dict:
    """run.py on a random checkpoint of shape c and CoIN fixture data, two tasks, as a user runs it."""
    from minimcit.checkpoint import save_llava
    from test_data import write_fixture
    from test_qwen2_vl import qwen_tokenizer
    from test_run import word_tokenizer

    data, images = write_fixture(folder / "coin", n=4)
    with torch.device("meta"):
        model = c.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = model.to(torch.bfloat16)
    if isinstance(c, Qwen2VLConfig):
        save_qwen2_vl(model, folder / "ckpt")
        qwen_tokenizer(folder / "ckpt", image=c.image_token_index, start=c.vision_start_token_id,
                       end=c.vision_end_token_id)
    else:
        save_llava(model, folder / "ckpt")
        word_tokenizer(folder / "ckpt", 120)
    del model
    out = folder / "run"
    cmd = [sys.executable, str(ROOT / "run.py"), "--method", "branchlora", "--tasks", "coin", "--data-root", str(data),
           "--image-root", str(images), "--model", str(folder / "ckpt"), "--task-order", "ScienceQA,TextVQA",
           "--device", str(device), "--out", str(out), "--max-new-tokens", "4", "--quiet"]
    if device.type != "cuda":
        cmd += ["--device-memory", "4"]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    results = json.loads((out / "results.json").read_text()) if done.returncode == 0 else None
    return {"returncode": done.returncode, "seconds": time.time() - t0, "stderr_tail": done.stderr[-1500:],
            "complete": bool(results and results["complete"]), "plan": results and results.get("plan")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU: checks this script, measures nothing")
    p.add_argument("--backbone", choices=sorted(SHAPES), default="llava")
    p.add_argument("--methods", nargs="+", default=sorted(METHODS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100/H200 SXM: 989)")
    args = p.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    big, tiny, big_shapes, tiny_shapes = SHAPES[args.backbone]
    c, shapes = (tiny, tiny_shapes) if args.tiny else (big, big_shapes)
    memory = 4 * GiB if device.type == "cpu" else device_memory(device)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": "tiny" if args.tiny
              else {"llava": "llava-1.5-7b", "qwen2_vl": "qwen2-vl-2b"}[args.backbone], "backbone": args.backbone,
              "memory_gib": memory / GiB, "torch": torch.__version__}
    t0 = time.time()
    report["sdpa"] = sdpa_kernels(c, device, shapes)
    rows, batch = [], None
    for method in args.methods:
        row, b = step_row(c, method, device, memory, args.reps, args.peak_tflops, shapes)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        batch = b if method == "seqlora" else batch
        print(f"{method}: {row['seconds']:.3f} s ({time.time() - t0:.0f} s in)", file=sys.stderr, flush=True)
    rows.append(peft_row(c, batch, device, args.reps, args.peak_tflops))
    report["steps"] = rows
    report["eval"] = eval_row(c, device, memory, shapes)
    with tempfile.TemporaryDirectory() as tmp:
        report["run"] = end_to_end(c, device, Path(tmp))
    report["seconds"] = time.time() - t0
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{report['device']}, {report['shape']}, {report['memory_gib']:.0f} GiB; SDPA kernels: {report['sdpa']}")
    print(f"{'step':24s} {'micro':>5s} {'ckpt':>4s} {'s':>7s} {'peak GiB':>8s} {'plan GiB':>8s} {'tok/s':>8s} {'MFU':>6s}")
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        plan = "-" if r["predicted_gib"] is None else f"{r['predicted_gib']:.1f}"
        print(f"{r['method']:24s} {r['micro_batch']:5d} {'on' if r['checkpointing'] else 'off':>4s} "
              f"{r['seconds']:7.3f} {peak:>8s} {plan:>8s} {r['tokens_per_s']:8.0f} {r['mfu']:6.1%}")
    e = report["eval"]
    print(f"evaluation batch {e['eval_batch']} x {e['new_tokens']} new tokens ({e['method']}): {e['seconds']:.2f} s, "
          f"{e['items_per_s']:.1f} items/s")
    r = report["run"]
    print(f"run.py, two tasks end to end: rc {r['returncode']}, complete {r['complete']}, {r['seconds']:.0f} s")
    print(f"total {report['seconds']:.0f} s; wrote {args.out}")
    return 0 if r["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
