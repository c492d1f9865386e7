"""
The early-commitment term, against the paper's first failure pattern (an answer settled before the
rationale has looked): a copy of a record cut early in its rationale, then its answer forced; q is
the probability of the answer's first token among its rivals there (answer_tokens), pushed down to
p0 (--commit-floor), no further:

    L_commit = mean over the cut copies of max(0, log q(answer | early cut) - log p0)

Normalised, as the eval's early-commitment measure is: a model cut mid-step does not expect
"Answer:" at all (absolute probabilities of 1e-5 to 1e-10), yet still ranks an answer first among
the candidates, which is the commitment the term is against. Measured in the ablation
(docs/ablation.md); off by default.
"""
import torch

import answers
import data


def answer_tokens(tokenizer, train_records):
    """What the commit term normalises an answer's probability among: the first token of every
    closed-set training answer (answers.candidate_sets) as written after the marker (" 3", " yes"),
    and for each the answers it competes with, those of every type whose set holds it (" yes": yes and
    no; " 3": the counts). Per type, not all K: at a cut the model gives most of its mass to other
    types' answers as often as not. Each answer as the records write it ("Yes", not the candidate
    sets' folded "yes"): that is the token a record's answer span starts with.
    -> {"ids": (K,) long, "rivals": (K, K) bool, row k: k's rivals}."""
    closed = answers.candidate_sets(train_records)
    written = {t: {str(r["answer"]).strip() for r in train_records
                   if r.get("type") == t and not r.get("choices")} for t in closed}
    sets = [{tokenizer.encode(" " + a).ids[0] for a in s} for s in written.values()]
    ids = sorted(set().union(*sets))
    rivals = torch.tensor([[any(i in s and j in s for s in sets) for j in ids] for i in ids])
    return {"ids": torch.tensor(ids), "rivals": rivals}


def commit_batch(batch, marker_ids, share, generator, pad_id, answer_set):
    """The early-cut copies of a share of batch's rows: the prompt, the first u of the rationale's n
    tokens (u uniform in 0..n/2), then the row's answer span as written (the marker, the answer, the
    end of the turn); labels on the tokens after the marker only. Rows whose answer span does not
    start with marker_ids (another answer format), or whose answer is none of answer_set's
    (answer_tokens) are left out. -> a collated batch, answer_set under "answers"; or None."""
    n = round(share * len(batch["input_ids"]))
    picked = torch.randperm(len(batch["input_ids"]), generator=generator)[:n].sort().values
    examples, marker = [], torch.tensor(marker_ids)
    for b in picked.tolist():
        spans, ids = batch["spans"][b], batch["input_ids"][b]
        r, a = (spans == data.R).nonzero()[:, 0], (spans == data.A).nonzero()[:, 0]
        if not len(r) or len(a) <= len(marker) or not torch.equal(ids[a[:len(marker)]], marker) \
                or ids[a[len(marker)]] not in answer_set["ids"]:
            continue
        u = int(torch.randint(0, len(r) // 2 + 1, (1,), generator=generator))
        keep = torch.cat([torch.arange(int(r[0]) + u), a])
        labels = torch.full((len(keep),), -100)
        labels[int(r[0]) + u + len(marker):] = ids[a[len(marker):]]
        ex = {"input_ids": ids[keep], "labels": labels, "spans": spans[keep]}
        if "pixel_values" in batch:
            ex.update(pixel_values=batch["pixel_values"][b],
                      pixel_attention_mask=batch["pixel_attention_mask"][b])
        examples.append(ex)
    return {**data.collate(examples, pad_id), "answers": answer_set} if examples else None


def commit_terms(model, cut, floor):
    """-> commit_sum = sum over the cut copies of max(0, log q - log floor), q the probability of the
    answer's first token among its rivals (cut["answers"]) at the position after the marker: a
    softmax over those logits only; commit_p_sum = sum of q."""
    out = model(cut["input_ids"], cut.get("pixel_values"), cut.get("pixel_attention_mask"),
                cut["attention_mask"])
    labels = cut["labels"][:, 1:]
    first = (labels != -100).int().argmax(1)  # (n,) the position that predicts the answer's first token
    rows = torch.arange(len(labels), device=labels.device)
    logits = out.logits[rows, first].float()  # (n, V)
    gold = labels[rows, first]  # (n,)
    k = torch.searchsorted(cut["answers"]["ids"], gold)  # (n,) the gold's index in the sorted ids
    assert torch.equal(cut["answers"]["ids"][k], gold), "a cut copy's answer is not in its answer set"
    logq = logits[:, cut["answers"]["ids"]].masked_fill(~cut["answers"]["rivals"][k], -torch.inf)
    logq = logq.log_softmax(-1)[rows, k]  # (n,)
    return {"commit_sum": torch.relu(logq - torch.log(torch.tensor(floor))).sum(),
            "commit_p_sum": logq.detach().exp().sum()}
