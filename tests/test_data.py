"""Records -> batches: spans, labels, the length policy, skipped-record counting, the synthetic set."""
import json
import re

import pytest
import torch
from PIL import Image

import data
from records import read_records
from setting import synthetic


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
    ex = data.encode_record(proc, read_records(path)[0])
    assert (ex["spans"] == data.V).sum() == 4
    assert (ex["input_ids"][ex["spans"] == data.V] == proc.image_token_id).all()
    assert text_of(proc, ex, data.R) == " Row 1: a large red circle."
    assert text_of(proc, ex, data.A) == " Answer: 1<end_of_utterance>\n"
    assert text_of(proc, ex, data.P).endswith("How many red shapes are there?<end_of_utterance>\nAssistant:")
    assert text_of(proc, ex, data.S) == data.chat_head(proc)
    assert ((ex["labels"] != -100) == (ex["spans"] >= data.R)).all()
    assert ex["pixel_values"].shape == (1, 3, 32, 32)


def test_think_format_and_llava_json(proc, tmp_path):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "How many?"},
        {"from": "gpt", "value": "<think>look left</think><answer>B</answer>"}]}]))
    ex = data.encode_record(proc, read_records(str(path))[0])
    head, question = text_of(proc, ex, data.S), text_of(proc, ex, data.P)  # " How" is one token here
    assert data.chat_head(proc).startswith(head)
    assert head + question == data.chat_head(proc) + question.lstrip()
    assert question.lstrip().startswith("How many?")
    assert text_of(proc, ex, data.R).startswith(" <think>look left")
    assert text_of(proc, ex, data.A).endswith("answer>B</answer><end_of_utterance>\n")
    assert "pixel_values" not in ex


def test_long_rationale_and_length_policy(proc, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    long = " ".join(["Row 1: a large red circle, nothing."] * 400)
    path = write(tmp_path, "d.jsonl",
                 [{"image": "a.png", "question": "How many?", "rationale": long, "answer": "2"}])
    rec = read_records(path)[0]
    ex = data.encode_record(proc, rec, max_len=100000)
    assert (ex["spans"] == data.R).sum() > 2000
    assert text_of(proc, ex, data.A) == " Answer: 2<end_of_utterance>\n"
    with pytest.raises(data.RecordError, match="too long"):
        data.encode_record(proc, rec, max_len=500)  # rejected whole: the answer is never cut


def test_bad_records_are_counted_or_named(proc, tmp_path):
    """One rule for every record that cannot be used: skipped and counted by reason, the first few
    named by file:line; strict stops at the first with that message."""
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"junk")
    ok = {"image": "ok.png", "question": "q", "rationale": "r", "answer": "1"}
    lines = [json.dumps(ok),
             json.dumps({**ok, "image": "missing.png"}),
             json.dumps({**ok, "image": "broken.png"}),
             json.dumps({**ok, "answer": ""}),
             json.dumps({**ok, "image": ["ok.png", "ok.png"], "question": "<image> only one place"}),
             '{"image": "ok.png", "question": "q"',                     # cut off: bad JSON
             json.dumps({k: v for k, v in ok.items() if k != "question"}),
             json.dumps([ok]),                                          # not an object
             json.dumps({**ok, "image": 3}),
             json.dumps({**ok, "answer": 0})]                           # 0 is an answer
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    skips = data.Skips()
    records = read_records(str(path), skips)
    kept = data.encode_all(proc, records, skips=skips)
    assert len(kept) == 2
    assert skips == {"cannot read image": 2, "no answer": 1,
                     "no <image> place for each image": 1, "bad JSON": 1, "not an object": 1,
                     "no question": 1, "bad image field": 1}
    assert skips.examples[0].startswith(f"{path}:4: no answer") and len(skips.examples) == 3
    assert "8 skipped (cannot read image: 2, no answer: 1" in str(skips)
    assert f"{path}:6: bad JSON" in str(skips)
    with pytest.raises(data.RecordError, match=r"d.jsonl:2: cannot read image"):
        data.encode_all(proc, read_records(str(path), data.Skips()), skips=data.Skips(strict=True))
    with pytest.raises(data.RecordError, match=r"d.jsonl:4: no answer"):
        read_records(str(path))  # no Skips given: strict


