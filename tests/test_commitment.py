"""Early commitment (analysis/commitment.py): the model's own rationale cut short, the answer forced and
read from the probabilities; what it leaves out, the training format, multiple choice, the image,
and the candidates evaluate gives it."""
from types import SimpleNamespace

import pytest
import torch

import eval as eval_mod
from analysis import commitment
from test_eval import records


@pytest.fixture(scope="module")
def proc():
    import data
    answers_seen = ("0", "1", "3", "7", "A", "B", "C", "green")
    corpus = ["Row 1: a red circle. Row 2: nothing. So 2 circles. Answer: 2"] * 30 \
        + [f"Answer: {n}" for n in answers_seen] * 10
    return data.new_processor(corpus, tile=32, image_seq_len=4, vocab_size=300)


RATIONALE = "Row 1: a red circle. Row 2: nothing. Row 3: a blue square. So 2 circles."


class HandSetModel(torch.nn.Module):
    """A stub VLM whose next-token logits are set by hand: prefers(ids so far) -> {token id: logit},
    0 for every other token."""
    def __init__(self, vocab_size, prefers):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # for the device lookup
        self.vocab_size, self.prefers = vocab_size, prefers

    def forward(self, input_ids, pixel_values=None, pixel_attention_mask=None, attention_mask=None, **kw):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            for t in range(T):
                for token, value in self.prefers(input_ids[b, :t + 1].tolist()).items():
                    logits[b, t, token] = value
        return SimpleNamespace(logits=logits)


def one_token(proc, text):
    ids = proc.tokenizer.encode(text).ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


def late_model(proc, final="2", carries_on=False):
    """Leans to " 0" (logit 5) until the rationale's summary (" So") is in the prefix, then to the
    final answer. carries_on: after the answer marker it would rather write " Row" (logit 10)."""
    so, row, colon = one_token(proc, " So"), one_token(proc, " Row"), one_token(proc, ":")
    zero, fin = one_token(proc, " 0"), one_token(proc, " " + final)

    def prefers(ids):
        out = {fin if so in ids else zero: 5.0}
        if carries_on and ids[-1] == colon:
            out[row] = 10.0
        return out
    return HandSetModel(proc.tokenizer.get_vocab_size(), prefers)


def count_records():
    """Three count items (gold 2, 3, 1) whose model wrote RATIONALE and the final answer 2."""
    recs = [{**r, "candidates": ["0", "1", "2", "3"]} for r in records() if r["type"] == "count"]
    return recs, [f" {RATIONALE} Answer: 2" for _ in recs]


def test_early_commitment_reads_the_forced_answer_from_the_probabilities(proc):
    """Before the summary the stub ranks " 0" first, after it the final answer 2: agreement with the
    model's own final answer 0 then 1, accuracy against the gold 0 then 1/3 (only one gold is 2), and
    the final answer's probability over the four candidates 1 / (e^5 + 3), then e^5 / (e^5 + 3)."""
    import math
    recs, texts = count_records()
    ec = commitment.early_commitment(late_model(proc), proc, recs, texts)
    assert ec["cuts"] == [0, 25, 50, 75, 100] and ec["n"] == 3 and ec["left_out"] == {}
    assert ec["agreement"] == [0, 0, 0, 0, 1] and ec["accuracy"] == [0, 0, 0, 0, pytest.approx(1 / 3)]
    low, high = 1 / (math.exp(5) + 3), math.exp(5) / (math.exp(5) + 3)
    assert ec["final_answer_probability"] == pytest.approx([low] * 4 + [high], rel=1e-9)


def test_early_commitment_ignores_a_model_that_would_carry_on_writing(proc):
    """A model that would write " Row ..." after the marker (greedy text that reads as the count 1)
    gives the same forced answers and probabilities: the candidates are scored, not generated."""
    recs, texts = count_records()
    plain = commitment.early_commitment(late_model(proc), proc, recs, texts)
    chatty = commitment.early_commitment(late_model(proc, carries_on=True), proc, recs, texts)
    assert chatty["agreement"] == plain["agreement"] and chatty["accuracy"] == plain["accuracy"]
    assert chatty["final_answer_probability"] == pytest.approx(plain["final_answer_probability"], rel=1e-9)


def test_early_commitment_scores_the_training_format(proc, monkeypatch):
    """What is scored: prompt, the cut rationale (a prefix of the model's own), " Answer:", then
    " c<end_of_utterance>" for each candidate; the 0% reply is the marker alone."""
    seen = []
    real = commitment.candidate_probabilities

    def spy(model, proc, prompts, replies, candidates, batch_size=64):
        seen.append((replies, candidates))
        return real(model, proc, prompts, replies, candidates, batch_size)
    monkeypatch.setattr(commitment, "candidate_probabilities", spy)
    recs, texts = count_records()
    commitment.early_commitment(late_model(proc), proc, recs, texts)
    assert [r[0] for r, _ in seen][0] == " Answer:" and seen[-1][0][0] == f" {RATIONALE} Answer:"
    assert all(RATIONALE.startswith(r[0][1:-len(" Answer:")]) for r, _ in seen)
    assert all(c == [["0", "1", "2", "3"]] * 3 for _, c in seen)


