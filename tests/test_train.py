"""The step loop and evaluation: token-weighted gradient accumulation against one full batch,
the learning-rate schedule by hand, and how `predict` groups a batch by task (oracle identity
or the selector's choice)."""

import math

import pytest
import torch
from PIL import Image
from test_adapters import randomise, tiny_llava
from tokenizers import Tokenizer, models, pre_tokenizers

from minimcit import train
from minimcit.methods import make_method
from minimcit.data import Collator, Sample
from minimcit.processing import LlavaPrompt, TextTokenizer
from minimcit.metrics import tasks_answered_per_row, tasks_answered_per_stage
from minimcit.train import TrainConfig, lr_factor, predict, train_stage

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "what", "colour", "shape", "?", "ASSISTANT", ":", "red", "blue", "green",
         "big", "small", "circle"]


@pytest.fixture
def collator(tmp_path):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.save(str(tmp_path / "tokenizer.json"))
    return Collator(TextTokenizer(tmp_path), LlavaPrompt(num_image_tokens=4, image_token_index=63, image_size=28))


def samples(n=4):
    """Answers of 1, 2, 3 and 4 words: micro-batches with unequal answer-token counts."""
    answers = ["red", "big red", "big red circle", "small blue green circle"]
    colours = ["red", "blue", "green", "white"]
    return [Sample("t", "what colour ?" if i % 2 else "what shape ?", answers[i % 4],
                   image=Image.new("RGB", (28, 28), colours[i % 4]), id=str(i)) for i in range(n)]


def lora_model(seed=0):
    model = tiny_llava(seed)
    method = make_method("seqlora", model, r=4, lora_alpha=8, verbose=False)
    method.start_task(0)
    randomise(method.trainable_parameters(), seed=seed, std=0.1)  # non-zero B: gradients reach A too
    return model, method


