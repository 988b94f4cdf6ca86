"""The continual run end to end: every method on MiniCoIN's smoke preset, kill and resume, CoIN
on a fixture with a tiny random checkpoint in each layout, and bad input through run.py."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import hf_llava, write_hf, write_hub, write_original
from test_data import write_fixture
from tokenizers import Tokenizer, models, pre_tokenizers

import run
from minimcit import runfolder, train
from minimcit.methods import make_method
from minimcit.minicoin import PRESETS
from minimcit.train import TrainConfig

SMOKE = ["--tasks", "minicvit", "--preset", "smoke", "--quiet"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def load(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("method", sorted(run.METHODS))
def test_every_method_runs_and_writes_valid_results(method, tmp_path, cache):
    out = tmp_path / method
    assert run.main(["--method", method, *SMOKE, "--out", str(out), "--cache", str(cache)]) == 0
    r = load(out)
    T = len(r["tasks"])
    assert r["method"] == method and r["tasks"] == ["sciqa", "textvqa", "caption", "imagenet", "gqa", "vqav2"]
    assert len(r["acc_matrix"]) == T + 1 and all(len(row) == T for row in r["acc_matrix"])
    assert len(r["format_matrix"]) == T + 1 and r["complete"]
    assert set(r["summary"]) >= {"AP", "MAP", "BWT", "ACC", "MFT", "FWT", "MIF"}
    assert r["protocol"] == "robust" and len(r["acc_matrix_official"]) == T + 1  # both protocols, always
    assert set(r["summary_official"]) >= {"AP", "BWT"}
    for k, row in enumerate(r["acc_matrix"]):  # the base on every task, then the tasks trained so far and the next
        shown = T if k == 0 or method == "joint" else min(T, k + 1)
        assert [v is not None for v in row] == [True] * shown + [False] * (T - shown)
    for k in range(len(r["stages"]) + 1):  # every stage's predictions (joint: one stage), one file per task answered
        shown = T if k == 0 or method == "joint" else min(T, k + 1)
        assert sorted(p.stem for p in (out / "predictions" / f"stage_{k}").iterdir()) == sorted(r["tasks"][:shown])
    assert r["params"]["trainable"] > 0 and r["params"]["total_added"] >= r["params"]["trainable"]
    assert all(0 <= v <= 100 for row in r["acc_matrix"] for v in row if v is not None)
    for name in ("results.txt", "acc_matrix.png", "task_curves.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 0
    assert len(r["loss_curves"]) == len(r["stages"]) and all(c and c[-1][1] > 0 for c in r["loss_curves"])
    if method == "branchlora":
        assert r["params"]["total_added"] > r["params"]["trainable"]  # routers of earlier tasks, frozen


@pytest.mark.parametrize("method", sorted(run.METHODS))
def test_every_method_learns_a_tiny_task(method, tmp_path, cache):
    """Trained on MiniCoIN's sciqa at the smoke preset (12 samples, 24 epochs: MoELoRA, whose
    router mixes experts evenly at first, needs that many), every method answers better than
    the base, which scores 0 there; a method that learned nothing would not. SMoLoRA trains 2 of
    its N experts per sequence, each weighted about 1/2 by its mix: it needs twice the epochs."""
    out = tmp_path / method
    epochs = "48" if method == "smolora" else "24"
    assert run.main(["--method", method, "--tasks", "minicoin", "--preset", "smoke", "--task-order", "sciqa,imagenet",
                     "--epochs", epochs, "--quiet", "--out", str(out), "--cache", str(cache)]) == 0
    a = load(out)["acc_matrix"]
    assert a[1][0] > a[0][0], f"{method}: sciqa {a[0][0]} before training, {a[1][0]} after"


@pytest.mark.parametrize("method,extra", [("branchlora", ["--task-identity", "selector"]), ("lilora", []),
                                          ("ewc", []), ("lwf", ["--dora"]), ("replay", []), ("smolora", [])])
def test_killed_run_resumes_to_the_same_results(method, extra, tmp_path, cache, monkeypatch, capsys):
    args = ["--method", method, *SMOKE, "--cache", str(cache), *extra]
    assert run.main([*args, "--out", str(tmp_path / "whole")]) == 0

    real = train.train_stage

    def dies_in_stage_3(*a, **kw):
        if kw["stage"] == 3:
            raise KeyboardInterrupt  # killed while training the third task
        return real(*a, **kw)

    monkeypatch.setattr(train, "train_stage", dies_in_stage_3)
    assert run.main([*args, "--out", str(tmp_path / "killed")]) == 130  # Ctrl-C: a message, not a traceback
    assert "continue with the same command and --resume" in capsys.readouterr().err
    assert len(load(tmp_path / "killed")["acc_matrix"]) == 3  # base + two finished tasks
    assert not (tmp_path / "killed" / "run.lock").exists()  # released on the way out
    monkeypatch.setattr(train, "train_stage", real)
    assert run.main([*args, "--out", str(tmp_path / "killed"), "--resume"]) == 0

    whole, resumed = load(tmp_path / "whole"), load(tmp_path / "killed")
    for r in (whole, resumed):
        r.pop("stage_seconds")  # wall-clock times, and the command (its --out), the things allowed to differ
        r.pop("argv")
    assert resumed == whole
    # Scores of a smoke-sized model are coarse; the trained adapters must match bit for bit too.
    last = f"checkpoints/after_stage_{len(whole['tasks'])}.pt"
    a, b = (torch.load(tmp_path / d / last, weights_only=True) for d in ("whole", "killed"))
    assert a["frozen"] == b["frozen"] and a["adapters"].keys() == b["adapters"].keys()
    assert all(torch.equal(a["adapters"][k], b["adapters"][k]) for k in a["adapters"])


# --------------------------------------------------------------------------- CoIN on a fixture


def word_tokenizer(folder, vocab_size):
    words = ["<unk>", "<s>", "</s>", "<pad>", "What", "is", "in", "picture", "?", "thing", "Answer", "the", "question",
             "using", "a", "single", "word", "or", "phrase", ".", "ASSISTANT", ":", "USER"] + [str(i) for i in range(10)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words[:vocab_size])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("layout", ["v5", "hub", "original"])
def test_coin_end_to_end_on_the_fixture(layout, tmp_path):
    """The fixture has CoIN's val/test files, TextVQA's ten answers, text-only ScienceQA items and a
    multi-turn conversation; the run scores both protocols, official first, and saves predictions."""
    data, images = write_fixture(tmp_path / "coin", n=3)
    ref = hf_llava("mha")
    if layout == "original":
        llm, clip, proj = write_original(ref, tmp_path / "orig", projector="bin")
        model_args = ["--model", str(llm), "--vision-tower", str(clip), "--projector", str(proj)]
        word_tokenizer(llm, 120)
    else:
        folder = (write_hf if layout == "v5" else write_hub)(ref, tmp_path / "ckpt")
        model_args = ["--model", str(folder)]
        word_tokenizer(folder, 120)
    out = tmp_path / "out"
    assert run.main(["--method", "lilora", "--tasks", "coin", "--data-root", str(data), "--image-root", str(images),
                     *model_args, "--out", str(out), "--max-new-tokens", "4", "--r", "8", "--lora-alpha", "16",
                     "--quiet"]) == 0
    r = load(out)
    assert r["tasks"] == ["ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCRVQA"]
    assert len(r["acc_matrix"]) == 9 and r["complete"] and r["protocol"] == "official"
    assert len(r["acc_matrix_robust"]) == 9 and r["summary"] is not None and r["summary_robust"] is not None
    assert r["scoring"]["TextVQA"]["test_file"].endswith("TextVQA/val.json")
    assert r["scoring"]["GQA"]["test_file"].endswith("GQA/test.json")
    assert r["config"]["config"]["lr"] == 2e-5 and r["config"]["hparams"]["dropout"] == 0.05  # LiLoRA's recipe
    records = [json.loads(x) for x in (out / "predictions" / "stage_8" / "TextVQA.jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[0]["gold"] == ["thing 0"] * 7 + ["stuff"] * 3
    assert {"id", "question", "prediction", "official", "robust", "format"} <= set(records[0])


def coin_run(tmp_path, *extra):
    data, images = write_fixture(tmp_path / "coin", n=2)
    folder = write_hf(hf_llava("mha"), tmp_path / "ckpt")
    word_tokenizer(folder, 120)
    return data, images, ["--method", "seqlora", "--tasks", "coin", "--data-root", str(data), "--image-root",
                          str(images), "--model", str(folder), "--r", "4", "--lora-alpha", "8", "--quiet",
                          "--max-new-tokens", "2", "--num-workers", "0", *extra]


def test_rescore_rebuilds_both_matrices_from_the_saved_predictions(tmp_path, cache, capsys):
    out = tmp_path / "smoke"
    assert run.main(["--method", "joint", *SMOKE, "--out", str(out), "--cache", str(cache)]) == 0
    want = load(out)
    spoiled = dict(want, acc_matrix=[[0.0]], acc_matrix_official=[], format_matrix=[], summary=None)
    (out / "results.json").write_text(json.dumps(spoiled))
    assert run.main(["--rescore", str(out)]) == 0
    assert load(out) == want and "rescored" in capsys.readouterr().out
    # A scorer's verdict changed by hand in a saved file moves the matrix: the numbers come from the files.
    path = out / "predictions" / "stage_1" / "sciqa.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()]
    for r in records:
        r["prediction"] = r["gold"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run.main(["--rescore", str(out)]) == 0
    assert all(row[0] == 100.0 for row in load(out)["acc_matrix"][1:])  # joint: stage 1 stands for every row


def test_without_textvqa_answers_the_official_score_is_unavailable(tmp_path):
    data, images, args = coin_run(tmp_path)
    (images / "TextVQA" / "TextVQA_0.5.1_val.json").unlink()
    out = tmp_path / "out"
    assert run.main([*args, "--out", str(out)]) == 0
    r = load(out)
    assert all(row[1] is None for row in r["acc_matrix"])  # official TextVQA: n/a, not another rule
    assert all(row[1] is not None for row in r["acc_matrix_robust"])
    assert r["summary"] is None and r["summary_robust"] is not None
    assert "n/a" in (out / "results.txt").read_text()


def test_check_data_finds_every_planted_fault(tmp_path, capsys):
    data, images = write_fixture(tmp_path / "coin", n=3)
    args = ["--tasks", "coin", "--check-data", "--data-root", str(data), "--image-root", str(images)]
    assert run.main(args) == 0
    out = capsys.readouterr().out
    assert "no faults found" in out
    # three test items a task: the base row answers 8 tasks, stages 1-7 two to eight, stage 8 eight
    assert "test sets 3 3 3 3 3 3 3 3: the protocol answers 153 items over 51 task evaluations" in out
    root = data / "Instructions_Original"

    def edit(file, fn):
        items = json.loads((root / file).read_text())
        fn(items)
        (root / file).write_text(json.dumps(items))

    edit("ScienceQA/train.json", lambda items: items[0]["conversations"].reverse())  # roles swapped
    edit("GQA/test.json", lambda items: items[1].update(answer=""))  # empty answer
    edit("Grounding/test.json", lambda items: items[2].update(answer_bbox="n/a"))  # malformed box
    edit("VizWiz/val.json", lambda items: items[1].update(question_id=0))  # duplicate id
    (images / "ImageNet" / "1.jpg").unlink()  # missing image
    (images / "OCRVQA" / "0.jpg").write_bytes(b"not a jpeg")  # unreadable image
    (root / "VQAv2" / "train.json").write_text("[{oops")  # broken JSON
    assert run.main(args) == 1
    out = capsys.readouterr().out
    for needle in ["ScienceQA/train.json: item 0 field 'conversations' must alternate", "GQA/test.json: item 1 field "
                   "'answer' is empty", "Grounding/test.json: item 2 field 'answer_bbox'", "VizWiz/val.json: test id "
                   "'0' appears 2 times", "ImageNet/1.jpg is missing", "OCRVQA/0.jpg is unreadable",
                   "VQAv2/train.json: not valid JSON", "9 fault(s) found"]:  # both images serve train and test
        assert needle in out, needle


# --------------------------------------------------------------------------- bad input


def test_unknown_method_or_task_exits_with_usage(capsys):
    for argv in (["--method", "si", "--tasks", "minicoin"], ["--method", "lilora", "--tasks", "mnist"]):
        with pytest.raises(SystemExit) as e:
            run.main(argv)
        assert e.value.code == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


def test_an_option_of_another_method_is_refused(capsys):
    assert run.main(["--method", "branchlora", "--tasks", "minicoin", "--num-experts", "4"]) == 1
    assert "--num-experts does not apply to --method branchlora" in capsys.readouterr().err
    args = run.parse_args(["--method", "lilora", "--tasks", "minicoin", "--task-identity", "selector", "--r-task", "8"])
    assert run.method_hparams(args) == {"r": 32, "lora_alpha": 64, "r_task": 8, "use_selector": True}


TRAIN_FLAGS = [f.name for f in fields(TrainConfig) if f.name != "seed" and f.type not in ("bool", bool)]


@pytest.mark.parametrize("name", TRAIN_FLAGS)
def test_a_numeric_training_flag_reaches_train_config_zero_included(name):
    """0 means 0 (it once fell back to the recipe, since 0.0 == False); no flag means the recipe."""
    flag = "--" + name.replace("_", "-")
    for tasks, recipe in (("minicoin", PRESETS["default"].recipe), ("coin", run.paper_recipe("seqlora"))):
        for value in ("0", "3"):
            cfg = run.train_config(run.parse_args(["--method", "seqlora", "--tasks", tasks, flag, value]))
            assert getattr(cfg, name) == float(value), (tasks, value)
        cfg = run.train_config(run.parse_args(["--method", "seqlora", "--tasks", tasks]))
        assert getattr(cfg, name) == recipe.get(name, TrainConfig.__dataclass_fields__[name].default)


@pytest.mark.parametrize("method,flag,name", [
    ("seqlora", "--r", "r"), ("seqlora", "--lora-alpha", "lora_alpha"), ("moelora", "--num-experts", "num_experts"),
    ("branchlora", "--num-branches", "num_branches"), ("branchlora", "--top-k", "top_k"),
    ("lilora", "--r-task", "r_task"), ("lilora", "--reg-weight", "reg_weight"),
    ("replay", "--replay-share", "replay_share"), ("ewc", "--ewc-lambda", "ewc_lambda"),
    ("ewc", "--fisher-samples", "fisher_samples"), ("lwf", "--lwf-lambda", "lwf_lambda"),
    ("lwf", "--temperature", "temperature"), ("olora", "--olora-lambda1", "olora_lambda1"),
    ("olora", "--olora-lambda2", "olora_lambda2"), ("lilora", "--fixed-alpha", "fixed_alpha")])
def test_a_numeric_method_flag_reaches_the_method_zero_included(method, flag, name):
    for value in ("0", "2"):
        hp = run.method_hparams(run.parse_args(["--method", method, "--tasks", "minicoin", flag, value]))
        assert hp[name] == float(value)
    default = run.method_hparams(run.parse_args(["--method", method, "--tasks", "minicoin"]))
    assert default.get(name) == PRESETS["default"].adapter.get(name)


def test_reg_weight_zero_is_lilora_without_l_reg():
    """--reg-weight 0: L_reg adds nothing to the loss and is not even computed; at the default
    weight, on the second task, it is the sum of the layers' L_reg (LiLoRA Eq. 8, lambda = 1)."""
    from test_adapters import randomise, tiny_llava

    losses = {}
    for weight in ("0", "1"):
        hp = run.method_hparams(run.parse_args(["--method", "lilora", "--tasks", "minicoin", "--reg-weight", weight]))
        m = make_method("lilora", tiny_llava(), verbose=False, **hp)
        m.start_task(0)
        randomise(m.trainable_parameters())  # a trained first task
        m.start_task(1)
        randomise(m.trainable_parameters(), seed=1)  # and a step into the second: B0 moved, L_reg > 0
        if weight == "0":
            for layer in m.layers:
                layer.reg_loss = lambda: pytest.fail("L_reg computed at --reg-weight 0")
        losses[weight] = (m.step_loss(1), sum(layer.reg_loss() for layer in m.layers) if weight == "1" else None)
    assert losses["0"][0] is None
    got, want = losses["1"]
    assert float(want.detach()) > 0
    torch.testing.assert_close(got, want)


