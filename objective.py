"""
The training objectives: CE on the reply, Att-CoT's attention terms, AVAR's (related.py), and the
early-commitment term. Each micro-batch gives summed terms and counts, so that micro-batches and
ranks average exactly.

    terms = loss_terms(model, batch, cfg, layers)       # sums: ce_sum, vis_sum, ans_sum, commit_sum, ...
    loss = total_loss(terms, step_counts(micro_batches), cfg)

This project's formulation (the Att-CoT paper's exact loss is not public; docs/methods.md):
  spans: S chat scaffolding, P prompt text, V image tokens, R rationale, A answer (data.py)
  m_i(G): attention mass of query row i on key group G, mean over the chosen layers and all heads
  L = CE(reply) + lambda_vis * mean_{i in R} -log(min(m_i(V), t) + eps)
                + lambda_ans * mean_{i in A} -log(min(m_i(G_ans), t_ans) + eps)
                + lambda_commit * mean_{cut copies} max(0, log q(answer | early cut) - log p0)
  G_ans (--ans-group): rationale+image, or user+rationale (everything the user gave and the
  rationale: all but the chat scaffolding). The floor t (--vis-target, 0.5) stops pushing a step that
  already looks at the image enough: without it the rationale puts nearly 0.9 of its attention on
  the image and loses the question. The early-commitment term (the paper's first failure pattern): a copy of
  the record cut early in its rationale, then its answer forced; q is the probability of the
  answer's first token among its rivals there (answer_tokens), pushed down to p0 (--commit-floor),
  no further. Normalised, as the eval's early-commitment measure is: a model cut mid-step does not
  expect "Answer:" at all (absolute probabilities of 1e-5 to 1e-10), yet still ranks an answer
  first among the candidates, which is the commitment the term is against.
"""
import torch
import torch.nn.functional as F

import answers
import data
import masses
import related

ATTCOT_ROWS = (data.R, data.A)
ANS_GROUPS = ("rationale+image", "user+rationale")


def loss_terms(model, batch, cfg, layers):
    """-> dict of summed terms and their counts: ce_sum / n_label, vis_sum & vas_sum / r_count,
    ans_sum / a_count; for avar, img_sum / img_count and sys_sum / sys_count (related.avar_terms);
    with lambda_commit and batch["commit"] (commit_batch), commit_sum and commit_p_sum / commit_count."""
    avar = cfg.objective == "avar"
    need_mass = cfg.objective == "attcot" or cfg.measure_vas or avar
    hook = row_span = None
    if need_mass:
        kinds, names = (related.AVAR_ROWS, related.AVAR_GROUPS) if avar else \
            (ATTCOT_ROWS, ("image", cfg.ans_group))
        rows, q_pos, row_span = masses.query_rows(batch["spans"], kinds)
        groups = masses.key_groups(batch["spans"], names)
        hook = masses.mass_fn(rows, q_pos, groups, len(names), impl=cfg.mass_impl)
    out = model(batch["input_ids"], batch.get("pixel_values"), batch.get("pixel_attention_mask"),
                batch["attention_mask"], mass_layers=layers if need_mass else (), mass_fn=hook)
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                         reduction="sum")
    terms = {"ce_sum": ce, "n_label": (labels != -100).sum()}
    if avar:
        terms.update(related.avar_terms(out.masses, layers, row_span, batch["spans"], cfg.eps))
    elif need_mass:
        m = torch.stack([out.masses[layer] for layer in layers]).mean(0).mean(1)  # (B, Nq, 2)
        in_r, in_a = row_span == data.R, row_span == data.A
        # push below t only
        m_vis = m[..., 0] if cfg.vis_target is None else m[..., 0].clamp(max=cfg.vis_target)
        m_ans = m[..., 1] if cfg.ans_target is None else m[..., 1].clamp(max=cfg.ans_target)
        below = (m[..., 0].detach() < (cfg.vis_target or 1.0)) & in_r  # the steps L_vis pushes
        terms.update(vis_sum=-(torch.log(m_vis + cfg.eps) * in_r).sum(), r_count=in_r.sum(),
                     ans_sum=-(torch.log(m_ans + cfg.eps) * in_a).sum(), a_count=in_a.sum(),
                     vas_sum=(m[..., 0].detach() * in_r).sum(), below_count=below.sum(),
                     below_mass_sum=(m[..., 0].detach() * below).sum())
    if cfg.lambda_commit and batch.get("commit"):
        terms.update(commit_terms(model, batch["commit"], cfg.commit_floor))
    return terms


def step_counts(batches):
    """The counts the loss terms are divided by, over all micro-batches of a step (float tensors)."""
    return {"n_label": sum((b["labels"][:, 1:] != -100).sum() for b in batches).float(),
            "r_count": sum((b["spans"] == data.R).sum() for b in batches).float(),
            "a_count": sum((b["spans"] == data.A).sum() for b in batches).float(),
            "commit_count": torch.tensor(float(sum(len(b["commit"]["input_ids"]) for b in batches
                                                   if b.get("commit")))),
            **related.avar_counts(batches)}


def total_loss(terms, counts, cfg):
    """The loss to backpropagate for one micro-batch, each term divided by its count over the whole
    step (all micro-batches, all ranks), so that the summed gradients equal the full-batch mean."""
    loss = terms["ce_sum"] / counts["n_label"]
    if cfg.objective == "attcot":
        loss = loss + cfg.lambda_vis * terms["vis_sum"] / counts["r_count"] \
            + cfg.lambda_ans * terms["ans_sum"] / counts["a_count"]
    if cfg.objective == "avar":
        loss = loss + cfg.avar_img * terms["img_sum"] / counts["img_count"] \
            + cfg.avar_sys * terms["sys_sum"] / counts["sys_count"]
    if "commit_sum" in terms:
        loss = loss + cfg.lambda_commit * terms["commit_sum"] / counts["commit_count"]
    return loss


# -----------------------------------------------------------------------------
# the early-commitment term


def to_device(batch, device):
    """A batch, and its cut copies ("commit", a batch or None) with it, on the device."""
    return {k: to_device(v, device) if isinstance(v, dict) else v if v is None else v.to(device)
            for k, v in batch.items()}


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