def grads_seen_by_clipping(monkeypatch):
    """The gradients of each step as the loop hands them to clipping (before the update)."""
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        seen.append([p.grad.clone() for p in params])
        return real(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return seen


def test_two_micro_batches_equal_one_batch_of_both_token_weighted(collator, monkeypatch):
    data = samples(4)
    # The reference: one batch of all four, loss = summed answer-token NLL / number of answer tokens.
    model, method = lora_model()
    b = collator(data)
    loss_sum, n = model.loss(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
    (loss_sum / n).backward()
    want = [p.grad.clone() for p in method.trainable_parameters()]

    seen = grads_seen_by_clipping(monkeypatch)
    model, method = lora_model()
    cfg = TrainConfig(epochs=1, batch_size=2, grad_accum=2, lr=1e-3, max_grad_norm=1e9)
    train_stage(model, method.parameter_groups(), data, collator, cfg, stage=1, label="t", quiet=True)
    assert len(seen) == 1  # four samples, 2 x 2 per step: one step
    for got, ref in zip(seen[0], want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)

    # The test can tell: the mean of the two micro-batches' own means weights tokens unequally.
    order = torch.randperm(4, generator=torch.Generator().manual_seed(cfg.seed * 1000 + 1)).tolist()
    model, method = lora_model()
    for half in (order[:2], order[2:]):
        mb = collator([data[i] for i in half])
        s, k = model.loss(mb["input_ids"], mb["pixel_values"], mb["attention_mask"], mb["labels"])
        (s / k / 2).backward()
    naive = [p.grad for p in method.trainable_parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(naive, want)) > 1e-4


def test_lr_schedule_by_hand():
    # total 10 steps, warm-up 2: linear up to the full rate, then cosine to zero over 8 steps
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2) == 1.0
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)
    assert lr_factor(9, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


@pytest.mark.parametrize("warmup_ratio,want", [(0.0, [1.0, 1.0, 0.75, 0.25]), (0.5, [0.5, 1.0, 1.0, 0.5])])
def test_the_loop_applies_the_schedule(warmup_ratio, want, collator, monkeypatch):
    """The learning rate of each optimiser step, read from the optimiser: warm-up share 0 means
    no warm-up (the first step at the full rate), not the recipe's default."""
    lrs = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    model, method = lora_model()
    cfg = TrainConfig(epochs=4, batch_size=4, lr=0.1, warmup_ratio=warmup_ratio)
    train_stage(model, method.parameter_groups(), samples(4), collator, cfg, stage=1, label="t", quiet=True)
    # 4 steps; warm-up int(ratio * 4) steps, at least 1; cosine from the end of warm-up
    assert lrs == pytest.approx([0.1 * f for f in want])


def test_predict_groups_a_batch_by_the_task_each_sample_is_sent_to(collator, monkeypatch):
    """Oracle: every sample uses its task's parameters (an unseen task the newest). Selector:
    each sample uses the task the selector picked, and a hit is a pick equal to the true task.
    Either way a sample's answer equals generating it alone with those parameters."""
    model = tiny_llava()
    method = make_method("dirlora", model, r=4, lora_alpha=8, use_selector=True, verbose=False)
    for t in range(2):
        method.start_task(t)
    randomise(method.adapter_parameters(), seed=3, std=0.5)  # two different, non-zero LoRAs
    data = samples(4)
    cfg = TrainConfig(eval_batch_size=4, max_new_tokens=3)

    def alone(t):
        return [predict(model, [s], collator, cfg, method=method, trained=2, true_task=t)[0][0] for s in data]

    answers = {t: alone(t) for t in (0, 1)}
    assert answers[0] != answers[1]  # the two tasks' LoRAs answer differently: the grouping is visible

    preds, hits = predict(model, data, collator, cfg, method=method, trained=2, true_task=1)
    assert preds == answers[1] and hits is None
    preds, _ = predict(model, data, collator, cfg, method=method, trained=1, true_task=1)  # task 1 unseen
    assert preds == answers[0]

    picks = torch.tensor([1, 0, 0, 1])
    monkeypatch.setattr(method, "select_tasks", lambda batch: picks[:len(batch["input_ids"])])
    preds, hits = predict(model, data, collator, cfg, method=method, trained=2, identity="selector", true_task=0)
    assert preds == [answers[t][i] for i, t in enumerate(picks.tolist())]
    assert hits == [False, True, True, False]


def test_train_projector_is_refused_where_the_method_adapts_the_projector():
    model = tiny_llava()
    method = make_method("lilora", model, r=4, lora_alpha=8, verbose=False)
    with pytest.raises(ValueError, match="already adapts the projector"):
        train.trained_projector(model, method, TrainConfig(train_projector=True))
    model = tiny_llava()
    method = make_method("seqlora", model, r=4, lora_alpha=8, verbose=False)
    params = train.trained_projector(model, method, TrainConfig(train_projector=True))
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in model.language_model.parameters())


def test_a_base_left_trainable_is_refused_before_a_step_and_wrapping_freezes_only_w0(collator):
    model = tiny_llava().requires_grad_(True)  # the caller forgot model.requires_grad_(False)
    method = make_method("seqlora", model, r=4, lora_alpha=8, verbose=False)
    method.start_task(0)
    q = model.language_model.layers[0].self_attn.q_proj
    assert not q.weight.requires_grad and model.lm_head.weight.requires_grad  # the layer froze its own W0
    before = [p.detach().clone() for p in method.trainable_parameters()]
    with pytest.raises(ValueError, match=r"receive gradients but are not trained, e.g. 'vision_tower\."):
        train_stage(model, method.parameter_groups(), samples(4), collator, TrainConfig(batch_size=2), stage=1,
                    label="t", method=method, quiet=True)
    assert all(torch.equal(a, b) for a, b in zip(before, method.trainable_parameters()))  # no step was taken


