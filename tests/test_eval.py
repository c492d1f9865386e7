"""Answer extraction and scoring on hand-written cases (REFERENCE.md section 4), and each measure of
evaluate() on a case whose value is known (a stub generator stands in for the model)."""
import pytest

import eval as eval_mod

CHOICES = ["A. red", "B. green", "C. blue"]


@pytest.mark.parametrize("reply,answer", [
    ("Row 1: a circle. So 2 circles. Answer: 2", "2"),
    ("step one. Answer: no. Answer: yes.", "yes"),                       # the last marker counts
    ("<think>look left</think><answer> B </answer>", "B"),
    ("I looked, and the answer is: green.", "green"),
    ("So the answer is 7", "7"),
    ("B", "B"),                                                          # a direct answer
    ("", ""),
])
def test_extract_answer(reply, answer):
    assert eval_mod.extract_answer(reply) == answer


@pytest.mark.parametrize("pred,gold,choices,correct,readable", [
    ("(B)", "B", CHOICES, True, True),
    ("B.", "B", CHOICES, True, True),
    ("B) green", "B", CHOICES, True, True),
    ("the answer is b", "B", CHOICES, False, False),                     # lower-case b is not an option letter
    ("it is a green one", "B", CHOICES, True, True),                     # "a" is an article; "green" names B
    ("A or B", "B", CHOICES, False, False),                              # two letters: unreadable
    ("red and green", "B", CHOICES, False, False),                       # two option texts: unreadable
    ("D", "B", CHOICES, False, False),                                   # no option D
    ("blue", "blue", CHOICES, True, True),                               # option text names C; so does the gold
    ("b", "B", CHOICES, True, True),                                     # a bare letter in any case
    ("19", "20", None, False, True),                                     # counting is exact
    ("20", "20", None, True, True),
    ("20 circles", "20", None, True, True),
    ("0", "0", None, True, True),
    ("1", "0", None, False, True),
    ("2 or 3", "3", None, False, False),                                 # two numbers: unreadable
    ("many", "3", None, False, False),
    ("19.2", "20.0", None, True, True),                                  # non-integer gold: within 5%
    ("18.9", "20.5", None, False, True),
    ("1,000", "1000", None, True, True),
    ("Yes", "yes", None, True, True),
    ("no", "yes", None, False, True),
    ("", "yes", None, False, False),
])
def test_scoring_table(pred, gold, choices, correct, readable):
    assert eval_mod.is_correct(pred, gold, choices) is correct
    assert (eval_mod.parse_answer(pred, gold, choices) is not None) is readable


def test_gold_option_text_is_matched_to_its_letter():
    assert eval_mod.is_correct("C", "blue", CHOICES) and not eval_mod.is_correct("A", "blue", CHOICES)


def test_bootstrap_interval():
    lo, hi = eval_mod.bootstrap_ci([1] * 70 + [0] * 30)
    assert lo < 0.7 < hi and 0.14 < hi - lo < 0.22  # the normal approximation: 2 * 1.96 * sqrt(.7 * .3 / 100) = 0.18
    assert eval_mod.bootstrap_ci([1, 1, 1]) == (1.0, 1.0) and eval_mod.bootstrap_ci([]) is None


def records():
    """Two items with their twins, the twin of a third whose original was cut off (--eval-limit)."""
    r = lambda i, answer, t="count", **kw: {"id": i, "question": "How many?", "answer": answer, "type": t,
                                             "images": [], "source": f"f:{i}", **kw}
    return [r("a", "2"), r("ab", "3", twin_of="a"), r("b", "yes", "compare"), r("bb", "no", "compare", twin_of="b"),
            r("cb", "1", twin_of="c")]


def test_measures_on_a_stub_that_always_answers_the_prior(monkeypatch):
    """A model that answers the training prior ("1" for counts, "yes" for compare) without looking:
    prior agreement 1, accuracy = where the prior happens to be right, no pair consistent."""
    train = [{"type": "count", "answer": "1"}] * 3 + [{"type": "compare", "answer": "yes"}] * 2
    prior = {"count": "So 1. Answer: 1", "compare": "Answer: yes"}
    monkeypatch.setattr(eval_mod, "generate_answers", lambda m, p, recs, *a, **kw: [prior[r["type"]] for r in recs])
    ev = eval_mod.evaluate(None, None, records(), train, commitment=False)
    assert ev["accuracy_cot"] == pytest.approx(2 / 5) and ev["text_prior_accuracy"] == pytest.approx(2 / 5)
    assert ev["prior_agreement"] == 1.0 and ev["unparseable"] == 0
    assert ev["counterfactual_consistency"] == 0.0  # pairs a/ab and b/bb; cb has no original: left out
    assert ev["accuracy_by_type"] == {"count": pytest.approx(1 / 3), "compare": 0.5}