def test_early_commitment_leaves_out_and_counts(proc):
    """No candidate set (open-ended), or a final answer outside it: left out, counted by reason."""
    recs, texts = count_records()
    recs = recs + [{**recs[0], "id": "open", "candidates": None, "answer": "a circle"},
                   {**recs[0], "id": "seven"}]
    texts = texts + [" Row 1: a circle. Answer: a circle", " So 7. Answer: 7"]
    ec = commitment.early_commitment(late_model(proc), proc, recs, texts)
    assert ec["n"] == 3
    assert ec["left_out"] == {"no candidate set (open-ended)": 1, "final answer not a candidate": 1}


def test_early_commitment_scores_the_end_of_the_answer(proc):
    """" 0" is the likelier first token, but the stub would go on after it (<end_of_utterance> at
    logit -30 there): the candidate 2, which ends, is the forced answer at every cut."""
    zero, two = one_token(proc, " 0"), one_token(proc, " 2")
    eou = proc.tokenizer.token_to_id("<end_of_utterance>")
    model = HandSetModel(proc.tokenizer.get_vocab_size(),
                         lambda ids: {zero: 5.0, two: 2.0, **({eou: -30.0} if ids[-1] == zero else {})})
    recs, texts = count_records()
    assert commitment.early_commitment(model, proc, recs, texts)["agreement"] == [1.0] * 5


def test_early_commitment_of_a_multiple_choice_record(proc):
    """The candidates of a multiple-choice record are its option letters (a letter gold) or its option
    texts (a text gold); the forced answer is compared with the final answer by its reading."""
    rec = {"id": "m", "question": "Which colour?", "answer": "B", "type": "mc", "images": [],
           "source": "f:1",
           "choices": ["A. red", "B. green", "C. blue"]}
    assert commitment.forced_candidates(rec) == ["A", "B", "C"]
    assert commitment.forced_candidates({**rec, "answer": "green"}) == ["red", "green", "blue"]
    model = HandSetModel(proc.tokenizer.get_vocab_size(),
                         lambda ids: {one_token(proc, " B"): 5.0, one_token(proc, " green"): 5.0})
    ec = commitment.early_commitment(model, proc, [rec, {**rec, "id": "m2"}],
                                     [" Row 1: a circle. Answer: B", " So. Answer: green"])
    assert ec["n"] == 2 and ec["agreement"] == [1.0] * 5 and ec["accuracy"] == [1.0] * 5


def test_early_commitment_reads_the_image(proc, tmp_path):
    """The scored sequences carry the record's image (expanded to its image tokens, the pixels to the
    model): a stub that answers 2 on a bright image and 0 on a dark one tells them apart."""
    from PIL import Image
    for name, colour in (("bright", (250, 250, 250)), ("dark", (5, 5, 5))):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{name}.png")
    zero, two = one_token(proc, " 0"), one_token(proc, " 2")

    class LooksAtPixels(HandSetModel):
        def forward(self, input_ids, pixel_values=None, pixel_attention_mask=None, attention_mask=None,
                    **kw):
            n_image = (input_ids == proc.image_token_id).sum(1)
            assert (n_image == proc.image_seq_len).all()  # one tile of 4 image tokens per sequence
            bright = pixel_values.flatten(1).mean(1) > 0
            logits = torch.zeros(*input_ids.shape, self.vocab_size)
            logits[bright, :, two], logits[~bright, :, zero] = 5.0, 5.0
            return SimpleNamespace(logits=logits)
    recs, texts = count_records()
    recs = [{**r, "images": [str(tmp_path / ("bright.png" if i % 2 == 0 else "dark.png"))]}
            for i, r in enumerate(recs)]
    ec = commitment.early_commitment(LooksAtPixels(proc.tokenizer.get_vocab_size(), None), proc, recs, texts)
    # the final answer is 2: right on the two bright images
    assert ec["agreement"] == [pytest.approx(2 / 3)] * 5


def test_early_commitment_through_evaluate_takes_candidates_from_training(monkeypatch, proc):
    """evaluate() gives each record its type's training answers as candidates; a model that leans to
    its final answer from the start agrees at every cut."""
    monkeypatch.setattr(eval_mod, "generate_answers",
                        lambda m, p, recs, *a, **kw: [f" {RATIONALE} Answer: {r['answer']}" for r in recs])
    train = [{"type": "count", "answer": n} for n in ("0", "1", "2", "3")]
    early = HandSetModel(proc.tokenizer.get_vocab_size(), lambda ids: {one_token(proc, " 2"): 5.0})
    recs = [r for r in records()
            if r["id"] in ("a", "ab")] + [{**records()[0], "id": "z", "type": "describe"}]
    ev = eval_mod.evaluate(early, proc, recs, train)
    ec = ev["early_commitment"]
    assert ec["n"] == 2
    assert ec["left_out"] == {"no candidate set (open-ended)": 1}  # z: no training answers of its type
    assert ec["agreement"] == [0.5] * 5  # the stub always ranks 2 first: right for a, not for ab
    per_item = [(it["index"], it["forced"]) for it in ec["items"]]
    assert per_item == [(0, ["2"] * 5), (1, ["2"] * 5)]
    assert all(len(it["p_final"]) == 5 for it in ec["items"])
    first_cut = sum(it["p_final"][0] for it in ec["items"]) / 2
    assert first_cut == pytest.approx(ec["final_answer_probability"][0], abs=1e-4)
    phases = {"cot", "direct", "masses", "commitment", "occlusion", "heatmaps", "explore"}
    assert set(ev["seconds"]) == phases
    assert ev["where_it_looks"] is None and ev["heatmaps"] == [] and ev["explore"] == []  # no layers
