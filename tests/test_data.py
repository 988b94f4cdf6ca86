"""The real CoIN/CVIT loaders on a fixture in the exact format, and collation."""

import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from minimcit.data import COIN, CVIT, EVAL_FILES, Collator, Sample, load_benchmark, missing_images
from minimcit.model import IGNORE_INDEX
from minimcit.processing import LlavaPrompt, TextTokenizer


# --------------------------------------------------------------------------- real formats

EVAL_FILE = {"coin": EVAL_FILES["coin"], "cvit": EVAL_FILES["cvit"]}


def write_fixture(root, order=COIN, n=3, folder_name="Instructions_Original"):
    """A handful of items per task in CoIN's exact files, with images written here: the file each
    task's evaluation script reads (val.json for TextVQA, VizWiz, VQAv2; test.json for the rest),
    TextVQA's ten answers under the image root, text-only ScienceQA items and a multi-turn
    conversation, as the real data has them."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    bench = "coin" if order == COIN else "cvit"
    textvqa_answers = []
    for task, scorer in order:
        folder = root / "data" / folder_name / task
        folder.mkdir(parents=True)
        train, test = [], []
        for i in range(n):
            name = f"{task}/{i}.jpg"
            (images / task).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(images / name)
            turns = [{"from": "human", "value": f"<image>\nWhat is in picture {i}?\nAnswer the question using a "
                                                "single word or phrase."}, {"from": "gpt", "value": f"thing {i}"}]
            if i == 2:  # a second turn, as LLaVA's multi-turn conversations have
                turns += [{"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "red"}]
            train.append({"id": f"{task}-{i}", "image": name, "conversations": turns})
            item = {"question_id": i, "image": name, "text": f"What is in picture {i}?", "answer": f"thing {i}"}
            if scorer == "letter":
                item["answer"] = "A"
            if scorer == "box":
                item.update(answer_bbox="[0.1, 0.2, 0.5, 0.6]", size=[30, 20 + i])
            if scorer == "caption":
                item["answer"] = [f"a picture of thing {i}.", f"thing {i} in a photo."]
            if task == "TextVQA":
                textvqa_answers.append({"question_id": i, "answers": [f"thing {i}"] * 7 + ["stuff"] * 3})
            test.append(item)
        if task == "ScienceQA":  # text-only questions: no "image" field at all
            del train[1]["image"], test[1]["image"]
            train[1]["conversations"][0]["value"] = "Which is a mammal?\nA. cat\nB. fish"
        (folder / "train.json").write_text(json.dumps(train))
        (folder / EVAL_FILE[bench].get(task, "test.json")).write_text(json.dumps(test))
    (images / "TextVQA" / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": textvqa_answers}))
    return root / "data", images


def test_coin_loader_reads_the_fixture(tmp_path):
    data, images = write_fixture(tmp_path)
    tasks = load_benchmark("coin", data, images)
    assert [t.name for t in tasks] == [name for name, _ in COIN]
    assert [t.official for t in tasks] == [name for name, _ in COIN]
    sqa = tasks[0]
    assert sqa.scorer == "letter" and len(sqa.train) == 3 and len(sqa.test) == 3
    assert sqa.train[0].question == "What is in picture 0?\nAnswer the question using a single word or phrase."
    assert sqa.train[0].answer == "thing 0" and sqa.train[0].image == images / "ScienceQA/0.jpg"
    assert sqa.train[1].image is None and sqa.test[1].image is None  # text-only items load
    assert sqa.train[2].later_turns == (("And its colour?", "red"),)  # every turn is kept
    grounding = tasks[5]
    assert grounding.scorer == "box" and grounding.test[0].answer == "[0.1, 0.2, 0.5, 0.6]"
    assert grounding.test[1].size == [30, 21]
    by_name = {t.name: t for t in tasks}
    for name in ("TextVQA", "VizWiz", "VQAv2"):  # the files CoIN's scripts score on
        assert by_name[name].test_file.endswith(f"{name}/val.json")
    assert by_name["GQA"].test_file.endswith("GQA/test.json")
    assert by_name["TextVQA"].test[1].answers == ["thing 1"] * 7 + ["stuff"] * 3  # the ten answers
    assert load_benchmark("coin", data, images, max_per_task=2)[3].train[-1].id == "GQA-1"


def test_both_instruction_sets_and_both_spellings(tmp_path):
    data, images = write_fixture(tmp_path / "a", folder_name="Instruction_Type2")  # CoIN's README spelling
    assert load_benchmark("coin", data, images, instructions="type2")[0].train[0].answer == "thing 0"
    with pytest.raises(FileNotFoundError, match="Instructions_Original|task folder"):
        load_benchmark("coin", data, images)  # no original set there
    data, images = write_fixture(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="--instructions type2: none of"):
        load_benchmark("coin", data, images, instructions="type2")


def test_without_the_textvqa_answer_file_the_answers_stay_single(tmp_path):
    data, images = write_fixture(tmp_path)
    (images / "TextVQA" / "TextVQA_0.5.1_val.json").unlink()
    textvqa = load_benchmark("coin", data, images)[1]
    assert textvqa.test[0].answers is None and textvqa.test[0].target == "thing 0"
    with pytest.raises(FileNotFoundError, match="--textvqa-answers: missing file"):
        load_benchmark("coin", data, images, textvqa_answers=tmp_path / "nope.json")


def test_cvit_loader_keeps_caption_references(tmp_path):
    data, images = write_fixture(tmp_path, order=CVIT)
    tasks = load_benchmark("cvit", data, images)
    flickr = tasks[2]
    assert flickr.name == "Flickr30k" and flickr.scorer == "caption" and flickr.test_file.endswith("val.json")
    assert flickr.test[0].target == ["a picture of thing 0.", "thing 0 in a photo."]


def _edit(path, fn):
    items = json.loads(path.read_text())
    fn(items)
    path.write_text(json.dumps(items))


def test_loader_errors_name_the_file_folder_and_field(tmp_path):
    data, images = write_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match="image root not found: .*nope"):
        load_benchmark("coin", data, tmp_path / "nope")
    gqa = data / "Instructions_Original" / "GQA"
    _edit(gqa / "test.json", lambda items: items[1].pop("answer"))
    with pytest.raises(ValueError, match=r"GQA/test\.json: item 1 has no field 'answer'"):
        load_benchmark("coin", data, images)
    (gqa / "test.json").write_text("[{oops")
    with pytest.raises(ValueError, match=r"GQA/test\.json: not valid JSON"):
        load_benchmark("coin", data, images)
    (gqa / "test.json").write_text("[]")
    with pytest.raises(ValueError, match=r"GQA/test\.json: no items"):
        load_benchmark("coin", data, images)
    (gqa / "test.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing file: .*GQA/test\.json"):
        load_benchmark("coin", data, images)
    import shutil

    shutil.rmtree(gqa)
    with pytest.raises(FileNotFoundError, match="missing task folder: .*GQA"):
        load_benchmark("coin", data, images)


def _swap_roles(items):
    items[2]["conversations"][0]["from"], items[2]["conversations"][1]["from"] = "gpt", "human"


@pytest.mark.parametrize("file,edit,message", [
    ("ScienceQA/train.json", _swap_roles, r"ScienceQA/train\.json: item 2 field 'conversations' must alternate human "
                                          r"and gpt turns, human first, ending on gpt; got roles \['gpt', 'human'"),
    ("ScienceQA/train.json", lambda items: items[0]["conversations"].pop(), r"item 0 field 'conversations' must alternate"),
    ("ScienceQA/train.json", lambda items: items[0]["conversations"].insert(1, {"from": "human", "value": "x"}),
     r"item 0 field 'conversations' must alternate"),
    ("Grounding/test.json", lambda items: items[1].update(answer_bbox="n/a"),
     r"Grounding/test\.json: item 1 field 'answer_bbox' should be four comma-separated numbers in \[0, 1\].*'n/a'"),
    ("Grounding/test.json", lambda items: items[0].update(answer_bbox="[12, 40, 200, 310]"),
     r"Grounding/test\.json: item 0 field 'answer_bbox' should be four comma-separated numbers in \[0, 1\]"),
    ("Grounding/test.json", lambda items: items[0].update(size=[30]), r"item 0 field 'size' should be \[width, height\]"),
    ("GQA/test.json", lambda items: items[0].update(answer=""), r"GQA/test\.json: item 0 field 'answer' is empty"),
])
def test_bad_items_are_refused_naming_file_and_item(tmp_path, file, edit, message):
    data, images = write_fixture(tmp_path)
    _edit(data / "Instructions_Original" / file, edit)
    with pytest.raises(ValueError, match=message):
        load_benchmark("coin", data, images)


def test_missing_images_are_found_before_training(tmp_path):
    data, images = write_fixture(tmp_path)
    tasks = load_benchmark("coin", data, images)
    assert missing_images(tasks) == []
    (images / "OCRVQA" / "2.jpg").unlink()  # the last task's image: found now, not hours in
    assert missing_images(tasks) == [images / "OCRVQA" / "2.jpg"]


# --------------------------------------------------------------------------- collation


@pytest.fixture
def collator(tmp_path):
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "red", "blue", "what", "?", "ASSISTANT", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.save(str(tmp_path / "tokenizer.json"))
    return Collator(TextTokenizer(tmp_path), LlavaPrompt(num_image_tokens=4, image_token_index=-200, image_size=28))


def test_collator_pads_right_for_training_left_for_generation(collator):
    img = Image.new("RGB", (40, 20), "red")
    samples = [Sample("t", "what ?", "red", image=img), Sample("t", "what red blue ?", "blue red", image=img)]
    b = collator(samples)
    assert b["pixel_values"].shape == (2, 3, 28, 28)
    assert (b["input_ids"] == -200).sum(1).tolist() == [4, 4]
    assert b["attention_mask"][0, -1] == 0 and b["attention_mask"][1, -1] == 1  # right padding
    lengths = b["attention_mask"].sum(1)
    assert b["labels"][0, lengths[0] - 2:lengths[0]].tolist() == [4, 2]  # "red" </s>
    assert (b["labels"][0, lengths[0]:] == IGNORE_INDEX).all() and (b["labels"] != IGNORE_INDEX).sum() == 2 + 3
    g = collator(samples, prompt_only=True)
    assert "labels" not in g and g["attention_mask"][0, 0] == 0 and (g["attention_mask"][:, -1] == 1).all()
    assert g["input_ids"][0, -2:].tolist() == [8, 9]  # prompts end at "ASSISTANT :"
    # The instruction span the selector reads: the question through "ASSISTANT:", never the
    # system prompt, the image, the answer or padding; at the same tokens in both paddings.
    for batch in (b, g):
        for i, s in enumerate(samples):
            picked = batch["input_ids"][i][batch["instruction_mask"][i]].tolist()
            assert picked == collator.tok.encode("\n" + s.question + " ASSISTANT:") and len(picked) >= 4


def test_collator_names_unreadable_images(collator, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        collator([Sample("t", "what ?", "red", image=bad)])
    with pytest.raises(ValueError, match="missing.jpg"):
        collator([Sample("t", "what ?", "red", image=tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match="empty batch"):
        collator([])


def test_plain_collation_for_stage1(collator):
    collator.prompt.plain = True
    img = Image.new("RGB", (28, 28), "blue")
    b = collator([Sample("t", "ignored ?", "red", image=img), Sample("t", "x", "red blue", image=img)])
    assert b["input_ids"][1].tolist() == [1, -200, -200, -200, -200, 4, 5, 2]
    assert b["labels"][1].tolist() == [IGNORE_INDEX] * 5 + [4, 5, 2]
    g = collator([Sample("t", "q", "red", image=img)], prompt_only=True)
    assert g["input_ids"][0].tolist() == [1, -200, -200, -200, -200]  # generation starts right after the image
    assert not b["instruction_mask"].any() and not g["instruction_mask"].any()  # stage 1 has no instruction


def test_text_only_and_image_samples_mix_in_one_batch(collator):
    img = Image.new("RGB", (28, 28), "red")
    samples = [Sample("t", "what ?", "red", image=img), Sample("t", "what blue ?", "blue", image=None),
               Sample("t", "what ?", "blue", image=Image.new("RGB", (28, 28), "blue"))]
    for b in (collator(samples), collator(samples, prompt_only=True)):
        assert b["pixel_values"].shape == (2, 3, 28, 28)  # one per sample that has an image, in order
        assert (b["input_ids"] == -200).sum(1).tolist() == [4, 0, 4]
        # A text-only prompt is tokenised in one piece; its instruction is still the question on.
        assert b["input_ids"][1][b["instruction_mask"][1]].tolist() == [6, 5, 7, 8, 9]  # what blue ? ASSISTANT :


def test_every_assistant_turn_carries_loss(collator):
    img = Image.new("RGB", (28, 28), "red")
    s = Sample("t", "what ?", "red", image=img, later_turns=(("what blue ?", "blue red"),))
    b = collator([s])
    labelled = b["labels"][0][b["labels"][0] != IGNORE_INDEX].tolist()
    assert labelled == [4, 2, 5, 4, 2]  # "red </s>" then "blue red </s>"; the second question carries none
    g = collator([s], prompt_only=True)  # generation answers the first turn only
    assert g["input_ids"][0, -2:].tolist() == [8, 9]