def test_measures_on_a_stub_that_reads_the_answer(monkeypatch):
    monkeypatch.setattr(eval_mod, "generate_answers",
                        lambda m, p, recs, *a, **kw: [f"Answer: {r['answer']}" if r["id"] != "bb" else "" for r in recs])
    ev = eval_mod.evaluate(None, None, records(), [{"type": "count", "answer": "1"}], commitment=False)
    assert ev["accuracy_cot"] == pytest.approx(4 / 5) and ev["unparseable"] == 1
    assert ev["counterfactual_consistency"] == 0.5 and ev["prior_agreement"] == 0.0


@pytest.fixture(scope="module")
def proc():
    import data
    return data.new_processor(["Row 1: a red circle. Row 2: nothing. So 2 circles. Answer: 2"] * 30,
                              tile=32, image_seq_len=4, vocab_size=300)


RATIONALE = "Row 1: a red circle. Row 2: nothing. Row 3: a blue square. So 2 circles."


def stub_generator(forced_answer):
    """The CoT pass writes RATIONALE and the gold answer; a forced pass answers forced_answer(reply, gold)."""
    def generate(model, proc, recs, batch_size=64, max_new_tokens=160, replies=None, log=None):
        if replies is None:
            return [f" {RATIONALE} Answer: {r['answer']}" for r in recs]
        assert all(reply.startswith(" ") and reply.endswith(" Answer:") for reply in replies)
        return [forced_answer(reply, r["answer"]) for reply, r in zip(replies, recs)]
    return generate


def test_early_commitment_of_a_model_that_decides_late(monkeypatch, proc):
    """Forced answers right only once the whole rationale is there: agreement and accuracy 0 at
    0-75% and 1 at 100%; the 0% reply is the answer marker alone."""
    seen = []

    def late(reply, gold):
        seen.append(reply)
        return f" {gold}" if "So 2 circles." in reply else " 0"
    monkeypatch.setattr(eval_mod, "generate_answers", stub_generator(late))
    recs = [r for r in records() if r["type"] == "count"]
    ec = eval_mod.early_commitment(None, proc, recs, [f" {RATIONALE} Answer: {r['answer']}" for r in recs])
    assert ec == {"cuts": [0, 25, 50, 75, 100], "agreement": [0, 0, 0, 0, 1], "accuracy": [0, 0, 0, 0, 1]}
    assert seen[0] == " Answer:" and seen[-1] == f" {RATIONALE} Answer:"
    assert all(RATIONALE.startswith(s[1:-len(" Answer:")]) for s in seen)  # each cut is a prefix of the rationale


def test_early_commitment_of_a_model_that_decided_before_reasoning(monkeypatch, proc):
    """Forced answers already final at 0%: agreement 1 at every cut; through evaluate()."""
    monkeypatch.setattr(eval_mod, "generate_answers", stub_generator(lambda reply, gold: f" {gold}."))
    ev = eval_mod.evaluate(None, proc, records(), [{"type": "count", "answer": "1"}])
    assert ev["early_commitment"]["agreement"] == [1.0] * 5 and ev["early_commitment"]["accuracy"] == [1.0] * 5
    assert set(ev["seconds"]) == {"cot", "direct", "masses", "commitment", "occlusion", "heatmaps"}
    assert ev["where_it_looks"] is None and ev["heatmaps"] == []  # no layers


def test_control_boxes_have_the_same_size_and_avoid_the_evidence():
    import numpy as np
    rng, evidence = np.random.default_rng(0), [(0, 0, 32, 32), (32, 64, 64, 96)]
    for _ in range(50):
        boxes = eval_mod.control_boxes(evidence, 96, 96, rng)
        assert [(b[2] - b[0], b[3] - b[1]) for b in boxes] == [(32, 32), (32, 32)]
        assert all(0 <= b[0] and b[2] <= 96 and 0 <= b[1] and b[3] <= 96 for b in boxes)
        assert not any(c[0] < e[2] and e[0] < c[2] and c[1] < e[3] and e[1] < c[3] for c in boxes for e in evidence)
    assert eval_mod.control_boxes([(0, 0, 96, 96)], 96, 96, rng) is None  # no room elsewhere


