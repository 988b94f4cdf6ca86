"""The real CoIN/CVIT loaders on a fixture in the exact format, and collation."""

import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from minimcit.data import COIN, CVIT, Collator, Sample, load_benchmark
from minimcit.model import IGNORE_INDEX
from minimcit.processing import TextTokenizer


# --------------------------------------------------------------------------- real formats


def write_fixture(root, order=COIN, n=3):
    """A handful of items per task in CoIN's exact files, with images written here."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for task, scorer in order:
        folder = root / "data" / "Instructions_Original" / task
        folder.mkdir(parents=True)
        train, test = [], []
        for i in range(n):
            name = f"{task}/{i}.jpg"
            (images / task).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(images / name)
            train.append({"id": f"{task}-{i}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>\nWhat is in picture {i}?\nAnswer the question using a single word or phrase."},
                {"from": "gpt", "value": f"thing {i}"}]})
            item = {"question_id": i, "image": name, "text": f"What is in picture {i}?", "answer": f"thing {i}"}
            if scorer == "box":
                item.update(answer_bbox="[0.1, 0.2, 0.5, 0.6]", size=[30, 20 + i])
            if scorer == "caption":
                item["answer"] = [f"a picture of thing {i}.", f"thing {i} in a photo."]
            test.append(item)
        (folder / "train.json").write_text(json.dumps(train))
        (folder / "test.json").write_text(json.dumps(test))
    return root / "data", images


def test_coin_loader_reads_the_fixture(tmp_path):
    data, images = write_fixture(tmp_path)
    tasks = load_benchmark("coin", data, images)
    assert [t.name for t in tasks] == [name for name, _ in COIN]
    sqa = tasks[0]
    assert sqa.scorer == "letter" and len(sqa.train) == 3 and len(sqa.test) == 3
    assert sqa.train[1].question == "What is in picture 1?\nAnswer the question using a single word or phrase."
    assert sqa.train[1].answer == "thing 1" and sqa.train[1].image == images / "ScienceQA/1.jpg"
    grounding = tasks[5]
    assert grounding.scorer == "box" and grounding.test[0].answer == "[0.1, 0.2, 0.5, 0.6]"
    assert load_benchmark("coin", data, images, max_per_task=2)[3].train[-1].id == "GQA-1"


def test_cvit_loader_keeps_caption_references(tmp_path):
    data, images = write_fixture(tmp_path, order=CVIT)
    tasks = load_benchmark("cvit", data, images)
    flickr = tasks[2]
    assert flickr.name == "Flickr30k" and flickr.scorer == "caption"
    assert flickr.test[0].target == ["a picture of thing 0.", "thing 0 in a photo."]


def test_loader_errors_name_the_file_folder_and_field(tmp_path):
    data, images = write_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match="image root not found: .*nope"):
        load_benchmark("coin", data, tmp_path / "nope")
    gqa = data / "Instructions_Original" / "GQA"
    items = json.loads((gqa / "test.json").read_text())
    del items[1]["answer"]
    (gqa / "test.json").write_text(json.dumps(items))
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


# --------------------------------------------------------------------------- collation


@pytest.fixture
def collator(tmp_path):
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "red", "blue", "what", "?", "ASSISTANT", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.save(str(tmp_path / "tokenizer.json"))
    return Collator(TextTokenizer(tmp_path), num_image_tokens=4, image_token_index=-200, image_size=28)


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
    collator.plain = True
    img = Image.new("RGB", (28, 28), "blue")
    b = collator([Sample("t", "ignored ?", "red", image=img), Sample("t", "x", "red blue", image=img)])
    assert b["input_ids"][1].tolist() == [1, -200, -200, -200, -200, 4, 5, 2]
    assert b["labels"][1].tolist() == [IGNORE_INDEX] * 5 + [4, 5, 2]
    g = collator([Sample("t", "q", "red", image=img)], prompt_only=True)
    assert g["input_ids"][0].tolist() == [1, -200, -200, -200, -200]  # generation starts right after the image
    assert not b["instruction_mask"].any() and not g["instruction_mask"].any()  # stage 1 has no instruction
