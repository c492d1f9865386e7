"""Records -> batches: spans, labels, the length policy, skipped-record counting, the synthetic set."""
import json

import pytest
import torch
from PIL import Image

import data


@pytest.fixture(scope="module")
def proc():
    corpus = ["Row 1: a large red circle, nothing. How many red shapes are there? Answer: 2 yes no"] * 50
    return data.new_processor(corpus, tile=32, image_seq_len=4, vocab_size=300)


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def text_of(proc, ex, span):
    return proc.tokenizer.decode(ex["input_ids"][ex["spans"] == span].tolist(), skip_special_tokens=False)


def test_spans_and_labels(proc, tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    path = write(tmp_path, "d.jsonl", [{"image": "a.png", "question": "How many red shapes are there?",
                                        "rationale": "Row 1: a large red circle.", "answer": "1"}])
    ex = data.encode_record(proc, data.read_records(path)[0])
    assert (ex["spans"] == data.V).sum() == 4 and (ex["input_ids"][ex["spans"] == data.V] == proc.image_token_id).all()
    assert text_of(proc, ex, data.R) == " Row 1: a large red circle."
    assert text_of(proc, ex, data.A) == " Answer: 1<end_of_utterance>\n"
    assert text_of(proc, ex, data.P).endswith("How many red shapes are there?<end_of_utterance>\nAssistant:")
    assert ((ex["labels"] != -100) == (ex["spans"] >= data.R)).all()
    assert ex["pixel_values"].shape == (1, 3, 32, 32)


def test_think_format_and_llava_json(proc, tmp_path):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "Which?"}, {"from": "gpt", "value": "<think>look left</think><answer>B</answer>"}]}]))
    ex = data.encode_record(proc, data.read_records(str(path))[0])
    assert text_of(proc, ex, data.R).startswith(" <think>look left")
    assert text_of(proc, ex, data.A).endswith("answer>B</answer><end_of_utterance>\n")
    assert "pixel_values" not in ex


def test_long_rationale_and_length_policy(proc, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    long = " ".join(["Row 1: a large red circle, nothing."] * 400)
    path = write(tmp_path, "d.jsonl", [{"image": "a.png", "question": "How many?", "rationale": long, "answer": "2"}])
    rec = data.read_records(path)[0]
    ex = data.encode_record(proc, rec, max_len=100000)
    assert (ex["spans"] == data.R).sum() > 2000 and text_of(proc, ex, data.A) == " Answer: 2<end_of_utterance>\n"
    with pytest.raises(data.RecordError, match="too long"):
        data.encode_record(proc, rec, max_len=500)  # rejected whole: the answer is never cut


def test_bad_records_are_counted_or_named(proc, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"junk")
    rows = [{"image": "ok.png", "question": "q", "rationale": "r", "answer": "1"},
            {"image": "missing.png", "question": "q", "rationale": "r", "answer": "1"},
            {"image": "broken.png", "question": "q", "rationale": "r", "answer": "1"},
            {"image": "ok.png", "question": "q", "rationale": "r", "answer": ""},
            {"image": ["ok.png", "ok.png"], "question": "<image> only one place", "rationale": "r", "answer": "1"}]
    path = write(tmp_path, "d.jsonl", rows)
    kept, skipped = data.encode_all(proc, data.read_records(path))
    assert len(kept) == 1
    assert skipped == {"cannot read image": 2, "empty answer": 1, "no <image> place for each image": 1}
    with pytest.raises(data.RecordError, match=r"d.jsonl:2: cannot read image"):
        data.encode_all(proc, data.read_records(path), strict=True)


def test_collate_mixed_image_counts(proc, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    rows = [{"image": ["a.png", "a.png"], "question": "two", "rationale": "r", "answer": "1"},
            {"question": "text only", "rationale": "longer rationale here", "answer": "2"}]
    kept, _ = data.encode_all(proc, data.read_records(write(tmp_path, "d.jsonl", rows)))
    b = data.collate(kept, proc.pad_token_id)
    assert b["pixel_values"].shape[:2] == (2, 2) and (b["pixel_values"][1] == 0).all()
    assert b["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in kept]
    assert (b["spans"][b["attention_mask"] == 0] == 0).all() and (b["labels"][b["attention_mask"] == 0] == -100).all()


def test_synthetic_set(tmp_path):
    train, evaluation = data.make_synthetic(tmp_path, n_train=90, n_eval=30, seed=1)
    tr = [json.loads(l) for l in open(train)]
    ev = [json.loads(l) for l in open(evaluation)]
    top = lambda rs, t: max(sum(r["answer"] == a for r in rs if r["type"] == t) for a in {r["answer"] for r in rs})
    assert top(tr, "compare") / 30 > 0.65  # a text prior: most training compare answers are the same
    twins = {r["twin_of"]: r for r in ev if "twin_of" in r}
    assert len(twins) == 30
    for r in ev:
        if r["id"] in twins:  # same question, different answer, different image
            t = twins[r["id"]]
            assert t["question"] == r["question"] and t["answer"] != r["answer"]
        assert all(0 <= x <= 96 for b in r["boxes"] for x in b)
    assert Image.open(tmp_path / tr[0]["image"]).size == (96, 96)


def test_record_prompt_places_images_once(proc, tmp_path):
    """Training and evaluation build prompts the same way: JSONL images go before the question,
    LLaVA questions keep their own <image> places (never doubled)."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    jsonl = data.read_records(write(tmp_path, "d.jsonl", [{"image": "a.png", "question": "How many?",
                                                             "rationale": "r", "answer": "1"}]))[0]
    (tmp_path / "l.json").write_text(json.dumps([{"image": "a.png", "conversations": [
        {"from": "human", "value": "Look: <image> How many?"}, {"from": "gpt", "value": "r Answer: 1"}]}]))
    llava = data.read_records(str(tmp_path / "l.json"))[0]
    assert data.record_prompt(proc, jsonl) == "<|im_start|>User: <image>How many?<end_of_utterance>\nAssistant:"
    assert data.record_prompt(proc, llava) == "<|im_start|>User: Look: <image> How many?<end_of_utterance>\nAssistant:"
    assert (data.encode_record(proc, llava)["spans"] == data.V).sum() == 4
