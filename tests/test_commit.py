"""The early-commitment term (methods/commit.py): the answers it normalises among, the cut copies, the
term by hand and the direction of its gradient, its copies counted over every micro-batch, and a run
that logs it."""
import math
from types import SimpleNamespace

import pytest
import torch

import answers
import data
import model as model_mod
import objective
import train as trainer
from methods import commit
from test_train import config, trained  # noqa: F401 (trained: the module's trained run)
from train_config import TrainConfig


def test_answer_tokens_pair_each_answer_with_its_types_answers():
    """Every closed-set answer's first token, and as its rivals the answers of the types that can give
    it: yes/no among themselves, the counts among themselves; an open-ended type adds nothing; a
    two-token answer ("dark red") by its first token."""
    class Words:  # one token per word, numbered as first seen
        def __init__(self):
            self.vocab = {}

        def encode(self, text):
            return SimpleNamespace(ids=[self.vocab.setdefault(w, len(self.vocab)) for w in text.split()])
    words = Words()
    recs = [{"type": "cmp", "answer": "yes"}, {"type": "cmp", "answer": "no"},
            {"type": "other", "answer": "no"}, {"type": "other", "answer": "dark red"},
            {"type": "count", "answer": "2"}, {"type": "count", "answer": "3"},
            *[{"type": "open", "answer": f"w{i}"} for i in range(answers.CLOSED_SET + 1)]]
    got = commit.answer_tokens(words, recs)
    names = {words.vocab[w]: w for w in ("yes", "no", "dark", "2", "3")}
    assert sorted(names[int(i)] for i in got["ids"]) == ["2", "3", "dark", "no", "yes"]
    rivals = {names[int(i)]: {names[int(j)] for j, r in zip(got["ids"], row) if r}
              for i, row in zip(got["ids"], got["rivals"])}
    assert rivals == {"yes": {"yes", "no"}, "no": {"yes", "no", "dark"}, "dark": {"no", "dark"},
                      "2": {"2", "3"}, "3": {"2", "3"}}
    # answers as written: a capitalised answer is its own token, the one its answer span starts with
    got = commit.answer_tokens(words, [{"type": "yn", "answer": a} for a in ("Yes", "No", "yes")])
    assert sorted(int(i) for i in got["ids"]) == sorted(words.vocab[w] for w in ("Yes", "No", "yes"))


def test_commit_batch_cuts_early_and_forces_the_answer():
    """Each picked row: its prompt, the first u <= n/2 of its n rationale tokens, then its answer span;
    labels on the answer's tokens after the marker only; a row written in another format, or whose
    answer is not a known one, is left out."""
    P, R, A = data.P, data.R, data.A
    marker, answer_set = [7, 8], {"ids": torch.tensor([20, 40]), "rivals": torch.ones(2, 2, dtype=torch.bool)}
    rows = [([1, 2, 3], [10, 11, 12, 13, 14, 15], [7, 8, 20, 21]), ([1, 2], [30, 31, 32, 33], [7, 8, 40, 41]),
            ([1, 2], [50, 51], [9, 60, 61]), ([1, 2], [50, 51], [7, 8, 61]),
            ([1, 2], [], [7, 8, 20, 21])]  # no marker; an unknown answer; no rationale
    examples = [{"input_ids": torch.tensor(p + r + a), "labels": torch.tensor([-100] * len(p) + r + a),
                 "spans": torch.tensor([P] * len(p) + [R] * len(r) + [A] * len(a))} for p, r, a in rows]
    batch = data.collate(examples, 0)
    seen_u = set()
    for seed in range(20):
        cut = commit.commit_batch(batch, marker, 1.0, torch.Generator().manual_seed(seed), 0, answer_set)
        assert len(cut["input_ids"]) == 2 and cut["answers"] is answer_set
        for got, labels, mask, (p, r, a) in zip(cut["input_ids"], cut["labels"], cut["attention_mask"], rows):
            ids = got[mask.bool()].tolist()
            u = len(ids) - len(p) - len(a)
            assert 0 <= u <= len(r) // 2 and ids == p + r[:u] + a
            assert labels[mask.bool()].tolist() == [-100] * (len(p) + u + 2) + a[2:]
            seen_u.add((len(r), u))
    assert {(6, 0), (6, 3), (4, 0), (4, 2)} <= seen_u  # both ends of the range are drawn
    for seed in range(6):  # round(0.2 * 5) = 1 row picked: a copy unless it is one of the last three
        picked = int(torch.randperm(5, generator=torch.Generator().manual_seed(seed))[0])
        one = commit.commit_batch(batch, marker, 0.2, torch.Generator().manual_seed(seed), 0, answer_set)
        assert (one is None) if picked >= 2 else len(one["input_ids"]) == 1