@pytest.mark.parametrize("name", ["seqlora", "dirlora", "joint", "moelora", "branchlora", "lilora"])
def test_bf16_on_cpu_one_step_and_one_generation(name, collator):
    """The path a GPU run takes, on CPU: a bf16 base under bf16 autocast, fp32 adapters and AdamW
    state; the step moves the adapters and leaves the base alone, and generation runs."""
    model = tiny_llava().to(torch.bfloat16)
    hp = dict(num_branches=4) if name == "branchlora" else {}
    method = make_method(name, model, r=8, lora_alpha=16, verbose=False, **hp)
    method.start_task(0)
    randomise(method.trainable_parameters(), seed=1, std=0.05)
    assert all(p.dtype == torch.float32 for p in method.adapter_parameters())
    base = {k: v.clone() for k, v in model.state_dict().items() if v.dtype == torch.bfloat16}
    before = [p.detach().clone() for p in method.trainable_parameters()]
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-2)
    projector = train.trained_projector(model, method, TrainConfig(train_projector=name != "lilora"))
    curve = train_stage(model, method.parameter_groups(), samples(4), collator, cfg, stage=1, label=name,
                        method=method, quiet=True, projector=projector)
    assert math.isfinite(curve[-1][1])
    assert any(not torch.equal(a, b) for a, b in zip(before, method.trainable_parameters()))
    assert all(p.dtype == torch.float32 for p in method.trainable_parameters() + projector)
    for k, v in model.state_dict().items():
        if k in base and not k.startswith("multi_modal_projector"):
            assert torch.equal(v, base[k]), k  # the frozen base did not move
    preds, _ = predict(model, samples(2), collator, TrainConfig(eval_batch_size=2, max_new_tokens=3), method=method,
                       trained=1)
    assert len(preds) == 2 and all(isinstance(p, str) for p in preds)


def test_the_same_batches_whatever_the_worker_count(collator):
    """Images decoded in DataLoader workers: the batches are fixed by the seed, so 0 and 2 workers
    train to bit-identical adapters."""
    data = samples(8)
    final = []
    for workers in (0, 2):
        model, method = lora_model()
        cfg = TrainConfig(epochs=2, batch_size=2, grad_accum=2, lr=1e-2, num_workers=workers)
        train_stage(model, method.parameter_groups(), data, collator, cfg, stage=1, label="t", quiet=True)
        final.append([p.detach().clone() for p in method.trainable_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*final))


def test_group_by_modality_length_by_hand():
    img = Image.new("RGB", (8, 8))
    # 6 with an image (lengths 1..6 characters of question), 3 text-only (lengths 7..9)
    data = [Sample("t", "q" * n, "", image=img) for n in range(1, 7)] + [Sample("t", "q" * n, "") for n in (7, 8, 9)]
    perm = [8, 0, 5, 2, 7, 1, 3, 6, 4]
    order = train.modality_length_order(perm, data, per_step=2, g=torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(9))  # every sample once
    steps = [order[k:k + 2] for k in range(0, 8, 2)]
    # image samples in perm order 0,5,2,1,3,4 -> steps [0,5],[2,1],[3,4] sorted longest first: [5,0],[2,1],[4,3];
    # text-only 8,7,6 -> [8,7] full, [6] left over; the leftovers join at the end.
    assert sorted(map(tuple, steps)) == sorted([(5, 0), (2, 1), (4, 3), (8, 7)])
    assert order[-1] == 6
    for s in steps:  # one modality per step
        assert len({data[i].image is None for i in s}) == 1


def test_evaluated_tasks_by_hand():
    """After stage k the tasks trained so far and the next are answered (FWT reads a[k][k+1]);
    the base answers every task, and a joint stage every task it trained."""
    assert tasks_answered_per_row([[0], [1], [2], [3]], 4) == [4, 2, 3, 4, 4]
    assert tasks_answered_per_row([[0, 1, 2, 3]], 4) == [4, 4, 4, 4, 4]  # one row per task the joint stage trained
    assert tasks_answered_per_stage([[0], [1], [2], [3]], 4) == [4, 2, 3, 4, 4]  # per stage, the base first
    assert tasks_answered_per_stage([[0, 1, 2, 3]], 4) == [4, 4]
    assert tasks_answered_per_stage([[0, 1], [2], [3]], 4) == [4, 3, 4, 4]  # a stage of two tasks, then one at a time
    assert tasks_answered_per_row([[0, 1], [2], [3]], 4) == [4, 3, 3, 4, 4]




