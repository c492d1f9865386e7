"""
The training objective as one table: every term a (sum, count, weight) entry. Each micro-batch gives
its terms' sums; a term's count is over the whole step (all micro-batches, all ranks), so that the
summed gradients equal the full-batch mean; its weight is its share of the loss (0: logged only).
The trainer's loss, its logged row and its progress line all read this table.

    terms = loss_terms(model, batch, cfg, layers)      # {"ce": Term(sum, "n_label", 1.0), "vis": ...}
    loss = total_loss(terms, step_counts(micro_batches))

Att-CoT as this project writes it (the paper's exact loss is not public; docs/methods.md):
  spans: S chat scaffolding, P prompt text, V image tokens, R rationale, A answer (data.py)
  m_i(G): attention mass of query row i on key group G, mean over the chosen layers and all heads
  L = CE(reply) + lambda_vis * mean_{i in R} -log(min(m_i(V), t) + eps)
                + lambda_ans * mean_{i in A} -log(min(m_i(G_ans), t_ans) + eps)
  G_ans (--ans-group): rationale+image, or user+rationale (everything the user gave and the
  rationale: all but the chat scaffolding). The floor t (--vis-target, 0.5) stops pushing a step that
  already looks at the image enough: without it the rationale puts nearly 0.9 of its attention on
  the image and loses the question.
The related methods add their entries: AVAR's L_img and L_sys (methods/avar.py), the
early-commitment term (methods/commit.py).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

import data
import masses
from methods import avar, commit

ATTCOT_ROWS = (data.R, data.A)
ANS_GROUPS = ("rationale+image", "user+rationale")


class Term(NamedTuple):
    sum: torch.Tensor  # summed over one micro-batch (float once summed over the step)
    count: str         # what its mean divides by: a step_counts key, or another term's name (a share of it)
    weight: float      # its weight in the loss; 0: logged, not trained


def loss_terms(model, batch, cfg, layers):
    """-> the table of one micro-batch, in the order the logged row shows it: ce; with the masses
    (attcot, or --measure-vas) vis, ans (L_vis, L_ans), vas (the rationale's image mass) and, under
    the floor t, below (the share of rationale steps L_vis pushes) and below_vas (their mean mass);
    for avar its img and sys; with the commit term and batch["commit"], commit and commit_p (q's mean)."""
    is_avar = cfg.objective == "avar"
    need_mass = cfg.objective == "attcot" or cfg.measure_vas or is_avar
    hook = row_span = None
    if need_mass:
        kinds, names = (avar.AVAR_ROWS, avar.AVAR_GROUPS) if is_avar else \
            (ATTCOT_ROWS, ("image", cfg.ans_group))
        rows, q_pos, row_span = masses.query_rows(batch["spans"], kinds)
        groups = masses.key_groups(batch["spans"], names)
        hook = masses.mass_fn(rows, q_pos, groups, len(names), impl=cfg.mass_impl)
    out = model(batch["input_ids"], batch.get("pixel_values"), batch.get("pixel_attention_mask"),
                batch["attention_mask"], mass_layers=layers if need_mass else (), mass_fn=hook,
                mass_values=hook.values if hook else None)
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                         reduction="sum")
    terms = {"ce": Term(ce, "n_label", 1.0)}
    if is_avar:
        a = avar.avar_terms(out.masses, layers, row_span, batch["spans"], cfg.eps)
        terms.update(img=Term(a["img_sum"], "img_count", cfg.avar_img),
                     sys=Term(a["sys_sum"], "sys_count", cfg.avar_sys))
    elif need_mass:
        m = torch.stack([out.masses[layer] for layer in layers]).mean(0).mean(1)  # (B, Nq, 2)
        in_r, in_a = row_span == data.R, row_span == data.A
        # push below t only
        m_vis = m[..., 0] if cfg.vis_target is None else m[..., 0].clamp(max=cfg.vis_target)
        m_ans = m[..., 1] if cfg.ans_target is None else m[..., 1].clamp(max=cfg.ans_target)
        trained = cfg.objective == "attcot"  # else measured only
        terms.update(vis=Term(-(torch.log(m_vis + cfg.eps) * in_r).sum(), "r_count",
                              cfg.lambda_vis if trained else 0.0),
                     ans=Term(-(torch.log(m_ans + cfg.eps) * in_a).sum(), "a_count",
                              cfg.lambda_ans if trained else 0.0),
                     vas=Term((m[..., 0].detach() * in_r).sum(), "r_count", 0.0))
        if cfg.vis_target is not None:  # under the floor L_vis sits at -log t; these say what it pushes
            below = (m[..., 0].detach() < cfg.vis_target) & in_r
            terms.update(below=Term(below.sum(), "r_count", 0.0),
                         below_vas=Term((m[..., 0].detach() * below).sum(), "below", 0.0))
    if cfg.lambda_commit and batch.get("commit"):
        c = commit.commit_terms(model, batch["commit"], cfg.commit_floor)
        terms.update(commit=Term(c["commit_sum"], "commit_count", cfg.lambda_commit),
                     commit_p=Term(c["commit_p_sum"], "commit_count", 0.0))
    return terms


def step_counts(batches):
    """The counts the terms' sums are divided by, over all micro-batches of a step (float tensors)."""
    return {"n_label": sum((b["labels"][:, 1:] != -100).sum() for b in batches).float(),
            "r_count": sum((b["spans"] == data.R).sum() for b in batches).float(),
            "a_count": sum((b["spans"] == data.A).sum() for b in batches).float(),
            "commit_count": torch.tensor(float(sum(len(b["commit"]["input_ids"]) for b in batches
                                                   if b.get("commit")))),
            **avar.avar_counts(batches)}


def total_loss(terms, counts):
    """The loss: each weighted term's sum times its weight over its step's count, summed in the
    table's order (for one micro-batch's backward, or the step's whole sums for the logged loss)."""
    loss = 0.0
    for t in terms.values():
        if t.weight:
            loss = loss + t.weight * t.sum / counts[t.count]
    return loss


def means(sums, terms, counts):
    """The step's mean of every term: sums {name: float} over the global batch, counts the global
    ones; a term counted by another term is a share of that one's sum (at least 1)."""
    return {k: sums[k] / (counts[t.count] if t.count in counts else max(sums[t.count], 1.0))
            for k, t in terms.items()}