def test_missing_data_root_and_model(tmp_path, capsys):
    assert run.main(["--method", "lilora", "--tasks", "coin", "--out", str(tmp_path / "o")]) == 1
    assert "--tasks coin needs --data-root, --image-root, --model" in capsys.readouterr().err
    assert run.main(["--method", "lilora", "--tasks", "coin", "--data-root", str(tmp_path / "nowhere"),
                     "--image-root", str(tmp_path), "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "data root not found" in err and "nowhere" in err


def test_missing_images_stop_the_run_before_the_model_loads(tmp_path, capsys, monkeypatch):
    data, images, args = coin_run(tmp_path)
    (images / "OCRVQA" / "1.jpg").unlink()
    monkeypatch.setattr(run.Llava, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    assert run.main([*args, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "1 image(s) the run would read are missing" in err and "OCRVQA/1.jpg" in err


def test_corrupt_image_and_empty_task_are_named(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    (images / "TextVQA" / "1.jpg").write_bytes(b"garbage")
    assert run.main([*args, "--out", str(tmp_path / "o1")]) == 1
    assert "TextVQA/1.jpg" in capsys.readouterr().err
    (data / "Instructions_Original" / "GQA" / "train.json").write_text("[]")
    assert run.main([*args, "--out", str(tmp_path / "o2")]) == 1
    assert "GQA/train.json: no items" in capsys.readouterr().err


def test_nan_loss_stops_with_a_message_and_keeps_earlier_results(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    out = tmp_path / "out"
    assert run.main([*args, "--out", str(out), "--lr", "1e30"]) == 1
    err = capsys.readouterr().err
    assert "loss is nan" in err or "loss is inf" in err
    # Task 1 (two samples, one step) finishes before its huge update shows; task 2's first loss is
    # not finite. What was written before stays: valid JSON with the base and task-1 rows.
    r = load(out)
    assert len(r["acc_matrix"]) == 2 and not r["complete"]
    assert (out / "checkpoints" / "after_stage_1.pt").is_file()
    assert run.main([*args, "--out", str(out)]) == 1  # a fresh run refuses to overwrite it
    assert "pass --resume" in capsys.readouterr().err
    assert load(out) == r


# --------------------------------------------------------------------------- nothing silent, nothing lost


def digest(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_with_another_data_root_is_refused_naming_it(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    out = tmp_path / "out"
    assert run.main([*args, "--out", str(out)]) == 0
    before = digest(out)
    other = tmp_path / "other"
    shutil.copytree(data, other)
    args[args.index("--data-root") + 1] = str(other)
    assert run.main([*args, "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "--data-root was" in err and str(data.resolve()) in err and str(other.resolve()) in err
    _edit = json.loads((other / "Instructions_Original" / "GQA" / "test.json").read_text())
    args[args.index("--data-root") + 1] = str(data)  # same path, changed content
    (data / "Instructions_Original" / "GQA" / "test.json").write_text(json.dumps(_edit[:1]))
    assert run.main([*args, "--out", str(out), "--resume"]) == 1
    assert "GQA/test.json was" in capsys.readouterr().err
    assert digest(out) == before  # nothing written was touched


def test_one_run_per_folder(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen(["sleep", "30"])  # a live run holding the folder
    try:
        (out / "run.lock").write_text(str(other.pid))
        assert run.main([*args, "--out", str(out)]) == 1
        assert f"in use by another process (pid {other.pid}" in capsys.readouterr().err
        assert not (out / "results.json").exists()
    finally:
        other.kill()
        other.wait()
    assert run.main([*args, "--out", str(out)]) == 0  # the dead run's lock is taken over
    assert not (out / "run.lock").exists()


def test_written_files_honour_the_umask(tmp_path):
    data, images, args = coin_run(tmp_path)
    old = os.umask(0o022)
    try:
        assert run.main([*args, "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    for name in ("results.json", "results.txt", "acc_matrix.png", "checkpoints/after_stage_1.pt",
                 "predictions/stage_1/TextVQA.jsonl"):  # stage 1 answers ScienceQA and TextVQA
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("flags,message", [
    (["--max-per-task", "0"], "--max-per-task must be in [1, inf), got 0"),
    (["--max-per-task", "-1"], "--max-per-task must be in [1, inf), got -1"),
    (["--epochs", "0"], "--epochs must be in (0, inf), got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be in [1, inf)"),
    (["--r", "0"], "--r must be in [1, inf)"), (["--lr=-1e-4"], "--lr must be in (0, inf)"),
    (["--lr", "nan"], "--lr must be in (0, inf), got nan"), (["--lr", "inf"], "--lr must be in (0, inf), got inf"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1], got 1.5"),
    (["--weight-decay", "-0.1"], "--weight-decay must be in [0, inf)"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be in (0, inf)"),
    (["--num-workers", "-2"], "--num-workers must be in [0, inf)"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1"), (["--seed", "-3"], "--seed must be in [0, 4294967295]"),
    (["--lora-alpha", "0"], "--lora-alpha must be in (0, inf)"),
    (["--device-memory", "-8"], "--device-memory must be in (0, inf)"),
    (["--task-order", ","], "--task-order is empty"),
    (["--preset", "smoke"], "--preset sizes MiniCoIN and MiniCVIT; --tasks coin runs the paper's recipe"),
    (["--stage", "2"], "--stage picks the adapters --evaluate OUT evaluates"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    (["--device", "tpu9"], "--device 'tpu9' is not a device torch knows"),
])
def test_out_of_range_flags_are_refused(tmp_path, capsys, flags, message):
    data, images, args = coin_run(tmp_path)
    assert run.main([*args, *flags, "--out", str(tmp_path / "o")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method,flags,message", [
    ("branchlora", ["--num-branches", "0"], "--num-branches must be in [2, inf), got 0"),
    ("branchlora", ["--top-k", "9"], "--top-k must be between 1 and --num-branches (8), got 9"),
    ("branchlora", ["--r", "10"], "--r 10 must split evenly into --num-branches 8"),
    ("moelora", ["--lora-r", "10", "--num-experts", "3"], "--r 10 must split evenly into --num-experts 3"),
    ("lilora", ["--share-a-only", "--fixed-alpha", "0.5"], "--share-a-only has no basis B0, no fusion and no task factors"),
    ("lilora", ["--fixed-alpha", "2"], "--fixed-alpha must be in [0, 1], got 2"),
    ("seqlora", ["--max-per-task", "5"], "--max-per-task applies to real data"),
    ("olora", ["--dora"], "--dora does not apply to --method olora"),
    ("replay", ["--replay-share", "0"], "--replay-share must be in (0, 1], got 0"),
    ("ewc", ["--fisher-samples", "0"], "--fisher-samples must be in [1, inf)"),
    ("ewc", ["--ewc-lambda", "-1"], "--ewc-lambda must be in [0, inf)"),
    ("lwf", ["--temperature", "0"], "--temperature must be in (0, inf)"),
])
def test_method_flags_out_of_range_on_minicoin(tmp_path, capsys, method, flags, message):
    cache = tmp_path / "cache"  # empty: a refusal comes before stage 1 would build the base into it
    assert run.main(["--method", method, *SMOKE, *flags, "--out", str(tmp_path / "o"), "--cache", str(cache)]) == 1
    assert message in capsys.readouterr().err
    assert not cache.exists() and not (tmp_path / "o").exists()


def test_train_projector_with_lilora_is_refused(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    args[args.index("seqlora")] = "lilora"
    assert run.main([*args, "--train-projector", "--out", str(tmp_path / "o")]) == 1
    assert "already adapts the projector" in capsys.readouterr().err


def test_bad_files_are_named(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    out = tmp_path / "out"
    assert run.main([*args, "--out", str(out)]) == 0
    ckpt = out / "checkpoints" / "after_stage_8.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:300])  # a checkpoint cut short
    before = digest(out)
    assert run.main([*args, "--out", str(out), "--resume"]) == 1
    assert "after_stage_8.pt: cannot read this checkpoint" in capsys.readouterr().err
    assert digest(out) == before
    (out / "results.json").write_text('{"acc_matrix": [[1')  # truncated
    before = digest(out)
    for mode in (["--resume", *args, "--out", str(out)], ["--rescore", str(out)], ["--evaluate", str(out)]):
        assert run.main(mode) == 1
        err = capsys.readouterr().err
        assert f"{out / 'results.json'} cannot be read (" in err and "move it aside" in err, (mode, err)
    for text, says in (("", "cannot be read"), ("[1, 2]", "holds a JSON list, not a run's results"),
                       ('{"acc_matrix": []}', "lacks 'method', 'tasks', 'stages'")):  # empty, a list, foreign
        (out / "results.json").write_text(text)
        for mode in (["--resume", *args, "--out", str(out)], ["--rescore", str(out)], ["--evaluate", str(out)]):
            assert run.main(mode) == 1
            assert says in capsys.readouterr().err, (text, mode)
    (out / "results.json").write_text('{"acc_matrix": [[1')
    assert digest(out) == before  # nothing written before the failures changed
    folder = tmp_path / "ckpt"
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # a truncated download
    assert run.main([*args, "--out", str(tmp_path / "o2")]) == 1
    assert "model.safetensors: not a readable safetensors file" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert run.main([*args, "--out", str(blocker / "sub")]) == 1  # the output folder cannot be made
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    folder = tmp_path / "ckpt"
    words = [f"w{i}" for i in range(130)] + ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.save(str(folder / "tokenizer.json"))
    assert run.main([*args, "--out", str(tmp_path / "o")]) == 1
    assert "the tokenizer has 134 tokens but the model's embedding has 120 rows" in capsys.readouterr().err


# --------------------------------------------------------------------------- the commands researchers reach for


@pytest.mark.parametrize("method,extra", [("branchlora", ["--task-identity", "selector"]), ("joint", [])])
def test_evaluate_reproduces_the_last_row_and_touches_nothing(method, extra, tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert run.main(["--method", method, *SMOKE, "--out", str(out), "--cache", str(cache), *extra]) == 0
    before = digest(out)
    r = load(out)
    assert run.main(["--evaluate", str(out)]) == 0
    ev = json.loads((out / "evaluations" / f"stage_{len(r['stages'])}" / "evaluation.json").read_text())
    assert ev["row"] == r["acc_matrix"][-1] and ev["row_official"] == r["acc_matrix_official"][-1]
    assert ev["format_row"] == r["format_matrix"][-1] and ev["selector_accuracy"] == r["selector_accuracy"]
    assert run.main(["--evaluate", str(out), "--stage", "0"]) == 0  # the base model again
    ev0 = json.loads((out / "evaluations" / "stage_0" / "evaluation.json").read_text())
    assert ev0["row"] == r["acc_matrix"][0]
    assert {k: v for k, v in digest(out).items() if k.parts[0] != "evaluations"} == before
    assert run.main(["--evaluate", str(out), "--stage", "99"]) == 1
    assert "--stage 99" in capsys.readouterr().err


def test_task_order_skip_base_eval_and_test_cap(tmp_path, cache):
    out = tmp_path / "o"
    assert run.main(["--method", "seqlora", *SMOKE, "--task-order", "gqa,sciqa", "--skip-base-eval",
                     "--out", str(out), "--cache", str(cache)]) == 0
    r = load(out)
    assert r["tasks"] == ["gqa", "sciqa"] and r["acc_matrix"][0] == [None, None]
    assert r["summary"]["FWT"] is None and r["summary"]["AP"] is not None  # every metric but FWT stands
    assert not (out / "predictions" / "stage_0").exists()
    assert run.main(["--method", "seqlora", *SMOKE, "--task-order", "gqa,nope", "--out", str(tmp_path / "x"),
                     "--cache", str(cache)]) == 1
    data, images, args = coin_run(tmp_path / "c")
    assert run.main([*args, "--max-test-per-task", "1", "--task-order", "VQAv2,GQA", "--out", str(tmp_path / "c1")]) == 0
    r = load(tmp_path / "c1")
    assert r["tasks"] == ["VQAv2", "GQA"]
    records = (tmp_path / "c1" / "predictions" / "stage_2" / "GQA.jsonl").read_text().splitlines()
    assert len(records) == 1  # the test cap; training kept both items


def test_custom_tasks_in_the_coin_format(tmp_path):
    data, images, args = coin_run(tmp_path)
    mine = tmp_path / "mine"
    for name in ("GQA", "OCRVQA"):
        shutil.copytree(data / "Instructions_Original" / name, mine / ("Colours" if name == "GQA" else name))
    (mine / "tasks.json").write_text(json.dumps({"Colours": "vqa", "OCRVQA": "exact"}))
    i = args.index("--data-root")
    args = args[:i] + args[i + 2:]
    args[args.index("coin")] = "custom"
    out = tmp_path / "out"
    assert run.main([*args, "--task-dir", str(mine), "--out", str(out)]) == 0
    r = load(out)
    assert r["tasks"] == ["Colours", "OCRVQA"] and r["protocol"] == "robust"
    assert r["scoring"]["Colours"] == {"scorer": "vqa", "official": None, "test_file": str(mine / "Colours" / "test.json"),
                                       "items": 2}
    assert r["scoring"]["OCRVQA"]["official"] == "OCRVQA"  # a CoIN task's name brings its official rule
    assert all(row[0] is None for row in r["acc_matrix_official"])


def test_a_disk_that_fills_mid_run_ends_in_a_message(tmp_path, capsys, monkeypatch):
    data, images, args = coin_run(tmp_path)
    out = tmp_path / "out"
    real, calls = runfolder.atomic_write, []

    def full_disk(path, write):
        calls.append(path)
        if path.name == "after_stage_2.pt":
            raise OSError(28, "No space left on device", str(path))
        return real(path, write)

    monkeypatch.setattr(runfolder, "atomic_write", full_disk)
    assert run.main([*args, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "after_stage_2.pt" in err
    r = load(out)  # what was written before stays whole
    assert len(r["acc_matrix"]) == 2 and (out / "checkpoints" / "after_stage_1.pt").is_file()
    assert not list(out.rglob("*.tmp")) and not (out / "run.lock").exists()


def test_a_run_is_the_same_whether_or_not_it_built_the_cached_base(tmp_path):
    """Stage 1 draws random numbers; the adapters built after it must not depend on whether it ran
    in this process (a cache miss) or earlier (a hit)."""
    cache = tmp_path / "fresh"
    args = ["--method", "branchlora", *SMOKE, "--cache", str(cache)]
    assert run.main([*args, "--out", str(tmp_path / "miss")]) == 0  # builds the base first
    assert run.main([*args, "--out", str(tmp_path / "hit")]) == 0
    a, b = (torch.load(tmp_path / d / "checkpoints" / "after_stage_6.pt", weights_only=True) for d in ("miss", "hit"))
    assert all(torch.equal(a["adapters"][k], b["adapters"][k]) for k in a["adapters"])


def test_table_scripts_reuse_only_runs_made_on_this_minicoin(tmp_path):
    """A complete run is reused as it is; one made on another MiniCoIN base (an older world or
    stage 1) stops the table with the folder's name instead of entering it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.minicoin_table import run_or_reuse
    from minimcit.pretrain import base_name

    out = tmp_path / "seqlora"
    out.mkdir()
    stale = {"complete": True, "config": {"model": "/cache/minicoin-base-smoke-0123456789"}, "summary": {"AP": 1}}
    (out / "results.json").write_text(json.dumps(stale))
    with pytest.raises(SystemExit, match=f"{out}: made on MiniCoIN base minicoin-base-smoke-0123456789"):
        run_or_reuse(out, "seqlora", [], "minicvit", "smoke", 0)
    fresh = dict(stale, config={"model": f"/cache/{base_name('smoke', 0)}"})
    (out / "results.json").write_text(json.dumps(fresh))
    assert run_or_reuse(out, "seqlora", [], "minicvit", "smoke", 0) == fresh  # reused, nothing run


def test_a_method_is_one_class_and_one_registry_line(tmp_path, cache, monkeypatch):
    """A new method: one class declaring its own flag, one registry entry; run.py parses, checks
    and passes the flag, refuses it for other methods, and runs the method end to end."""
    from minimcit.adapters import SeqLoRA
    from minimcit.method import POSITIVE, Option
    from minimcit.methods import METHODS

    made = []

    class ScaledLoRA(SeqLoRA):
        """SeqLoRA with its update scaled by --update-scale."""
        options = (*SeqLoRA.options, Option("update_scale", "factor on s (1.0)", float, range=POSITIVE))

        def __init__(self, model, *, update_scale: float = 1.0, **kw):
            self.update_scale = update_scale
            super().__init__(model, **kw)
            made.append(self)

        def make_layer(self, base):
            layer = super().make_layer(base)
            layer.scaling *= self.update_scale
            return layer

    monkeypatch.setitem(METHODS, "scaledlora", ScaledLoRA)  # the one line a new method needs
    out = tmp_path / "scaled"
    assert run.main(["--method", "scaledlora", *SMOKE, "--update-scale", "0.5", "--out", str(out),
                     "--cache", str(cache)]) == 0
    assert made[-1].update_scale == 0.5 and load(out)["method"] == "scaledlora" and load(out)["complete"]
    hp = made[-1]
    assert all(layer.scaling == 0.5 * hp.lora_alpha / hp.r for layer in hp.layers)
    assert run.main(["--method", "seqlora", *SMOKE, "--update-scale", "0.5", "--out", str(tmp_path / "s")]) == 1
    assert run.main(["--method", "scaledlora", *SMOKE, "--update-scale", "0", "--out", str(tmp_path / "z")]) == 1