def test_occlusion_on_a_stub_that_reads_one_region(monkeypatch, tmp_path):
    """The stub answers the colour at the centre of the evidence box: greying the evidence changes
    every answer, greying as much area elsewhere changes none; records without boxes are left out."""
    from PIL import Image
    im = Image.new("RGB", (96, 96), (255, 255, 255))
    im.paste((255, 0, 0), (0, 0, 32, 32))
    im.save(tmp_path / "a.png")
    recs = [{"id": f"r{i}", "question": "Colour?", "answer": "red", "type": "cell", "source": f"f:{i}",
             "images": [str(tmp_path / "a.png")], "boxes": [[0, 0, 32, 32]]} for i in range(6)]
    recs.append({"id": "nobox", "question": "Colour?", "answer": "red", "type": "cell", "source": "f:7",
                 "images": [str(tmp_path / "a.png")]})

    def reads_the_box(model, proc, records, *args, **kw):
        pixel = lambda r: Image.open(r["images"][0]).getpixel((16, 16)) if isinstance(r["images"][0], str) \
            else r["images"][0].getpixel((16, 16))
        return [f"Answer: {'red' if pixel(r) == (255, 0, 0) else 'grey'}" for r in records]
    monkeypatch.setattr(eval_mod, "generate_answers", reads_the_box)
    got = eval_mod.occlusion(None, None, recs, ["Answer: red"] * len(recs))
    assert got == {"n": 6, "evidence_changed": 1.0, "control_changed": 0.0}
    assert eval_mod.occluded(str(tmp_path / "a.png"), [[0, 0, 32, 32]]).getpixel((31, 31)) == eval_mod.GREY
    assert Image.open(tmp_path / "a.png").getpixel((16, 16)) == (255, 0, 0)  # the file is untouched


def test_table_shows_every_measure(monkeypatch):
    monkeypatch.setattr(eval_mod, "generate_answers", stub_generator(lambda reply, gold: f" {gold}."))
    ev = eval_mod.evaluate(None, None, records(), [{"type": "count", "answer": "1"}], commitment=False)
    text = eval_mod.table({"sft": {**ev, "wall_seconds": 1.5}, "attcot": {**ev, "wall_seconds": 2.0}})
    assert text.splitlines()[0].split() == ["sft", "attcot"] and "accuracy_cot_ci95" in text
    assert [l.split()[-1] for l in text.splitlines() if l.startswith("wall_seconds")] == ["2.000"]
    assert sum(l.startswith("forced at") for l in text.splitlines()) == 5  # '-' where a measure was not taken


def test_direct_prompting_on_a_stub_that_needs_its_rationale(monkeypatch):
    """Right with its rationale; asked for the answer alone it says the prior's answer: accuracy_direct
    is where the prior is right, and the direct prompt carries the instruction."""
    asked = []

    def generate(model, proc, recs, *a, **kw):
        asked.extend(r["question"] for r in recs)
        prior = {"count": "1", "compare": "yes"}
        return [prior[r["type"]] if r["question"].endswith(eval_mod.DIRECT) else f"Looked. Answer: {r['answer']}" for r in recs]
    monkeypatch.setattr(eval_mod, "generate_answers", generate)
    ev = eval_mod.evaluate(None, None, records(), [{"type": "count", "answer": "1"}], commitment=False)
    assert ev["accuracy_cot"] == 1.0 and ev["accuracy_direct"] == pytest.approx(2 / 5)  # "yes" for b, "1" for cb
    assert ev["unparseable_direct"] == 0 and ev["accuracy_direct_ci95"][0] < 0.4 < ev["accuracy_direct_ci95"][1]
    assert asked == ["How many?"] * 5 + ["How many?" + eval_mod.DIRECT] * 5