def test_bad_llava_records(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "How many?"},
                           {"from": "gpt", "value": "look Answer: B"}]},
        {"conversations": [{"from": "human", "value": "How many?"}]},
        # no gpt turn
        {"conversations": [{"from": "gpt", "value": "Answer: B"}]},
        # no question
        {"conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "B"}]},
        # no marker
        {"image": "x.png"}, "text"]))
    skips = data.Skips()
    records = read_records(str(path), skips)
    assert [r["answer"] for r in records] == ["B"]
    assert skips == {"no user turn then assistant reply": 2, "no answer": 1, "unknown record shape": 1,
                     "not an object": 1}
    assert "l.json:record 2: no user turn then assistant reply" in skips.examples[0]
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(data.DataError, match="l.json: expected a JSON list"):
        read_records(str(path), data.Skips())
    path.write_text("[{")
    with pytest.raises(data.DataError, match="l.json: not valid JSON"):
        read_records(str(path), data.Skips())
    with pytest.raises(FileNotFoundError, match="nope.jsonl: data file not found"):
        read_records(str(tmp_path / "nope.jsonl"))


def test_collate_mixed_image_counts(proc, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    rows = [{"image": ["a.png", "a.png"], "question": "two", "rationale": "r", "answer": "1"},
            {"question": "text only", "rationale": "longer rationale here", "answer": "2"}]
    kept = data.encode_all(proc, read_records(write(tmp_path, "d.jsonl", rows)))
    b = data.collate(kept, proc.pad_token_id)
    assert b["pixel_values"].shape[:2] == (2, 2) and (b["pixel_values"][1] == 0).all()
    assert b["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in kept]
    assert (b["spans"][b["attention_mask"] == 0] == 0).all()
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()


def read_grid(path, grid=3):
    """The cells of a synthetic image read back from its pixels: (colour, kind, size) or None. The
    centre pixel gives the colour; a point 0.3 cells below the centre is inside only large shapes;
    points near the corners of the shape's box tell a square (top left filled) from a triangle
    (bottom left only) from a circle (neither)."""
    im = Image.open(path).convert("RGB")
    cell = im.size[0] / grid
    colour_of = {v: k for k, v in synthetic.COLOURS.items()}
    cells = []
    for r in range(grid):
        for c in range(grid):
            cx, cy = (c + 0.5) * cell, (r + 0.5) * cell
            at = lambda dx, dy: im.getpixel((int(cx + dx), int(cy + dy)))
            if at(0, 0) not in colour_of:
                cells.append(None)
                continue
            large = at(0, 0.3 * cell) != (235, 235, 235)
            h = cell * (0.4 if large else 0.22)
            kind = ("square" if at(-0.85 * h, -0.85 * h) != (235, 235, 235) else
                    "triangle" if at(-0.7 * h, 0.8 * h) != (235, 235, 235) else "circle")
            cells.append((colour_of[at(0, 0)], kind, "large" if large else "small"))
    return cells


def grid_answer(cells, q):
    """A grid-family question's answer on cells (read_grid's), from the question's words alone -> the
    answer and the cells (indices) it rests on."""
    where = lambda *kinds: [i for i, c in enumerate(cells) if c is not None and c[1] in kinds]
    if m := re.match(r"How many (\w+)s are", q):
        return str(len(where(m[1]))), where(m[1])
    if m := re.match(r"Are there more (\w+)s than (\w+)s", q):
        return "yes" if len(where(m[1])) > len(where(m[2])) else "no", where(m[1], m[2])
    row, col = map(int, re.findall(r"row (\d), column (\d)", q)[0])
    return cells[(row - 1) * 3 + col - 1][0], [(row - 1) * 3 + col - 1]


def test_synthetic_set(tmp_path):
    """Every answer and every rationale agrees with what the rendered image shows; the training
    answers carry a prior; each evaluation item has a twin with the same question and another answer."""
    train, evaluation = synthetic.make_synthetic(tmp_path, n_train=90, n_eval=30, seed=1, image_size=192)
    tr = [json.loads(l) for l in open(train)]
    ev = [json.loads(l) for l in open(evaluation)]
    for r in tr + ev:
        cells = read_grid(tmp_path / r["image"])
        said = re.findall(r"(nothing|a (\w+) (\w+) (\w+))", r["rationale"].split(" So ")[0])

        want, looked_at = grid_answer(cells, r["question"])
        assert r["answer"] == want, (r["id"], r["question"])
        said = [None if s[0] == "nothing" else (s[2], s[3], s[1]) for s in said]
        assert said == cells[:len(said)]
        assert len(said) == (9 if r["type"] != "cell" else looked_at[0] + 1), r["id"]
        # x0 y0 x1 y1
        cell_of_box = lambda b: int((b[1] + b[3]) / 2 // 64) * 3 + int((b[0] + b[2]) / 2 // 64)
        assert sorted(map(cell_of_box, r["boxes"])) == looked_at, r["id"]
    top = lambda rs, t: max(sum(r["answer"] == a for r in rs if r["type"] == t)
                            for a in {r["answer"] for r in rs})
    assert top(tr, "compare") / 30 > 0.65 and top(tr, "count") / 30 > 0.45  # the text prior
    twins = {r["twin_of"]: r for r in ev if "twin_of" in r}
    assert len(twins) == 30
    for r in ev:
        if r["id"] in twins:  # same question, different answer, different image
            t = twins[r["id"]]
            assert t["question"] == r["question"] and t["answer"] != r["answer"]


def test_wording_family(tmp_path):
    """The wording family against a solver that reads the rendered pixels and the question's words:
    every answer; the rationale says what the image shows (the cell's shape, the two counts, the
    colours of the kind asked about) and never the answer word; the boxes are the cells the answer
    rests on; training leans one way per type, eval is balanced, and each eval item's twin has the
    same question and the other answer."""
    train, evaluation = synthetic.make_synthetic(tmp_path, n_train=150, n_eval=150, seed=2, image_size=192,
                                                 family="wording")
    tr = [json.loads(l) for l in open(train)]
    ev = [json.loads(l) for l in open(evaluation)]
    plural = lambda n, k: f"{n} {k}{'s' * (n != 1)}"
    for r in tr + ev:
        cells, q = read_grid(tmp_path / r["image"]), r["question"]
        where = lambda kind, colour=None: [i for i, c in enumerate(cells)
                                           if c and c[1] == kind and colour in (None, c[0])]
        if m := re.fullmatch(r"Is the shape in row (\d), column (\d) (not )?a (\w+)\?", q):
            i = (int(m[1]) - 1) * 3 + int(m[2]) - 1
            want, looked_at = ("yes" if (cells[i][1] == m[4]) != bool(m[3]) else "no"), [i]
            said = f"Row {m[1]}, column {m[2]} holds a {cells[i][2]} {cells[i][0]} {cells[i][1]}."
        elif m := re.fullmatch(r"Which are there (more|fewer) of, (\w+)s or (\w+)s\?", q):
            a, b = len(where(m[2])), len(where(m[3]))
            assert a != b, r["id"]  # no tie, twins included: "which" has one answer
            want = m[2] if (a > b) == (m[1] == "more") else m[3]
            looked_at = sorted(where(m[2]) + where(m[3]))
            said = f"I count {plural(a, m[2])} and {plural(b, m[3])}."
        else:
            m = re.fullmatch(r"Is there (no|a) (\w+) (\w+)\?", q)
            there = bool(where(m[3], m[2]))
            want = "yes" if there != (m[1] == "no") else "no"
            looked_at = where(m[3], m[2]) or where(m[3])
            colours = sorted({cells[i][0] for i in where(m[3])})
            said = f"The {m[3]}s are {' and '.join(colours)}." if colours else f"I count 0 {m[3]}s."
        assert r["answer"] == want and r["rationale"] == said, (r["id"], q, r["rationale"])
        assert not re.search(r"\b(yes|no|not)\b", said)  # the answer takes the question's words
        cell_of_box = lambda b: int((b[1] + b[3]) / 2 // 64) * 3 + int((b[0] + b[2]) / 2 // 64)
        assert sorted(map(cell_of_box, r["boxes"])) == sorted(looked_at), r["id"]
    share = lambda rs, t, lean: sum(lean(r) for r in rs if r["type"] == t) / sum(r["type"] == t for r in rs)
    first_named = lambda r: r["answer"] == re.search(r"of, (\w+)s", r["question"])[1]
    for t, lean in (("is_cell", lambda r: r["answer"] == "yes"), ("exists", lambda r: r["answer"] == "yes"),
                    ("which_more", first_named)):
        originals = [r for r in ev if "twin_of" not in r]  # (each twin has the other answer)
        assert share(tr, t, lean) > 0.6 and 0.35 < share(originals, t, lean) < 0.62, t
    by_id = {r["id"]: r for r in ev}
    twins = [(by_id[r["twin_of"]], r) for r in ev if "twin_of" in r]
    assert len(twins) == 150 and all(a["question"] == b["question"] and a["answer"] != b["answer"]
                                    for a, b in twins)
    with pytest.raises(ValueError, match="family 'words'"):
        synthetic.make_synthetic(tmp_path, 3, 3, family="words")


def test_synthetic_set_is_made_once_for_its_settings(tmp_path, monkeypatch):
    """make_once: a set cut short (Ctrl-C in its eval split) is made again whole, not trusted; a whole
    one is reused untouched; one made with other settings (n, n_eval, seed, family) is refused by
    name, left as it is."""
    real, calls = synthetic.image_record, []

    def dies_in_the_eval_split(out_dir, name, *a, **kw):
        calls.append(name)
        if name == "eval00001":
            raise KeyboardInterrupt
        return real(out_dir, name, *a, **kw)
    monkeypatch.setattr(synthetic, "image_record", dies_in_the_eval_split)
    with pytest.raises(KeyboardInterrupt):
        synthetic.make_once(str(tmp_path), 6, 4, seed=1)
    monkeypatch.setattr(synthetic, "image_record", real)
    assert len(open(tmp_path / "eval.jsonl").readlines()) < 8  # the truncated split, no marker
    assert synthetic.make_once(str(tmp_path), 6, 4, seed=1)
    whole = {f: open(tmp_path / f).read() for f in ("train.jsonl", "eval.jsonl", "eval_text.jsonl")}
    assert len(whole["eval.jsonl"].splitlines()) == 8 and len(whole["train.jsonl"].splitlines()) == 6
    fresh = tmp_path / "fresh"
    synthetic.make_synthetic(str(fresh), 6, 4, seed=1)
    assert whole["eval.jsonl"] == open(fresh / "eval.jsonl").read()  # the same set an unbroken run makes
    assert not synthetic.make_once(str(tmp_path), 6, 4, seed=1)
    for flags in (dict(n_train=7), dict(n_eval=5), dict(seed=2), dict(family="wording")):
        settings = {**dict(n_train=6, n_eval=4, seed=1, family="grid"), **flags}
        with pytest.raises(ValueError, match=r"holds a synthetic set made with \{'n_train': 6, 'n_eval': 4, "
                           r"'seed': 1, 'family': 'grid'\}, not"):
            synthetic.make_once(str(tmp_path), **settings)
    assert whole == {f: open(tmp_path / f).read() for f in whole}


def test_record_prompt_places_images_once(proc, tmp_path):
    """Training and evaluation build prompts the same way: JSONL images go before the question,
    LLaVA questions keep their own <image> places (never doubled)."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    jsonl = read_records(write(tmp_path, "d.jsonl", [{"image": "a.png", "question": "How many?",
                                                             "rationale": "r", "answer": "1"}]))[0]
    (tmp_path / "l.json").write_text(json.dumps([{"image": "a.png", "conversations": [
        {"from": "human", "value": "Look: <image> How many?"}, {"from": "gpt", "value": "r Answer: 1"}]}]))
    llava = read_records(str(tmp_path / "l.json"))[0]
    assert data.record_prompt(proc, jsonl) == \
        "<|im_start|>User: <image>How many?<end_of_utterance>\nAssistant:"
    assert data.record_prompt(proc, llava) == \
        "<|im_start|>User: Look: <image> How many?<end_of_utterance>\nAssistant:"
    assert (data.encode_record(proc, llava)["spans"] == data.V).sum() == 4


# --- the ecosystem's format: LLaMA-Factory / ms-swift / TRL records with messages and images

def test_llama_factory_demo_layout_trains_on_the_last_turn(proc, tmp_path):
    """LLaMA-Factory's mllm_demo.json layout: a JSON list, two user turns with an <image> each, the
    images listed beside the messages. The last assistant turn is the reply (R and A, the only
    labels); the first exchange is prompt, rendered by the chat template before the question."""
    for name in ("1.png", "2.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / name)
    (tmp_path / "demo.json").write_text(json.dumps([{
        "messages": [{"content": "<image>Who are they?", "role": "user"},
                     {"content": "Two players. Answer: players", "role": "assistant"},
                     {"content": "What are they doing?<image>", "role": "user"},
                     {"content": "They hold a cup. Answer: celebrating", "role": "assistant"}],
        "images": ["1.png", "2.png"]}]))
    rec = read_records(str(tmp_path / "demo.json"))[0]
    assert rec["question"] == "What are they doing?<image>" and rec["answer"] == "celebrating"
    assert rec["images"] == [str(tmp_path / "1.png"), str(tmp_path / "2.png")] and "system" not in rec
    assert rec["history"] == [{"role": "user", "text": "<image>Who are they?"},
                              {"role": "assistant", "text": "Two players. Answer: players"}]
    assert data.record_prompt(proc, rec) == (
        "<|im_start|>User: <image>Who are they?<end_of_utterance>\nAssistant: Two players. Answer: players"
        "<end_of_utterance>\nUser: What are they doing?<image><end_of_utterance>\nAssistant:")
    ex = data.encode_record(proc, rec)
    assert (ex["spans"] == data.V).sum() == 8  # both images, 4 tokens each
    assert text_of(proc, ex, data.R) == " They hold a cup."
    assert text_of(proc, ex, data.A).startswith(" Answer: celebrating")
    labelled = proc.tokenizer.decode(ex["labels"][ex["labels"] != -100].tolist(), skip_special_tokens=False)
    assert "Two players" not in labelled and labelled.startswith(" They hold a cup.")


def test_typed_parts_and_a_system_message(proc, tmp_path):
    """TRL's content lists ({type: image}, {type: text}) in JSONL, with a system message: the S span
    (AVAR's "system") is the system message and the scaffolding before the user's content."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    path = write(tmp_path, "trl.jsonl", [{
        "messages": [{"role": "system", "content": [{"type": "text", "text": "Count carefully."}]},
                     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]},
                     {"role": "assistant",
                      "content": [{"type": "text", "text": "<think>one</think><answer>1</answer>"}]}],
        "images": ["a.png"], "type": "count"}])
    rec = read_records(path)[0]
    assert rec["question"] == "<image>How many?" and rec["answer"] == "1"
    assert rec["system"] == "Count carefully."
    assert rec["type"] == "count"  # other fields are kept
    assert data.record_prompt(proc, rec) == ("<|im_start|>System: Count carefully.<end_of_utterance>\n"
                                             "User: <image>How many?<end_of_utterance>\nAssistant:")
    ex = data.encode_record(proc, rec)
    assert text_of(proc, ex, data.S) == "<|im_start|>System: Count carefully.<end_of_utterance>\nUser: "
    assert text_of(proc, ex, data.A).startswith("<answer>1</answer>")


