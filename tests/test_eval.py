"""Answer extraction and scoring on hand-written cases (docs/methods.md section 9), and each measure of
evaluate() on a case whose value is known (a stub generator stands in for the model)."""
import pytest
import torch
from PIL import Image

import answers
import data
import eval as eval_mod
from analysis import boxes as boxes_mod
from analysis import report
from model import small_config

CHOICES = ["A. red", "B. green", "C. blue"]


@pytest.mark.parametrize("reply,answer", [
    ("Row 1: a circle. So 2 circles. Answer: 2", "2"),
    ("step one. Answer: no. Answer: yes.", "yes"),                       # the last marker counts
    ("<think>look left</think><answer> B </answer>", "B"),
    ("I looked, and the answer is: green.", "green"),
    ("So the answer is 7", "7"),
    ("B", "B"),                                                          # a direct answer
    ("Yes, a red one.", "Yes, a red one"),
    ("Row 1: nothing, a small red", ""),                  # a rationale cut off: its one number is no count
    ("I see a circle and a red square and a small blue triangle in the top row", ""),  # 16 words
    ("", ""),
])
def test_extract_answer(reply, answer):
    assert answers.extract_answer(reply) == answer


@pytest.mark.parametrize("pred,gold,choices,correct,readable", [
    ("(B)", "B", CHOICES, True, True),
    ("B.", "B", CHOICES, True, True),
    ("B) green", "B", CHOICES, True, True),
    ("the answer is b", "B", CHOICES, False, False),
    # lower-case b is not an option letter
    ("it is a green one", "B", CHOICES, True, True),                     # "a" is an article; "green" names B
    ("A green one.", "B", CHOICES, True, True),                          # so is a sentence's first "A"
    ("It is red. A blue one is not.", "A", CHOICES, False, False),       # ... and "red" and "blue" are two
    ("A is right", "A", CHOICES, True, True),                            # "A" before a verb is the letter
    ("A has the most circles", "A", CHOICES, True, True),
    # ... whatever the verb: no option text named
    ("A red or a blue one", "A", CHOICES, False, False),
    # two option texts, and "A" is their article
    ("A or B", "B", CHOICES, False, False),                              # two letters: unreadable
    ("red and green", "B", CHOICES, False, False),                       # two option texts: unreadable
    ("D", "B", CHOICES, False, False),                                   # no option D
    ("blue", "blue", CHOICES, True, True),
    # option text names C; so does the gold
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
    assert answers.matches(answers.parse_answer(pred, gold, choices),
                           {"answer": gold, "choices": choices}) is correct
    assert (answers.parse_answer(pred, gold, choices) is not None) is readable


YES_NO, COLOURS = ["no", "yes"], ["blue", "green", "red", "yellow"]


@pytest.mark.parametrize("pred,gold,candidates,correct,readable", [
    ("Yes, there are.", "yes", YES_NO, True, True),
    ("no", "yes", YES_NO, False, True),
    ("Row 1: nothing, a large green circle", "yes", YES_NO, False, False),  # names no candidate
    ("yes or no", "yes", YES_NO, False, False),                              # names two
    ("not sure", "no", YES_NO, False, False),                                # "not" is not "no"
    ("the red one", "red", COLOURS, True, True),
    ("red, not blue", "red", COLOURS, False, False),
    ("a large green circle", "red", COLOURS, False, True),
    ("dark red", "red", ["red", "dark red"], False, True),
    # "red" inside "dark red" is one name
    ("Row 1: nothing", "yes", None, False, True),
    # open-ended: any text is an answer
    ("dark red and red", "red", ["red", "dark red"], False, False),          # both said
])
def test_unparseable_means_no_candidate_or_several(pred, gold, candidates, correct, readable):
    rec = {"answer": gold, "candidates": candidates}
    assert answers.is_right(rec, pred) is correct
    assert (answers.parse_answer(pred, gold, None, candidates) is not None) is readable


def test_evaluate_reads_answers_among_the_training_answers_of_their_type(monkeypatch):
    """The CoT reply "Row 1: nothing" to a yes/no question is unparseable once the type's candidates
    (yes, no: the training answers) are known."""
    monkeypatch.setattr(eval_mod, "generate_answers", lambda m, p, recs, *a,
                        **kw: ["Row 1: nothing" for r in recs])
    recs = [r for r in records() if r["type"] == "compare"]
    ev = eval_mod.evaluate(None, None, recs, [{"type": "compare", "answer": a} for a in ("yes", "no")],
                           commitment=False)
    assert ev["unparseable"] == 2 and ev["unparseable_direct"] == 2
    ev = eval_mod.evaluate(None, None, recs, [], commitment=False)
    assert ev["unparseable"] == 2  # no candidates: still a rationale cut off (a labelled step)
    monkeypatch.setattr(eval_mod, "generate_answers",
                        lambda m, p, recs, *a, **kw: ["nothing there"] * len(recs))
    ev = eval_mod.evaluate(None, None, recs, [], commitment=False)
    assert ev["unparseable"] == 0  # no candidates: a short reply is itself the (wrong) answer


def test_candidate_sets_fold_case_and_keep_the_gold():
    """Training answers that differ in case are one candidate; an eval record's own gold is among its
    candidates even if training never gave it; untyped records and many-answer types get none."""
    train = [{"type": "yn", "answer": a} for a in ("Yes", "yes", "no")] + [{"answer": "a blue square"}] + \
        [{"type": "free", "answer": f"thing {i}"} for i in range(answers.CLOSED_SET + 1)]
    assert answers.candidate_sets(train) == {"yn": ["no", "yes"]}
    recs = answers.with_candidates([{"type": "yn", "answer": "maybe"}, {"answer": "a blue square"},
                                     {"type": "free", "answer": "thing 3"}], train)
    assert recs[0]["candidates"] == ["maybe", "no", "yes"] and "candidates" not in recs[1]
    assert "candidates" not in recs[2]
    assert answers.read_answer(recs[0], "Answer: maybe.") == "maybe"
    assert answers.read_answer(recs[2], "It is thing 3") == "it is thing 3"


def test_gold_option_text_is_matched_to_its_letter():
    rec = {"answer": "blue", "choices": CHOICES}
    assert answers.is_right(rec, "Answer: C") and not answers.is_right(rec, "Answer: A")


def test_bootstrap_interval():
    """The percentile interval of the resampled means of 400 values (280 ones): the resampled mean is
    Binomial(400, 0.7) / 400, whose 2.5% and 97.5% quantiles are computed exactly; a 90% interval
    (0.0075 narrower at each end) fails."""
    from math import comb
    n, k = 400, 280
    cdf, quantiles = 0.0, {}
    for i in range(n + 1):
        cdf += comb(n, i) * 0.7**i * 0.3**(n - i)
        for q in (0.025, 0.975):
            if cdf >= q and q not in quantiles:
                quantiles[q] = i / n
    lo, hi = eval_mod.bootstrap_ci([1] * k + [0] * (n - k), n=20000)
    assert lo == pytest.approx(quantiles[0.025], abs=0.0026)
    assert hi == pytest.approx(quantiles[0.975], abs=0.0026)
    assert eval_mod.bootstrap_ci([1, 1, 1]) == (1.0, 1.0) and eval_mod.bootstrap_ci([]) is None


def records():
    """Two items with their twins, the twin of a third whose original was cut off (--eval-limit)."""
    r = lambda i, answer, t="count", **kw: {"id": i, "question": "How many?", "answer": answer, "type": t,
                                             "images": [], "source": f"f:{i}", **kw}
    return [r("a", "2"), r("ab", "3", twin_of="a"), r("b", "yes", "compare"),
            r("bb", "no", "compare", twin_of="b"),
            r("cb", "1", twin_of="c")]


def test_measures_on_a_stub_that_always_answers_the_prior(monkeypatch):
    """A model that answers the training prior ("1" for counts, "yes" for compare) without looking:
    prior agreement 1, accuracy = where the prior happens to be right, no pair consistent."""
    train = [{"type": "count", "answer": "1"}] * 3 + [{"type": "compare", "answer": "yes"}] * 2
    prior = {"count": "So 1. Answer: 1", "compare": "Answer: yes"}
    monkeypatch.setattr(eval_mod, "generate_answers", lambda m, p, recs, *a,
                        **kw: [prior[r["type"]] for r in recs])
    ev = eval_mod.evaluate(None, None, records(), train, commitment=False)
    assert ev["accuracy_cot"] == pytest.approx(2 / 5) and ev["text_prior_accuracy"] == pytest.approx(2 / 5)
    assert ev["prior_agreement"] == 1.0 and ev["unparseable"] == 0
    assert ev["counterfactual_consistency"] == 0.0  # pairs a/ab and b/bb; cb has no original: left out
    assert ev["accuracy_by_type"] == {"count": pytest.approx(1 / 3), "compare": 0.5}


def test_prior_agreement_is_over_the_wrong_answers_that_can_be_read(monkeypatch):
    """Two wrong answers, both the prior's, and eight replies with no answer: agreement 1.0 over the 2,
    not 0.2 over the 10; the eight are unparseable."""
    recs = [{"id": str(i), "question": "How many?", "answer": "3", "type": "count", "images": [],
             "source": f"f:{i}"} for i in range(10)]
    monkeypatch.setattr(eval_mod, "generate_answers", lambda m, p, rs, *a, **kw:
                        ["So 1. Answer: 1"] * 2 + ["Row 1: nothing, a small red"] * 8)
    ev = eval_mod.evaluate(None, None, recs, [{"type": "count", "answer": "1"}], commitment=False)
    assert ev["prior_agreement"] == 1.0 and ev["prior_agreement_n"] == 2 and ev["unparseable"] == 8


def test_measures_on_a_stub_that_reads_the_answer(monkeypatch):
    monkeypatch.setattr(eval_mod, "generate_answers",
                        lambda m, p, recs, *a,
                        **kw: [f"Answer: {r['answer']}" if r["id"] != "bb" else "" for r in recs])
    ev = eval_mod.evaluate(None, None, records(), [{"type": "count", "answer": "1"}], commitment=False)
    assert ev["accuracy_cot"] == pytest.approx(4 / 5) and ev["unparseable"] == 1
    assert ev["counterfactual_consistency"] == 0.5 and ev["unparseable"] == 1
    assert ev["prior_agreement"] is None and ev["prior_agreement_n"] == 0  # no readable wrong answer


def check_control(evidence, control, width, height):
    """The control hides as much area as the evidence (within 2% once rasterised), off the evidence and
    off itself, inside the image."""
    import numpy as np
    ev, ct = boxes_mod.painted(evidence, width, height), boxes_mod.painted(control, width, height)
    assert all(0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height for b in control)
    assert not (ev & ct).any()
    # no two control boxes overlap
    assert sum((b[2] - b[0]) * (b[3] - b[1]) for b in control) == int(ct.sum())
    assert abs(int(ct.sum()) - int(ev.sum())) <= 0.02 * int(ev.sum())
    return np.count_nonzero(ct)


def test_control_boxes_on_hand_made_evidence():
    import numpy as np
    rng = np.random.default_rng(0)
    evidence = [(0, 0, 32, 32), (32, 64, 64, 96), (64, 0, 96, 32)]
    for _ in range(30):
        boxes, rule = boxes_mod.control_boxes(evidence, 96, 96, rng)
        assert rule == "the evidence's boxes"
        assert sorted((b[2] - b[0], b[3] - b[1]) for b in boxes) == [(32, 32)] * 3
        check_control(evidence, boxes, 96, 96)
    centre = [(24, 24, 72, 72)]  # a 48 x 48 box fits nowhere around it (24-px margins): four 24 x 24 do
    boxes, rule = boxes_mod.control_boxes(centre, 96, 96, rng)
    assert rule == "each box cut in 2 x 2" and len(boxes) == 4
    check_control(centre, boxes, 96, 96)
    frame = [(20, 20, 76, 76)]  # 20-px margins: 28 x 28 pieces fit nowhere, 14 x 14 ones do
    boxes, rule = boxes_mod.control_boxes(frame, 96, 96, rng)
    assert rule == "each box cut in 4 x 4" and len(boxes) == 16
    check_control(frame, boxes, 96, 96)
    # the union (2,800 px), not the sum of the areas (3,200)
    overlapping = [(0, 0, 40, 40), (20, 20, 60, 60)]
    boxes, rule = boxes_mod.control_boxes(overlapping, 96, 96, rng)
    assert check_control(overlapping, boxes, 96, 96) == 2800
    # more than half the image
    assert boxes_mod.control_boxes([(0, 0, 96, 60)], 96, 96, rng) == (None, "no room")


def test_control_boxes_on_the_whole_synthetic_eval_set(tmp_path):
    """Every item of the synthetic eval set whose evidence covers at most half the image gets a control
    of equal area; the others (5 or more evidence cells of 9) are the only ones left out."""
    import json
    import numpy as np
    from setting import synthetic
    _, eval_path = synthetic.make_synthetic(str(tmp_path), n_train=3, n_eval=150, seed=0)
    rng, left_out = np.random.default_rng(0), 0
    for line in open(eval_path):
        r = json.loads(line)
        boxes, rule = boxes_mod.control_boxes([tuple(b) for b in r["boxes"]], 96, 96, rng)
        if boxes is None:
            assert 2 * len(r["boxes"]) * 32 * 32 > 96 * 96
            left_out += 1
        else:
            check_control(r["boxes"], boxes, 96, 96)
    assert 0 < left_out < 40


def test_occlusion_on_a_stub_that_reads_one_region(monkeypatch, tmp_path):
    """The stub answers the colour at the centre of the evidence box: greying the evidence changes
    every answer, greying as much area elsewhere changes none. Changed is measured against the
    model's own unoccluded answer (red), not the gold (green). Records without boxes are left out;
    evidence larger than half the image is left out and counted."""
    from PIL import Image
    im = Image.new("RGB", (96, 96), (255, 255, 255))
    im.paste((255, 0, 0), (0, 0, 32, 32))
    im.save(tmp_path / "a.png")
    rec = lambda i, boxes: {"id": f"r{i}", "question": "Colour?", "answer": "green", "type": "cell",
                            "source": f"f:{i}",
                            "images": [str(tmp_path / "a.png")], "boxes": boxes}
    recs = [rec(i, [[0, 0, 32, 32]]) for i in range(6)] + [rec(6, [[0, 0, 96, 64]])]
    recs.append({k: v for k, v in rec(7, None).items() if k != "boxes"})

    def reads_the_box(model, proc, records, *args, **kw):
        pixel = lambda r: Image.open(r["images"][0]).getpixel((16, 16)) if isinstance(r["images"][0], str) \
            else r["images"][0].getpixel((16, 16))
        return [f"Answer: {'red' if pixel(r) == (255, 0, 0) else 'grey'}" for r in records]
    monkeypatch.setattr(eval_mod, "generate_answers", reads_the_box)
    got = eval_mod.occlusion(None, None, recs, ["Answer: red"] * len(recs))
    assert got == {"n": 6, "evidence_changed": 1.0, "control_changed": 0.0,
                   "control_rules": {"the evidence's boxes": 6},
                   "left_out": {"no room": 1, "no evidence box": 1},
                   "items": [{"index": i, "evidence_changed": True, "control_changed": False}
                             for i in range(6)]}
    assert eval_mod.occluded(str(tmp_path / "a.png"), [[0, 0, 32, 32]]).getpixel((31, 31)) == eval_mod.GREY
    assert Image.open(tmp_path / "a.png").getpixel((16, 16)) == (255, 0, 0)  # the file is untouched


def test_table_shows_every_measure(monkeypatch):
    monkeypatch.setattr(eval_mod, "generate_answers", lambda m, p, recs, *a,
                        **kw: [f"So. Answer: {r['answer']}" for r in recs])
    ev = eval_mod.evaluate(None, None, records(), [{"type": "count", "answer": "1"}], commitment=False)
    text = report.table({"sft": {**ev, "wall_seconds": 1.5}, "attcot": {**ev, "wall_seconds": 2.0}})
    assert text.splitlines()[0].split() == ["sft", "attcot"] and "accuracy_cot_ci95" in text
    assert [l.split()[-1] for l in text.splitlines() if l.startswith("wall_seconds")] == ["2.000"]
    # '-' where a measure was not taken
    assert sum(l.startswith("forced at") for l in text.splitlines()) == 5


def test_direct_prompting_on_a_stub_that_needs_its_rationale(monkeypatch):
    """Right with its rationale; asked for the answer alone it says the prior's answer: accuracy_direct
    is where the prior is right, and the direct prompt carries the instruction."""
    asked = []

    def generate(model, proc, recs, *a, **kw):
        asked.extend(r["question"] for r in recs)
        prior = {"count": "1", "compare": "yes"}
        return [prior[r["type"]] if r["question"].endswith(data.DIRECT)
                else f"Looked. Answer: {r['answer']}" for r in recs]
    monkeypatch.setattr(eval_mod, "generate_answers", generate)
    ev = eval_mod.evaluate(None, None, records(), [{"type": "count", "answer": "1"}], commitment=False)
    assert ev["accuracy_cot"] == 1.0
    assert ev["accuracy_direct"] == pytest.approx(2 / 5)  # "yes" for b, "1" for cb
    assert ev["unparseable_direct"] == 0
    assert ev["accuracy_direct_ci95"][0] < 0.4 < ev["accuracy_direct_ci95"][1]
    assert asked == ["How many?"] * 5 + ["How many?" + data.DIRECT] * 5
    asked.clear()  # the base's models: the CoT prompt asks for the steps, the direct one the same as before
    ev = eval_mod.evaluate(None, None, records(), [{"type": "count", "answer": "1"}], commitment=False,
                           cot="cot")
    assert asked == ["How many?\nThink step by step."] * 5 + ["How many?\nGive the answer alone, without "
                                                            "reasoning."] * 5
    assert ev["accuracy_cot"] == 1.0 and ev["examples"][0]["question"] == "How many?\nThink step by step."


def test_every_measure_reads_the_cot_prompt(monkeypatch, tmp_path):
    """With cot="cot" every measure but direct accuracy reads the step-by-step prompt: the CoT
    replies, occlusion's two passes, the masses on the gold and own rationales, early commitment."""
    Image.new("RGB", (96, 96), (255, 255, 255)).save(tmp_path / "a.png")
    recs = [{**r, "images": [str(tmp_path / "a.png")], "boxes": [[0, 0, 32, 32]]} for r in records()]
    asked, seen = [], []

    def generate(model, proc, rs, *a, **kw):
        asked.extend(r["question"] for r in rs)
        return [f"Looked. Answer: {r['answer']}" for r in rs]
    monkeypatch.setattr(eval_mod, "generate_answers", generate)
    monkeypatch.setattr(eval_mod, "early_commitment", lambda m, p, rs, *a, **kw: seen.append(rs))
    monkeypatch.setattr(eval_mod, "attention_profile",
                        lambda m, p, rs, layers: seen.append(rs) or {"image_mass_by_layer": [0.5]})
    ev = eval_mod.evaluate(None, None, recs, [{"type": "count", "answer": "1"}], layers=[0], heatmaps=0,
                           explore=0, cot="cot")
    cot, direct = "How many?" + data.COT, "How many?" + data.DIRECT
    assert ev["occlusion"]["n"] == 5 and asked.count(direct) == 5 and asked.count(cot) == 5 + 2 * 5
    assert len(seen) == 3 and all(r["question"] == cot for rs in seen for r in rs)


def hand_result(scale, image):
    """An evaluate() result with every measure, numbers made up (scaled per model)."""
    return {"n": 10, "accuracy_cot": 0.8 * scale, "accuracy_cot_ci95": (0.5 * scale, 0.95 * scale),
            "accuracy_direct": 0.4 * scale, "accuracy_direct_ci95": (0.2, 0.6), "unparseable": 0,
            "unparseable_direct": 1,
            "reply_tokens": {"cot": 60.0, "direct": 3.0}, "text_prior_accuracy": 0.3, "prior_agreement": 0.5,
            "counterfactual_consistency": 0.7, "vas_rationale": 0.5 * scale, "wall_seconds": 3.0,
            "where_it_looks": {w: {"layers": [0, 1, 2], "image_mass_by_layer": [0.1, 0.5 * scale, 0.9],
                                   "image_mass_along_rationale": [0.6 - 0.05 * i for i in range(10)],
                                   "answer_mass_on_rationale": 0.5, "answer_mass_on_image": 0.4, "n": 10}
                               for w in ("gold", "own")},
            "early_commitment": {"cuts": [0, 25, 50, 75, 100], "agreement": [0.1, 0.2, 0.3, 0.5, 1.0],
                                 "accuracy": [0.1, 0.2, 0.3, 0.5, 0.8],
                                 "final_answer_probability": [0.3, 0.4, 0.5, 0.6, 0.9],
                                 "n": 10, "left_out": {}},
            "occlusion": {"n": 8, "evidence_changed": 0.6, "control_changed": 0.2,
                          "control_rules": {"the evidence's boxes": 8}, "left_out": {"no room": 1}},
            "heatmaps": [{"image": image, "question": "How many?",
                          "boxes": [(0, 0, 48, 48), (48, 0, 96, 48), (0, 48, 48, 96), (48, 48, 96, 96)],
                          "steps": [{"text": "Row 1: a red circle.", "image_mass": 0.6,
                                     "weights": [0.3, 0.3, 0, 0]},
                                    {"text": "Answer: 1", "image_mass": 0.4,
                                     "weights": [0.1, 0.1, 0.1, 0.1]}]}],
            "seconds": {"cot": 1.0, "direct": 0.5}, "items_per_second": {"cot": 10.0, "direct": 20.0}}


def test_report_files_and_pictures(tmp_path):
    """write_report: report.json (every number back), report.md (the table, each picture, the time),
    and PNGs that open at their sizes; the heatmap paints the attended cells brighter."""
    import json
    from PIL import Image
    im = Image.new("RGB", (96, 96), (200, 200, 200))
    im.save(tmp_path / "item.png")
    results = {"sft": hand_result(1.0, str(tmp_path / "item.png")),
               "attcot": hand_result(1.1, str(tmp_path / "item.png"))}
    path = report.write_report(results, str(tmp_path / "rep"), {"data": "eval.jsonl"})
    md = open(path).read()
    back = json.load(open(tmp_path / "rep" / "report.json"))
    assert back["results"]["attcot"]["accuracy_cot"] == pytest.approx(0.88)
    assert back["meta"] == {"data": "eval.jsonl"}
    assert "| measure | sft | attcot |" in md and "| accuracy_direct | 0.400 | 0.440 |" in md
    assert "| sft | cot 1.0" in md
    sizes = {"accuracy.png": (520, 340), "image_mass_by_layer.png": (1070, 360),
             "image_mass_along_rationale.png": (1070, 360),
             "early_commitment.png": (1600, 360)}
    for name, size in sizes.items():
        assert f"({name})" in md and Image.open(tmp_path / "rep" / name).size == size
    heat = Image.open(tmp_path / "rep" / "attention_1.png")
    assert "(attention_1.png)" in md and heat.width > 3 * 160
    assert heat.height > 2 * 160  # a row per model, 3 columns
    from analysis.draw import attention_overlay
    over = attention_overlay(im, results["sft"]["heatmaps"][0]["boxes"], [0.3, 0.3, 0, 0])
    # the top row was attended, not the bottom
    assert sum(over.getpixel((40, 40))) > 2 * sum(over.getpixel((40, 120)))


def test_ticks_are_round_and_cover_the_range():
    from analysis import draw
    assert draw.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert draw.nice_ticks(3, 1187, n=6) == [200, 400, 600, 800, 1000]
    assert draw.log_ticks(0.004, 6.0) == [0.01, 0.1, 1.0]
    assert draw.log_ticks(0.08, 0.7) == [0.1, 0.2, 0.5]
    assert draw.log_ticks(0.3, 0.45) == [0.3, 0.35, 0.4, 0.45]  # within one 1-2-5 step: linear ticks


def test_curves_of_a_one_step_run(tmp_path):
    """A single logged step (a 1-step run) still draws, on log axes too."""
    from analysis import draw
    from PIL import Image
    draw.curves([{"step": 1, "loss": 6.2, "ce": 5.9, "vis": 1.9, "ans": 0.47, "vas": 0.15}],
                str(tmp_path / "c.png"))
    assert Image.open(tmp_path / "c.png").size == (1070, 30 + 3 * 270 + 10)


def test_evaluate_opens_each_image_once(tmp_path, monkeypatch):
    """Every phase of evaluate() (CoT, direct, masses, early commitment, occlusion, heatmaps, the
    explorer) on a real small model reads each eval image, yet each file is opened once; the
    occluded copies are made from that one decoded image."""
    import data
    from setting import synthetic
    from model import VLM
    from PIL import Image
    from records import read_records
    synthetic.make_synthetic(str(tmp_path), 40, 3, seed=0)
    train, recs = (read_records(p) for p in synthetic.paths(str(tmp_path)))
    proc = data.new_processor([r["question"] + " " + r["reply"] for r in train], tile=96, image_seq_len=9,
                              vocab_size=400)
    torch.manual_seed(0)
    model = VLM(small_config(proc.tokenizer.get_vocab_size(), proc.image_token_id)).eval()
    opened, real_open = [], Image.open
    monkeypatch.setattr(data.Image, "open", lambda p, *a: opened.append(p) or real_open(p, *a))
    ev = eval_mod.evaluate(model, proc, recs, train, layers=[0, 3], max_new_tokens=6, heatmaps=2, explore=2)
    assert ev["occlusion"]["n"] > 0 and len(ev["explore"]) == 2 and ev["where_it_looks"]
    assert sorted(opened) == sorted({p for r in recs for p in r["images"]})