def hand_result(scale, image):
    """An evaluate() result with every measure, numbers made up (scaled per model)."""
    return {"n": 10, "accuracy_cot": 0.8 * scale, "accuracy_cot_ci95": (0.5 * scale, 0.95 * scale),
            "accuracy_direct": 0.4 * scale, "accuracy_direct_ci95": (0.2, 0.6), "unparseable": 0, "unparseable_direct": 1,
            "reply_tokens": {"cot": 60.0, "direct": 3.0}, "text_prior_accuracy": 0.3, "prior_agreement": 0.5,
            "counterfactual_consistency": 0.7, "vas_rationale": 0.5 * scale, "wall_seconds": 3.0,
            "where_it_looks": {w: {"layers": [0, 1, 2], "image_mass_by_layer": [0.1, 0.5 * scale, 0.9],
                                   "image_mass_along_rationale": [0.6 - 0.05 * i for i in range(10)],
                                   "answer_mass_on_rationale": 0.5, "answer_mass_on_image": 0.4, "n": 10}
                               for w in ("gold", "own")},
            "early_commitment": {"cuts": [0, 25, 50, 75, 100], "agreement": [0.1, 0.2, 0.3, 0.5, 1.0],
                                 "accuracy": [0.1, 0.2, 0.3, 0.5, 0.8]},
            "occlusion": {"n": 8, "evidence_changed": 0.6, "control_changed": 0.2},
            "heatmaps": [{"image": image, "question": "How many?", "boxes": [(0, 0, 48, 48), (48, 0, 96, 48),
                                                                             (0, 48, 48, 96), (48, 48, 96, 96)],
                          "steps": [{"text": "Row 1: a red circle.", "image_mass": 0.6, "weights": [0.3, 0.3, 0, 0]},
                                    {"text": "Answer: 1", "image_mass": 0.4, "weights": [0.1, 0.1, 0.1, 0.1]}]}],
            "seconds": {"cot": 1.0, "direct": 0.5}, "items_per_second": {"cot": 10.0, "direct": 20.0}}


def test_report_files_and_pictures(tmp_path):
    """write_report: report.json (every number back), report.md (the table, each picture, the time),
    and PNGs that open at their sizes; the heatmap paints the attended cells brighter."""
    import json
    from PIL import Image
    im = Image.new("RGB", (96, 96), (200, 200, 200))
    im.save(tmp_path / "item.png")
    results = {"sft": hand_result(1.0, str(tmp_path / "item.png")), "attcot": hand_result(1.1, str(tmp_path / "item.png"))}
    path = eval_mod.write_report(results, str(tmp_path / "rep"), {"data": "eval.jsonl"})
    md = open(path).read()
    back = json.load(open(tmp_path / "rep" / "report.json"))
    assert back["results"]["attcot"]["accuracy_cot"] == pytest.approx(0.88) and back["meta"] == {"data": "eval.jsonl"}
    assert "| measure | sft | attcot |" in md and "| accuracy_direct | 0.400 | 0.440 |" in md and "| sft | cot 1.0" in md
    sizes = {"accuracy.png": (520, 340), "image_mass_by_layer.png": (1070, 360), "image_mass_along_rationale.png": (1070, 360),
             "early_commitment.png": (1070, 360)}
    for name, size in sizes.items():
        assert f"({name})" in md and Image.open(tmp_path / "rep" / name).size == size
    heat = Image.open(tmp_path / "rep" / "attention_1.png")
    assert "(attention_1.png)" in md and heat.width > 3 * 160 and heat.height > 2 * 160  # a row per model, 3 columns
    from draw import attention_overlay
    over = attention_overlay(im, results["sft"]["heatmaps"][0]["boxes"], [0.3, 0.3, 0, 0])
    assert sum(over.getpixel((40, 40))) > 2 * sum(over.getpixel((40, 120)))  # the top row was attended, not the bottom


def test_ticks_are_round_and_cover_the_range():
    import draw
    assert draw.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert draw.nice_ticks(3, 1187, n=6) == [200, 400, 600, 800, 1000]
    assert draw.log_ticks(0.004, 6.0) == [0.01, 0.1, 1.0]
    assert draw.log_ticks(0.08, 0.7) == [0.1, 0.2, 0.5]
    assert draw.log_ticks(0.3, 0.45) == [0.3, 0.35, 0.4, 0.45]  # within one 1-2-5 step: linear ticks


def test_curves_of_a_one_step_run(tmp_path):
    """A single logged step (a 1-step run) still draws, on log axes too."""
    import draw
    from PIL import Image
    draw.curves([{"step": 1, "loss": 6.2, "ce": 5.9, "vis": 1.9, "ans": 0.47, "vas": 0.15}], str(tmp_path / "c.png"))
    assert Image.open(tmp_path / "c.png").size == (1070, 30 + 3 * 270 + 10)