def test_prompt_completion_and_the_answer_is(proc, tmp_path):
    """TRL's conversational prompt/completion, and a reply whose answer follows "the answer is"."""
    path = write(tmp_path, "pc.jsonl", [{
        "prompt": [{"role": "user", "content": "Is the sky blue?"}],
        "completion": [{"role": "assistant", "content": "It looks so, so the answer is yes."}]}])
    rec = read_records(path)[0]
    assert rec["answer"] == "yes." and rec["images"] == [] and rec["reply"].endswith("the answer is yes.")
    ex = data.encode_record(proc, rec)
    assert text_of(proc, ex, data.R) == " It looks so, so"
    assert text_of(proc, ex, data.A).startswith(" the answer is")


def test_bad_messages_records_are_skipped_and_counted(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    user = {"role": "user", "content": "<image>How many?"}
    reply = {"role": "assistant", "content": "One. Answer: 1"}
    rows = [{"messages": [user, reply], "images": ["a.png"]},                         # fine
            {"messages": [user, reply], "images": ["a.png", "a.png"]},                # 1 tag, 2 images
            {"messages": [{"role": "user", "content": "How many?"}, reply], "images": ["a.png"]},  # no tag
            {"messages": [user, {"role": "assistant", "content": "One."}], "images": ["a.png"]},
            # no answer
            {"messages": [user], "images": ["a.png"]},                                # no reply
            {"messages": [{"role": "robot", "content": "hi"}, reply]},                # bad role
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}, reply]},  # bad part
            {"prompt": "How many?", "completion": [reply]}]                          # not messages
    skips = data.Skips()
    records = read_records(write(tmp_path, "m.jsonl", rows), skips)
    assert len(records) == 1 and records[0]["answer"] == "1"
    assert skips == {"<image> tags do not match images": 2, "no answer": 1,
                     "no user turn then assistant reply": 1,
                     "bad role": 1, "bad content": 1, "bad messages": 1}
    assert any("m.jsonl:2: <image> tags do not match images (1 tags, 2 images)" in e for e in skips.examples)