def test_commit_term_by_hand_and_its_gradient_lowers_the_early_answer(trained):
    """commit_sum = sum of max(0, log q - log p0), q the answer's first-token probability renormalised
    over its rivals, by hand from the model's logits; one gradient step on the term alone lowers q."""
    cfg, result = trained
    model, proc = result["model"], result["proc"]
    batch = data.collate(data.encode_all(proc, result["train_records"][:8]), proc.pad_token_id)
    marker = proc.tokenizer.encode(" Answer:").ids
    answer_set = commit.answer_tokens(proc.tokenizer, result["train_records"])
    cut = commit.commit_batch(batch, marker, 1.0, torch.Generator().manual_seed(0), proc.pad_token_id,
                                 answer_set)
    assert len(cut["input_ids"]) == 8
    with torch.no_grad():
        logits = model(cut["input_ids"], cut["pixel_values"], cut["pixel_attention_mask"],
                       cut["attention_mask"]).logits.double()
    sets = answers.candidate_sets(result["train_records"])
    want_q = []
    for i, labels in enumerate(cut["labels"]):
        t = int((labels != -100).nonzero()[0, 0])  # the answer's first token, predicted at t - 1
        gold = proc.tokenizer.decode([int(labels[t])]).strip()
        rivals = {proc.tokenizer.encode(" " + a).ids[0] for s in sets.values() if gold in s for a in s}
        z = torch.stack([logits[i, t - 1, j] for j in sorted(rivals)]).exp().sum()
        want_q.append(float(logits[i, t - 1, labels[t]].exp() / z))
    want_q = torch.tensor(want_q, dtype=torch.float64)
    floor = float(want_q.median())  # half the copies above it
    terms = commit.commit_terms(model, cut, floor)
    want = torch.relu(want_q.log() - math.log(floor)).sum()
    assert abs(float(terms["commit_sum"].detach()) - float(want)) < 1e-4 and float(want) > 0
    assert abs(float(terms["commit_p_sum"]) - float(want_q.sum())) < 1e-4
    copy = model_mod.VLM(model.config)
    copy.load_state_dict(model.state_dict())
    terms = commit.commit_terms(copy, cut, 1e-3)
    terms["commit_sum"].backward()
    with torch.no_grad():
        for p in copy.parameters():
            p -= 1e-2 * p.grad
    after = commit.commit_terms(copy, cut, 1e-3)["commit_p_sum"]
    assert float(after) < float(terms["commit_p_sum"]) - 1e-3


def test_commit_term_gradient_on_a_stub_is_that_of_log_q():
    """With the logits a leaf tensor: d commit_sum / d logits is 1[j = gold] - q_j on the gold's rivals
    at the position just before the answer's first token, 0 on every other column and position; a
    copy whose q is under the floor gets none."""
    torch.manual_seed(0)
    V, T = 12, 6
    leaf = torch.randn(2, T, V, dtype=torch.float64, requires_grad=True)

    class Stub(torch.nn.Module):
        def forward(self, *args):
            return SimpleNamespace(logits=leaf)
    answer_set = {"ids": torch.tensor([3, 5, 7, 9]),  # 3 and 5 rivals (yes/no), 7 and 9 (two counts)
                  "rivals": torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]).bool()}
    labels = torch.tensor([[-100, -100, -100, 5, 1, -100], [-100, -100, 9, 1, -100, -100]])
    cut = {"input_ids": torch.zeros(2, T, dtype=torch.long), "attention_mask": torch.ones(2, T),
           "labels": labels, "answers": answer_set}
    with torch.no_grad():
        q = [leaf[0, 2, [3, 5]].softmax(0)[1], leaf[1, 1, [7, 9]].softmax(0)[1]]
    floor = float(min(q)) * 0.5 + float(max(q)) * 0.5  # one copy above the floor, one under
    terms = commit.commit_terms(Stub(), cut, floor)
    terms["commit_sum"].backward()
    want = torch.zeros_like(leaf)
    for b, (t, cols, gold) in enumerate(((2, [3, 5], 5), (1, [7, 9], 9))):
        if q[b] > floor:
            p = leaf[b, t, cols].detach().softmax(0)
            want[b, t, cols] = torch.tensor([float(c == gold) for c in cols], dtype=torch.float64) - p
    assert torch.allclose(leaf.grad, want, atol=1e-12) and want.abs().sum() > 0
    assert float(terms["commit_p_sum"]) == pytest.approx(float(q[0] + q[1]))


def test_commit_copies_in_every_micro_batch_and_counted_over_all():
    """With --grad-accum 2 each micro-batch carries its own cut copies, and the step's commit_count
    is their number over both."""
    P, R, A = data.P, data.R, data.A
    ids = [1, 2, 10, 11, 7, 8, 20, 21]
    ex = {"input_ids": torch.tensor(ids), "labels": torch.tensor([-100] * 2 + ids[2:]),
          "spans": torch.tensor([P, P, R, R, A, A, A, A])}
    cfg = TrainConfig(batch_size=4, grad_accum=2, lambda_commit=1.0, commit_share=0.5)
    answer_set = {"ids": torch.tensor([20]), "rivals": torch.ones(1, 1, dtype=torch.bool)}
    micro = trainer.batches_for_step([ex] * 8, 0, 0, cfg, commit_ids=([7, 8], answer_set))
    assert len(micro) == 2 and all(len(b["commit"]["input_ids"]) == 2 for b in micro)
    assert float(objective.step_counts(micro)["commit_count"]) == 4.0


def test_training_with_the_commit_term_logs_it(tmp_path):
    """--lambda-commit trains with the cut copies and logs the term and the forced answer's mean
    probability; the cuts come from the step's seed, so a rerun logs the same numbers."""
    # a floor below every early answer's probability: the hinge is active from the first step
    results = [trainer.train(config(tmp_path / str(i), objective="attcot", lambda_commit=weight,
                                       commit_floor=1e-12, commit_share=0.5, max_steps=3))
               for i, weight in enumerate((1.0, 1.0, 0.0))]
    runs = [r["metrics"] for r in results]
    assert all(row["commit"] > 0 and 0 < row["commit_p"] <= 1 for row in runs[0])
    # the logged loss: each trained term's weight times its mean; commit_p is logged only
    assert all(row["loss"] == pytest.approx(row["ce"] + 0.1 * row["vis"] + 0.1 * row["ans"] + row["commit"])
               for row in runs[0])
    assert [r["commit_p"] for r in runs[0]] == [r["commit_p"] for r in runs[1]]
    assert "commit" not in runs[2][0]
    # the term trains: without it (the same seed, the same batches) the weights end elsewhere
    assert not torch.equal(results[0]["model"].lm_head.weight, results[2]["model"].lm_head.weight)
