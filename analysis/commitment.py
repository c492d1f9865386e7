"""
Early answering (the CoT-faithfulness literature's early-commitment measure): the model's own
rationale cut short, the answer marker appended, and every candidate answer scored teacher forced;
the likeliest is the forced answer. No generation, so a model that would write more rationale after
the marker is still read by the candidate it ranks first.
"""
import collections
import re

import torch

import data
from answers import matches, parse_answer, read_answer


CUTS = (0, 25, 50, 75, 100)  # % of the model's own rationale tokens kept before the answer is forced


def forced_candidates(rec):
    """The answers early_commitment chooses the forced answer among, in the gold's form: the option
    letters (or texts) of a multiple-choice record, else its `candidates`; None: open-ended."""
    if rec.get("choices"):
        letters = re.fullmatch(r"[A-Z]", str(rec["answer"]).strip())
        return [chr(65 + i) if letters else re.sub(r"^\(?[A-Z][).:]\s*", "", c).strip()
                for i, c in enumerate(rec["choices"])]
    return rec.get("candidates")


def prompt_inputs(proc, rec):
    """A record's chat prompt with its images expanded, and its pixel tensors: computed once, then
    shared by every forced reply scored on it."""
    prompt, pixels = data.record_prompt(proc, rec), {}
    images = [data.load_image(p, rec["source"]) for p in rec["images"]]
    if images:
        values, mask, rows, cols = proc.image_processor([images])
        prompt = proc.expand_images(prompt, rows[0], cols[0])
        pixels = {"pixel_values": values[0], "pixel_attention_mask": mask[0]}
    return prompt, pixels


@torch.no_grad()
def candidate_probabilities(model, proc, prompts, replies, candidates, batch_size=64):
    """Teacher forced: for record i, prompts[i] (prompt_inputs) + replies[i], then each candidate c as
    " c" and the end of the answer (<end_of_utterance>, as in training), scored by the summed
    log-probability of those tokens -> per record a (K_i,) tensor, softmax-normalised over its
    candidates. No generation: a model that would write more rationale after the marker is still
    read by which candidate it ranks first."""
    model.eval()
    device = next(model.parameters()).device
    examples, owner = [], []
    for i, ((prompt, pixels), reply, cands) in enumerate(zip(prompts, replies, candidates)):
        context = proc.tokenizer.encode(prompt + reply).ids
        for c in cands:
            answer = proc.tokenizer.encode(" " + str(c).strip() + data.SPECIAL["eou"]).ids
            ids = torch.tensor(context + answer)
            labels = torch.where(torch.arange(len(ids)) >= len(context), ids, -100)
            examples.append({"input_ids": ids, "labels": labels, "spans": torch.zeros_like(ids), **pixels})
            owner.append(i)
    scores = []
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device)
                 for k, v in data.collate(examples[s:s + batch_size], proc.pad_token_id or 0).items()}
        logits = model(batch["input_ids"], batch.get("pixel_values"), batch.get("pixel_attention_mask"),
                       batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        scored = labels != -100  # the softmax only where a candidate's token is scored
        logp = logits[scored].float().log_softmax(-1).gather(-1, labels[scored][:, None])[:, 0]
        rows = torch.arange(len(labels), device=device)[:, None].expand_as(labels)[scored]
        scores += torch.zeros(len(labels), device=device, dtype=logp.dtype).index_add_(0, rows,
                                                                                       logp).cpu().tolist()
    per = [[] for _ in prompts]
    for i, v in zip(owner, scores):
        per[i].append(v)
    return [torch.tensor(v, dtype=torch.float64).softmax(0) for v in per]


def early_commitment(model, proc, records, texts, batch_size=64, cuts=CUTS, marker="Answer:", log=None):
    """Early answering: the model's own rationale cut at each share of its tokens, then the answer
    marker; every candidate answer (forced_candidates) scored teacher forced
    (candidate_probabilities), the forced answer being the likeliest. Per cut: agreement of the
    forced answer with the model's own final answer, its accuracy, and the mean probability
    (normalised over the candidates) of the final answer: how early the final answer leads.
    Scored: the records with a candidate set whose final answer is one of them; the others are left
    out and counted by reason."""
    finals = [read_answer(r, t) for r, t in zip(records, texts)]
    keep, left_out = [], collections.Counter()
    for i, (r, final) in enumerate(zip(records, finals)):
        readings = {}  # one candidate per reading ("2" and "02" are one answer)
        for c in forced_candidates(r) or []:
            readings.setdefault(parse_answer(str(c), r["answer"], r.get("choices"), r.get("candidates")),
                                str(c))
        readings.pop(None, None)
        if not readings:
            left_out["no candidate set (open-ended)"] += 1
        elif final not in readings:
            left_out["final answer not a candidate"] += 1
        else:
            keep.append((i, list(readings.values()), list(readings).index(final)))
    out = {"cuts": list(cuts), "agreement": [], "accuracy": [], "final_answer_probability": [],
           "n": len(keep), "left_out": dict(left_out),
           "items": [{"index": i, "forced": [], "p_final": []} for i, _, _ in keep]}  # per item, per cut
    if not keep:
        return out
    recs = [records[i] for i, _, _ in keep]
    prompts = [prompt_inputs(proc, r) for r in recs]
    rationales = [proc.tokenizer.encode(texts[i][:texts[i].rfind(marker)] if marker in texts[i]
                                        else texts[i]).ids
                  for i, _, _ in keep]
    for cut in cuts:
        kept = [proc.decode(ids[:round(len(ids) * cut / 100)]).strip() for ids in rationales]
        # as trained: " rationale Answer: x"
        replies = [" " + " ".join(filter(None, [k, marker])) for k in kept]
        probs = candidate_probabilities(model, proc, prompts, replies, [c for _, c, _ in keep], batch_size)
        forced = [int(p.argmax()) for p in probs]
        out["agreement"].append(sum(f == j for f, (_, _, j) in zip(forced, keep)) / len(keep))
        read = [parse_answer(str(c[f]), r["answer"], r.get("choices"), r.get("candidates"))
                for f, (_, c, _), r in zip(forced, keep, recs)]
        out["accuracy"].append(sum(matches(a, r) for a, r in zip(read, recs)) / len(keep))
        out["final_answer_probability"].append(sum(float(p[j])
                                                   for p, (_, _, j) in zip(probs, keep)) / len(keep))
        for item, p, f, (_, c, j) in zip(out["items"], probs, forced, keep):
            item["forced"].append(c[f])
            item["p_final"].append(round(float(p[j]), 4))
        if log:
            log(f"cut {cut}%: {len(keep)} items x their candidates scored")
    return out