def test_keep_freed_memory_reuses_freed_blocks_instead_of_faulting_them_in():
    """After keep_freed_memory, a forward-like chain of 4-14 MB activations (each made from the
    last, which is then freed) reuses the heap without page faults. The control maps every block
    of 128 KiB or more on its own (glibc's mmap threshold fixed at its default), as glibc does
    before it adapts: each block faults its pages in again. (A control that trims the heap at every
    free, as the first version's wrapped 1 << 40 did, faulted in most runs but not all: a live block
    at the heap's top stops the trim.) Fresh processes: mallopt's settings are process-wide."""
    import subprocess
    import sys
    code = """
import ctypes, resource, sys, torch
from minimcit.train import keep_freed_memory
keep_freed_memory()
if sys.argv[1] == "mmap every block":
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD, fixed: no longer raised adaptively
w = torch.randn(512, 512) / 23
for k in range(8):
    if k == 4:  # the first passes grow the heap
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for n in (4200, 6900, 2100, 5200):
        h = torch.randn(n, 512)
        for _ in range(6):
            h = torch.nn.functional.silu(h @ w) + h
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("kept", "mmap every block")}
    assert faults["mmap every block"] > 20_000, faults
    assert faults["kept"] < 300, faults


def test_selector_keys_train_apart_from_the_adapters(collator, monkeypatch):
    """SPEC §2's Decision: the selector's keys are their own AdamW group, without weight decay
    (even when the adapters have some), and outside the gradient-norm clip, so their large
    first-steps gradient does not shrink the adapters' step. The clip sees every adapter tensor
    and no key; the loss curve holds L_task and lambda L_align apart."""
    model = tiny_llava()
    method = make_method("branchlora", model, r=8, lora_alpha=16, num_branches=4, verbose=False)
    method.start_task(0)
    keys = {id(p) for p in method.selector.parameters() if p.requires_grad}
    groups = method.parameter_groups()
    assert [g["clip"] for g in groups] == [True, False] and {id(p) for p in groups[1]["params"]} == keys
    clipped, built = [], []
    real_clip, real_adamw = torch.nn.utils.clip_grad_norm_, torch.optim.AdamW
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, m: clipped.append({id(p) for p in ps})
                        or real_clip(ps, m))
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: built.append(real_adamw(*a, **kw)) or built[-1])
    cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-2, weight_decay=0.1)
    curve = train_stage(model, groups, samples(4), collator, cfg, stage=1, label="t", method=method, quiet=True)
    adapters = {id(p) for p in method.trainable_parameters()} - keys
    assert clipped and all(c == adapters for c in clipped)
    assert [g["weight_decay"] for g in built[0].param_groups] == [0.1, 0.0]
    assert all(len(point) == 3 and point[1] > 0 and point[2] > 0 for point in curve)  # L_task, lambda L_align


@pytest.mark.parametrize("name", ["dirlora", "lilora"])
def test_the_selector_leaves_the_adapters_training_as_under_oracle_identity(name, collator):
    """Task identity matters at inference only: trained with the selector (its keys in their own
    group, outside the clip) the adapters come out bit-identical to a run without it. Before the
    keys left the clip, their large gradient norm scaled the adapters' gradients down."""
    from minimcit.runfolder import seeded_start_task

    trained = []
    for use_selector in (False, True):
        model = tiny_llava()
        method = make_method(name, model, r=4, lora_alpha=8, verbose=False, use_selector=use_selector)
        cfg = TrainConfig(epochs=2, batch_size=2, lr=1e-2, max_grad_norm=0.05)  # the clip binds
        for k in range(2):
            seeded_start_task(method, k, cfg)
            train_stage(model, method.parameter_groups(), samples(4), collator, cfg, stage=k + 1, label="t",
                        method=method, task=k, quiet=True)
            method.end_task(k)
        trained.append({n: t for n, t in method.adapter_tensors().items() if not n.startswith("selector.")})
    assert trained[0].keys() == trained[1].keys()
    assert all(torch.equal(trained[0][n], trained[1][n]) for n in trained[0])
