"""Issue 24: every input checked against what it claims to be. Each test replays what a user typed
and asserts the exit code, the message (naming the file, flag or field) and, where a run folder
exists, that a refusal left it byte for byte as it was."""

import json
import shutil

import pytest
from test_run import SMOKE, coin_run, digest, load

import run
from minimcit import runfolder


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished MiniCVIT smoke run of seqlora (6 tasks), copied afresh into each test."""
    root = tmp_path_factory.mktemp("finished")
    out = root / "run"
    assert run.main(["--method", "seqlora", *SMOKE, "--out", str(out), "--cache", str(root / "cache")]) == 0
    return out, root / "cache"


@pytest.fixture
def a_run(finished, tmp_path):
    out, cache = finished
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "run", cache


def test_rescore_after_a_stage_killed_before_its_checkpoint_leaves_the_run_resumable(a_run, capsys):
    out, cache = a_run
    # As a kill leaves it: stage 3's predictions written, its checkpoint and results.json row not.
    results = load(out)
    results["acc_matrix"] = results["acc_matrix"][:3]  # base, stages 1-2
    results["acc_matrix_official"] = results["acc_matrix_official"][:3]
    results["format_matrix"], results["complete"] = results["format_matrix"][:3], False
    (out / "results.json").write_text(json.dumps(results))
    for k in range(3, 7):
        (out / "checkpoints" / f"after_stage_{k}.pt").unlink()
    shutil.rmtree(out / "predictions" / "stage_4"), shutil.rmtree(out / "predictions" / "stage_5")
    shutil.rmtree(out / "predictions" / "stage_6")
    assert run.main(["--rescore", str(out)]) == 0
    assert len(load(out)["acc_matrix"]) == 3  # stage 3 left out: it has no checkpoint
    assert run.main(["--method", "seqlora", *SMOKE, "--out", str(out), "--cache", str(cache), "--resume"]) == 0
    assert load(out)["complete"]
    capsys.readouterr()


def test_rescore_refuses_predictions_that_are_not_the_recorded_test_set(a_run, capsys):
    out, _ = a_run
    path = out / "predictions" / "stage_2" / "sciqa.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # one item short
    before = digest(out)
    assert run.main(["--rescore", str(out)]) == 1
    assert f"{path} holds {len(lines) - 1} predictions but the run's test set had {len(lines)} items" in \
        capsys.readouterr().err
    assert digest(out) == before
    path.write_text("\n".join([*lines[:-1], lines[-1].replace('"gold": ', '"gold": null, "x": ')]) + "\n")
    assert run.main(["--rescore", str(out)]) == 1
    assert "'prediction' should be text and 'gold' text or a list of texts" in capsys.readouterr().err


@pytest.mark.parametrize("mode,extra,says", [
    ("--evaluate", ["--task-identity", "selector"], "drop --task-identity"),
    ("--evaluate", ["--lr", "0.1"], "drop --lr"),
    ("--rescore", ["--stage", "2"], "drop --stage"),
    ("--rescore", ["--method", "lilora"], "drop --method"),
])
def test_evaluate_and_rescore_refuse_flags_they_would_ignore(a_run, capsys, mode, extra, says):
    out, _ = a_run
    before = digest(out)
    assert run.main([mode, str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert f"{mode} rebuilds the run from its own command" in err and says in err
    assert digest(out) == before


def test_evaluate_honours_how_it_runs_and_records_the_command(a_run, capsys):
    out, _ = a_run
    argv = ["--evaluate", str(out), "--stage", "2", "--eval-batch-size", "3", "--device", "cpu", "--quiet"]
    assert run.main(argv) == 0
    ev = json.loads((out / "evaluations" / "stage_2" / "evaluation.json").read_text())
    assert ev["argv"] == argv
    assert ev["row"][:3] == load(out)["acc_matrix"][2][:3]  # the tasks stage 2 answered in the run
    capsys.readouterr()


def test_evaluate_refuses_a_run_whose_test_data_changed(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    out = tmp_path / "out"
    assert run.main([*args, "--out", str(out)]) == 0
    test = data / "Instructions_Original" / "ScienceQA" / "test.json"
    items = json.loads(test.read_text())
    items[0]["answer"] = "Z"  # another gold
    test.write_text(json.dumps(items))
    before = digest(out)
    assert run.main(["--evaluate", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--evaluate: contents." in err and "test.json" in err and "would be scored against other data" in err
    assert digest(out) == before


def test_interrupted_before_any_stage_says_so(tmp_path, capsys, monkeypatch):
    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(run, "pretrain_base", stop)  # Ctrl-C during stage 1
    out = tmp_path / "o"
    assert run.main(["--method", "seqlora", *SMOKE, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "no stage had finished" in err and "--resume" not in err


def test_a_lock_that_cannot_be_removed_does_not_hide_the_error_that_stopped_the_run(tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    real = runfolder.Path.unlink

    def refuse(self, *a, **k):
        if self.name == "run.lock":
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)
    monkeypatch.setattr(runfolder.Path, "unlink", refuse)
    with pytest.raises(OSError, match="No space left"):
        with runfolder.run_lock(out):
            raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="could not remove the run lock"):
        with runfolder.run_lock(out / ".."):
            pass


def test_no_flag_is_one_torchrun_takes_for_its_own():
    """torchrun parses what follows the script for abbreviations of its own options: a flag of ours
    that prefixes several of them (--r: --rdzv-*, --role, ...) stops torchrun before run.py runs."""
    from torch.distributed.run import get_args_parser

    ours = [s for a in run.build_parser()._actions for s in a.option_strings if s.startswith("--")]
    torchrun = get_args_parser()
    refused = []
    for flag in ours:
        if flag in ("--r",):  # kept for one process; --lora-r is its torchrun spelling
            continue
        try:
            torchrun.parse_args(["run.py", flag, "1"])
        except SystemExit:
            refused.append(flag)
    assert not refused
    with pytest.raises(SystemExit):
        torchrun.parse_args(["run.py", "--r", "8"])  # why --lora-r exists
    assert run.parse_args(["--lora-r", "8"]).r == 8


def test_every_numeric_flag_states_its_range_in_help():
    numeric = [a for a in run.build_parser()._actions if a.type in (int, float)]
    assert len(numeric) > 25
    missing = [a.option_strings[0] for a in numeric if " (in " not in (a.help or "")]
    assert not missing, missing


def test_method_checks_run_before_the_base_loads(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(run.Llava, "from_pretrained", lambda *a, **k: calls.append(a))
    data, images, args = coin_run(tmp_path)
    args[args.index("seqlora")] = "branchlora"
    args[args.index("--r") + 1] = "10"  # not divisible by N = 8
    assert run.main([*args, "--out", str(tmp_path / "o")]) == 1
    assert "--r 10 must split evenly into --num-branches 8" in capsys.readouterr().err and not calls


# --------------------------------------------------------------------------- data: what --check-data and the run see


def _edit(path, fn):
    items = json.loads(path.read_text())
    fn(items)
    path.write_text(json.dumps(items))


def plant_truncated_jpeg(data, images):
    path = images / "GQA" / "0.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return "GQA/0.jpg is unreadable", "cannot read image"


def plant_empty_image(data, images):
    (images / "VizWiz" / "1.jpg").write_bytes(b"")
    return "VizWiz/1.jpg is unreadable", "missing or empty under"


def plant_empty_test_split(data, images):
    (data / "Instructions_Original" / "ImageNet" / "test.json").write_text("[]")
    return "ImageNet/test.json: no items", "ImageNet/test.json: no items"


def plant_space_separated_box(data, images):
    _edit(data / "Instructions_Original" / "Grounding" / "test.json",
          lambda items: items[1].update(answer_bbox="[0.17 0.2 0.62 0.75]"))
    return ("Grounding/test.json: item 1 field 'answer_bbox' should be four comma-separated numbers",) * 2


def plant_answers_not_text(data, images):
    _edit(data / "Instructions_Original" / "OCRVQA" / "test.json", lambda items: items[0].update(answer=[3, 4]))
    return ("OCRVQA/test.json: item 0 field 'answer' should be a string or a list of non-empty strings",) * 2


@pytest.mark.parametrize("plant", [plant_truncated_jpeg, plant_empty_image, plant_empty_test_split,
                                   plant_space_separated_box, plant_answers_not_text])
def test_check_data_finds_what_the_run_refuses_or_dies_on(tmp_path, capsys, plant):
    data, images, args = coin_run(tmp_path)
    check, refusal = plant(data, images)
    assert run.main(["--tasks", "coin", "--check-data", "--data-root", str(data), "--image-root", str(images)]) == 1
    out = capsys.readouterr().out
    assert check in out and "fault(s) found" in out, out[-2000:]
    assert run.main([*args, "--out", str(tmp_path / "o")]) == 1  # and the run stops, saying where
    err = capsys.readouterr().err
    assert refusal in err and "Traceback" not in err, err[-2000:]


def test_a_gold_box_may_be_a_json_list_of_four_numbers(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    _edit(data / "Instructions_Original" / "Grounding" / "test.json",
          lambda items: [item.update(answer_bbox=[0.1, 0.2, 0.5, 0.6]) for item in items])
    assert run.main(["--tasks", "coin", "--check-data", "--data-root", str(data), "--image-root", str(images)]) == 0
    out = tmp_path / "o"
    assert run.main([*args, "--out", str(out)]) == 0
    gold = json.loads((out / "predictions" / "stage_0" / "Grounding.jsonl").read_text().splitlines()[0])["gold"]
    assert gold == "[0.1, 0.2, 0.5, 0.6]"  # scored as CoIN's string form
    capsys.readouterr()


def custom(tmp_path):
    data, images, args = coin_run(tmp_path)
    mine = tmp_path / "mine"
    for task in ("ScienceQA", "GQA"):
        shutil.copytree(data / "Instructions_Original" / task, mine / task)
    i = args.index("--data-root")
    args = args[:i] + args[i + 2:]
    args[args.index("coin")] = "custom"
    return mine, images, [*args, "--task-dir", str(mine)]


@pytest.mark.parametrize("scorers,says", [
    ({"ScienceQA": "letter", "Gqa": "vqa"}, "tasks.json names ['Gqa'], which have no <Task>/train.json"),
    ({"ScienceQA": "letter"}, "tasks.json gives no scorer for ['GQA']"),
])
def test_custom_task_names_in_tasks_json_and_on_disk_agree(tmp_path, capsys, scorers, says):
    mine, images, args = custom(tmp_path)
    (mine / "tasks.json").write_text(json.dumps(scorers))
    assert run.main([*args, "--out", str(tmp_path / "o")]) == 1
    assert says in capsys.readouterr().err
    assert run.main(["--tasks", "custom", "--check-data", "--task-dir", str(mine), "--image-root", str(images)]) == 1
    assert says in capsys.readouterr().err


def test_check_data_reads_custom_tasks_and_a_missing_test_file_is_named(tmp_path, capsys):
    mine, images, args = custom(tmp_path)
    check = ["--tasks", "custom", "--check-data", "--task-dir", str(mine), "--image-root", str(images)]
    assert run.main(check) == 0
    assert "no faults found" in capsys.readouterr().out
    (mine / "GQA" / "test.json").rename(mine / "GQA" / "held_out.json")
    for argv in (check, [*args, "--out", str(tmp_path / "o")]):
        assert run.main(argv) == 1
        assert f"{mine / 'GQA'}: no test.json (or val.json) beside train.json" in capsys.readouterr().err


def test_a_tokenizer_of_another_model_is_refused_by_its_special_tokens(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    data, images, args = coin_run(tmp_path)
    folder = tmp_path / "ckpt"
    words = ["<unk>", "</s>", "<s>", "<pad>"] + [f"w{i}" for i in range(20)]  # no larger, but eos and bos swapped
    Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")).save(str(folder / "tok.json"))
    before = digest(folder)
    assert run.main([*args, "--tokenizer", str(folder / "tok.json"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "tok.json: the tokenizer's bos token is id 2 but the model's config says 1" in err
    assert digest(folder) == before and not (tmp_path / "o").exists()


def test_a_one_task_run_has_no_bwt_or_fwt(finished, tmp_path, capsys):
    from minimcit.metrics import continual_summary

    s = continual_summary([[10.0], [70.0]], [[100.0], [100.0]])
    assert s["AP"] == 70.0 and s["BWT"] is None and s["FWT"] is None
    out = tmp_path / "one"
    assert run.main(["--method", "seqlora", *SMOKE, "--task-order", "gqa", "--out", str(out),
                     "--cache", str(finished[1])]) == 0
    assert "BWT n/a" in (out / "results.txt").read_text() and "FWT n/a" in (out / "results.txt").read_text()
    capsys.readouterr()


def test_resume_at_another_worker_count_and_eval_batch_is_the_same_run(a_run, capsys):
    out, cache = a_run
    assert run.main(["--method", "seqlora", *SMOKE, "--out", str(out), "--cache", str(cache), "--resume",
                     "--num-workers", "2", "--eval-batch-size", "5"]) == 0
    assert "resuming after stage 6 of 6" in capsys.readouterr().err


def test_the_selector_is_refused_for_a_method_with_one_set_of_parameters(tmp_path, capsys):
    assert run.main(["--method", "seqlora", *SMOKE, "--task-identity", "selector", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "--task-identity selector: seqlora has no per-task parameters" in err and "branchlora" in err


@pytest.mark.parametrize("extra,says", [
    (["--model", "x"], "--model applies to real data"), (["--tokenizer", "t.json"], "--tokenizer applies to real data"),
    (["--device-memory", "24"], "--device-memory applies to real data"),
    (["--instructions", "type2"], "--instructions applies to real data"),
    (["--vision-tower", "v", "--projector", "p"], "--vision-tower, --projector applies to real data"),
])
def test_minicoin_refuses_flags_about_data_the_user_brings(tmp_path, capsys, extra, says):
    assert run.main(["--method", "seqlora", *SMOKE, *extra, "--out", str(tmp_path / "o")]) == 1
    assert says in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_real_data_refuses_the_minicoin_cache_flag(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    assert run.main([*args, "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")]) == 1
    assert "--cache holds MiniCoIN's base model" in capsys.readouterr().err


def test_check_data_refuses_flags_it_would_ignore(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    check = ["--tasks", "coin", "--check-data", "--data-root", str(data), "--image-root", str(images)]
    assert run.main([*check, "--max-per-task", "1"]) == 1
    assert "--check-data checks the data and stops and takes" in capsys.readouterr().err
    assert run.main([*check, "--method", "lilora"]) == 0  # "check before my run"
    capsys.readouterr()


def test_evaluate_from_another_folder_and_resume_with_absolute_paths(tmp_path, capsys, monkeypatch):
    data, images, args = coin_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    rel = [str(a).replace(str(tmp_path) + "/", "") for a in args]  # the same run, with relative paths
    assert run.main([*rel, "--out", "out", "--epochs", "0.5"]) == 0
    monkeypatch.chdir(tmp_path / "coin")  # somewhere else
    assert run.main(["--evaluate", str(tmp_path / "out"), "--stage", "1"]) == 0
    monkeypatch.chdir(tmp_path)
    assert run.main([*args, "--out", "out", "--epochs", "0.5", "--resume"]) == 0  # absolute: the same run
    assert "resuming after stage 8 of 8" in capsys.readouterr().err


def test_evaluate_checks_the_recorded_command_and_its_own_flags(a_run, capsys):
    out, _ = a_run
    before = digest(out)
    for device, says in (("cuda:3", "--device cuda"), ("gpu", "--device 'gpu' is not a device torch knows")):
        assert run.main(["--evaluate", str(out), "--device", device]) == 1
        assert says in capsys.readouterr().err
    assert run.main(["--evaluate", str(out), "--eval-batch-size", "0"]) == 1
    assert "--eval-batch-size must be in [1, inf)" in capsys.readouterr().err
    results, raw = load(out), (out / "results.json").read_bytes()
    for argv, says in ((["--method", "seqlora", "--bogus"], "its 'argv' is not a command this run.py takes (--bogus)"),
                       (["--method", "seqlora"], "its 'argv' names no --method or --tasks")):
        (out / "results.json").write_text(json.dumps({**results, "argv": argv}))
        assert run.main(["--evaluate", str(out)]) == 1
        assert says in capsys.readouterr().err
    (out / "results.json").write_bytes(raw)
    assert digest(out) == before
    assert run.main(["--evaluate", str(out / "results.json")]) == 1  # a file, not the folder
    assert "is not a folder: --evaluate needs the folder a run wrote" in capsys.readouterr().err
    assert run.main(["--rescore", str(out / "nope")]) == 1
    assert "is not a folder: --rescore needs the folder a run wrote" in capsys.readouterr().err


def test_rescore_with_a_deleted_checkpoint_names_it_and_keeps_the_stages_before(a_run, capsys):
    out, cache = a_run
    (out / "checkpoints" / "after_stage_6.pt").unlink()
    assert run.main(["--rescore", str(out)]) == 0
    assert "after_stage_6.pt is missing, so stages after 5 are left out" in capsys.readouterr().err
    r = load(out)
    assert len(r["acc_matrix"]) == 6 and not r["complete"] and r["summary"] is None
    assert run.main(["--method", "seqlora", *SMOKE, "--out", str(out), "--cache", str(cache), "--resume"]) == 0
    assert load(out)["complete"]
    capsys.readouterr()


def test_an_empty_out_is_refused_not_the_working_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run.main(["--method", "seqlora", *SMOKE, "--out", ""])
    assert e.value.code == 2 and "--out is empty" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra,says", [
    (["--seed", "99999999999999999999"], "--seed must be in [0, 4294967295]"),
    (["--projector-lr", "0.5"], "--projector-lr sets the trained projector's rate"),
    (["--max-new-tokens", "100000"], "--max-new-tokens 100000: the model has"),
])
def test_flags_that_would_be_ignored_overflow_or_never_end(tmp_path, capsys, finished, extra, says):
    assert run.main(["--method", "seqlora", *SMOKE, "--cache", str(finished[1]), *extra, "--out", str(tmp_path / "o")]) == 1
    assert says in capsys.readouterr().err


def test_lilora_share_a_only_refuses_the_task_factor_flags(tmp_path, capsys):
    for extra in (["--r-task", "4"], ["--reg-weight", "5"]):
        assert run.main(["--method", "lilora", *SMOKE, "--share-a-only", *extra, "--out", str(tmp_path / "o")]) == 1
        assert "--share-a-only has no basis B0, no fusion and no task factors" in capsys.readouterr().err


def test_bad_model_and_tokenizer_files_are_named(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    folder = tmp_path / "ckpt"
    config = json.loads((folder / "config.json").read_text())
    for value in (-5, "big"):
        bad = json.loads(json.dumps(config))
        bad["text_config"]["hidden_size"] = value
        (folder / "config.json").write_text(json.dumps(bad))
        assert run.main([*args, "--out", str(tmp_path / "o")]) == 1
        assert "field 'text_config.hidden_size' should be a positive integer" in capsys.readouterr().err
    (folder / "config.json").write_text("[1, 2]")
    assert run.main([*args, "--out", str(tmp_path / "o")]) == 1
    assert "config.json: expected a JSON object of model settings, got a list" in capsys.readouterr().err
    (folder / "config.json").write_text(json.dumps(config))
    tok = folder / "tokenizer.json"
    tok.write_text(tok.read_text()[:200])
    assert run.main([*args, "--out", str(tmp_path / "o")]) == 1
    assert "tokenizer.json: not a tokenizer.json the tokenizers library can read" in capsys.readouterr().err


def test_textvqa_answers_that_are_not_text_are_found_by_check_data_and_refused(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    path = images / "TextVQA" / "TextVQA_0.5.1_val.json"
    answers = json.loads(path.read_text())
    answers["data"][0]["answers"] = [None, 3, ["a"]]
    path.write_text(json.dumps(answers))
    assert run.main(["--tasks", "coin", "--check-data", "--data-root", str(data), "--image-root", str(images)]) == 1
    assert "data item 0 field 'answers' should be a list of strings" in capsys.readouterr().out
    assert run.main([*args, "--out", str(tmp_path / "o")]) == 1
    assert "data item 0 field 'answers' should be a list of strings" in capsys.readouterr().err


def test_a_custom_folder_without_train_json_or_with_a_comma_is_named(tmp_path, capsys):
    mine, images, args = custom(tmp_path)
    (mine / "Notes").mkdir()
    (mine / "Notes" / "train.jsonl").write_text("")
    assert run.main([*args, "--out", str(tmp_path / "o")]) == 1
    assert "['Notes'] hold no train.json" in capsys.readouterr().err
    shutil.rmtree(mine / "Notes")
    (mine / "GQA").rename(mine / "G,QA")
    assert run.main([*args, "--out", str(tmp_path / "o")]) == 1
    assert "task folder names ['G,QA'] contain a comma" in capsys.readouterr().err


def test_resume_refuses_a_replaced_image_and_changed_scorers(tmp_path, capsys):
    mine, images, args = custom(tmp_path)
    out = tmp_path / "o"
    assert run.main([*args, "--out", str(out)]) == 0
    image = images / "GQA" / "0.jpg"
    image.write_bytes(image.read_bytes() + b"\0" * 10)  # another image under the same name
    assert run.main([*args, "--out", str(out), "--resume"]) == 1
    assert "--resume:" in capsys.readouterr().err
    image.write_bytes(image.read_bytes()[:-10])
    (mine / "tasks.json").write_text(json.dumps({"ScienceQA": "letter", "GQA": "caption"}))
    assert run.main([*args, "--out", str(out), "--resume"]) == 1
    assert "scorers" in capsys.readouterr().err


def test_resume_says_when_skip_base_eval_no_longer_matches(tmp_path, finished, capsys):
    out = tmp_path / "skipped"
    argv = ["--method", "seqlora", *SMOKE, "--cache", str(finished[1]), "--out", str(out)]
    assert run.main([*argv, "--skip-base-eval"]) == 0
    assert run.main([*argv, "--resume"]) == 0
    assert "started with --skip-base-eval; row 0 (the base model) stays empty" in capsys.readouterr().err


def test_a_damaged_minicoin_cache_says_to_delete_it(tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["--method", "seqlora", *SMOKE, "--cache", str(cache), "--out", str(tmp_path / "o")]
    assert run.main(argv) == 0
    weights = next(cache.rglob("model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    assert run.main([*argv[:-1], str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert "the cached MiniCoIN base in" in err and "delete that folder and run again" in err


def test_a_llava_hf_folder_with_vision_tower_says_to_drop_it(tmp_path, capsys):
    data, images, args = coin_run(tmp_path)
    assert run.main([*args, "--vision-tower", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o")]) == 1
    assert "is a whole model (it has vision_config)" in capsys.readouterr().err


@pytest.mark.parametrize("extra,says", [
    (["--method", "branchlora", "--num-branches", "1", "--top-k", "1"], "--num-branches must be in [2, inf)"),
    (["--method", "dirlora", "--use-selector", "--task-identity", "oracle"], "--use-selector trains a task selector"),
])
def test_method_settings_that_train_nothing_or_are_never_used_are_refused(tmp_path, capsys, extra, says):
    assert run.main([*SMOKE, *extra, "--out", str(tmp_path / "o")]) == 1
    assert says in capsys.readouterr().err


def test_custom_data_checks_of_the_second_pass(tmp_path, capsys):
    mine, images, args = custom(tmp_path)
    assert run.main([*args, "--out", str(mine / "run1")]) == 1  # a run folder inside its own data
    assert "is inside --task-dir" in capsys.readouterr().err
    sci = mine / "ScienceQA" / "test.json"
    _edit(sci, lambda items: items[0].update(answer="thing 0"))  # a letter task whose gold is no letter
    (mine / "tasks.json").write_text(json.dumps({"ScienceQA": "letter", "GQA": "vqa"}))
    assert run.main([*args, "--out", str(tmp_path / "o")]) == 1
    assert "field 'answer' should name an option letter for the letter scorer, got 'thing 0'" in \
        capsys.readouterr().err
    _edit(sci, lambda items: items[0].update(answer="   "))
    assert run.main([*args, "--out", str(tmp_path / "o")]) == 1
    assert "ScienceQA/test.json: item 0 field 'answer' is empty" in capsys.readouterr().err
    _edit(sci, lambda items: items[0].update(answer="A"))
    _edit(mine / "GQA" / "train.json", lambda items: items[0]["conversations"][1].update(value=" "))
    assert run.main([*args, "--out", str(tmp_path / "o")]) == 1
    assert "GQA/train.json: item 0 turn 1 is an empty gpt answer" in capsys.readouterr().err
    _edit(mine / "GQA" / "train.json", lambda items: items[0]["conversations"][1].update(value="thing 0"))
    assert run.main([*args[:args.index("--image-root") + 1], str(tmp_path / "ckpt" / "config.json"),
                     *args[args.index("--image-root") + 2:], "--out", str(tmp_path / "o")]) == 1
    assert "image root is not a folder" in capsys.readouterr().err


def test_a_custom_task_named_like_a_coin_task_keeps_its_own_scorer(tmp_path, capsys):
    mine, images, args = custom(tmp_path)
    (mine / "GQA").rename(mine / "Grounding")  # text answers, under a CoIN box task's name
    (mine / "tasks.json").write_text(json.dumps({"ScienceQA": "letter", "Grounding": "exact"}))
    out = tmp_path / "o"
    assert run.main([*args, "--out", str(out)]) == 0
    assert load(out)["scoring"]["Grounding"]["official"] is None  # CoIN's box rule not applied to text
    assert load(out)["scoring"]["ScienceQA"]["official"] == "ScienceQA"  # same scorer: the official rule holds
    capsys.readouterr()


def test_real_data_refuses_an_answer_past_the_model_before_loading_it(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(run.Llava, "from_pretrained", lambda *a, **k: calls.append(a))
    data, images, args = coin_run(tmp_path)
    assert run.main([*args, "--max-new-tokens", "100000", "--out", str(tmp_path / "o")]) == 1
    assert "--max-new-tokens 100000: the model has" in capsys.readouterr().err and not calls


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory):  # not pytest's own `cache` fixture, whose str() is a folder name in the cwd
    return tmp_path_factory.mktemp("cache")


def test_target_places_adapters_by_full_name_in_the_language_model_and_projector_only(tmp_path, capsys, base_cache):
    """--target: a named placement or a regex of full module names; one that matches nothing or
    reaches into the vision tower is refused by name before anything loads."""
    out = tmp_path / "run"
    base = ["--method", "dirlora", "--tasks", "minicoin", "--preset", "smoke", "--task-order", "sciqa", "--quiet",
            "--cache", str(base_cache)]
    assert run.main([*base, "--target", r"language_model\.layers\.0\.mlp\.down_proj", "--out", str(out)]) == 0
    assert "dirlora: wrapped 1 linears (down_proj x1)" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["config"]["hparams"]["target"].endswith("down_proj")
    for target, said in ((r"vision_tower\..*", "adapters go in the language model and the projector only"),
                         ("nothing", "no Linear layer of the model matches --target 'nothing'")):
        assert run.main([*base, "--target", target, "--out", str(tmp_path / "refused")]) == 1
        assert said in capsys.readouterr().err and not (tmp_path / "refused").exists()