def test_batch_encoding_gives_the_ids_one_at_a_time_does(tmp_path):
    """encode_all (the tokenizer's batch encoding) against encode_record on each record: the same
    ids, spans, labels and pixels, on the synthetic set and a messages record with a system turn."""
    synthetic.make_synthetic(str(tmp_path), 40, 2, seed=3)
    recs = read_records(synthetic.paths(str(tmp_path))[0])
    recs.append({"question": "How many?", "images": [], "reply": "One. Answer: 1", "source": "x:1",
                 "system": "Count.", "history": [{"role": "system", "text": "Count."}]})
    proc = data.new_processor([r["question"] + " " + r["reply"] for r in recs], tile=96, image_seq_len=9,
                              vocab_size=400)
    batched = data.encode_all(proc, recs)
    assert len(batched) == len(recs)
    for rec, got in zip(recs, batched):
        want = data.encode_record(proc, rec)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_remembering_images_decodes_and_tiles_each_image_once(proc, tmp_path, monkeypatch):
    """Inside data.remembering_images a path is opened once and its image tiled once, however many
    times the processor and the record encoder read it, with the same pixels as outside; outside, or
    past the byte budget, every read decodes and tiles again."""
    for i in range(2):
        Image.new("RGB", (40 + 8 * i, 32), (60 * i, 90, 30)).save(tmp_path / f"{i}.png")
    paths = [str(tmp_path / f"{i}.png") for i in range(2)]
    opened, tiled, real_open, real_tiles = [], [], Image.open, proc.image_processor.tiles
    monkeypatch.setattr(data.Image, "open", lambda p, *a: opened.append(p) or real_open(p, *a))
    monkeypatch.setattr(proc.image_processor, "tiles", lambda im: tiled.append(im.size) or real_tiles(im))
    rec = {"question": "How many?", "reply": "Row 1: one. Answer: 1", "images": paths[:1], "source": "t:1"}

    def read_all():
        texts = ["<image>q", "<image>r"]
        a, b = proc(texts, [paths[:1], paths[1:]]), proc(texts, [paths[:1], paths[1:]])
        return a, b, data.encode_record(proc, rec)
    plain = read_all()
    assert len(opened) == 5 and len(tiled) == 5
    for budget, opens in ((0, 5), (2**30, 2)):
        opened.clear()
        tiled.clear()
        with data.remembering_images(budget):
            again = read_all()
        assert len(opened) == opens and len(tiled) == opens, (budget, opened, tiled)
        assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(plain, again))
    opened.clear()
    read_all()
    assert len(opened) == 5  # the memory ends with the block
    decoded = 40 * 32 * 3 + 48 * 32 * 3 - 1
    opened.clear()
    tiled.clear()
    with data.remembering_images(decoded):  # room for the first image decoded: not the second, no tiles
        read_all()
        with data.remembering_images(0):
            read_all()  # an inner block keeps nothing; the outer one is back after it
        read_all()
    # reads per read_all: the first image 3 times, the second 2 times
    assert opened.count(paths[0]) == 1 + 3 + 0 and opened.count(paths[1]) == 2 + 2 + 2
    assert tiled.count((40, 32)) == 3 * 3 and tiled.count((48, 32)) == 3 * 2
    other = data.new_processor(["a b c"] * 5, tile=48, image_seq_len=4, vocab_size=300)
    with data.remembering_images():  # one image, two processors: each gets its own tiles
        a, b = proc(["<image>q"], [paths[:1]]), other(["<image>q"], [paths[:1]])
    assert a["pixel_values"].shape[-1] == 32 and b["pixel_values"].shape[-1] == 48


def test_wording_family_redraws_an_empty_grid():
    """A grid drawn with no shape at all (0.35^9 of draws: a 20,000-record set meets one) is redrawn
    for a cell question, not a crash."""
    import numpy as np

    class EmptyFirst:  # the first nine cells come out empty, then the real generator
        def __init__(self):
            self.rng, self.calls = np.random.default_rng(0), 0

        def random(self):
            self.calls += 1
            return 0.0 if 2 <= self.calls <= 10 else self.rng.random()  # call 1 draws the answer's lean

        def __getattr__(self, name):
            return getattr(self.rng, name)
    grid, q = synthetic._wording_sample(EmptyFirst(), "is_cell", skewed=False)
    r, c = q["cell"]
    assert grid[r][c] is not None
