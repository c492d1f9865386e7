"""
Measuring what the papers claim, and drawing it.

- accuracy with chain of thought: the model writes its rationale and answer (greedy); the answer
  after the last "Answer:" is compared with the gold one (answers.py; docs/methods.md),
  with a bootstrap 95% interval; answers that cannot be read are wrong and also counted
- text-prior baseline: the most common training answer per question type, never looking; prior
  agreement: the share of the model's wrong answers that are the prior's (reliance on it)
- counterfactual consistency: for each (item, edited twin) pair whose answers differ, both right
- where it looks (teacher forced, on gold and on the model's own rationales): image mass of the
  rationale per layer and along the rationale, the answer's mass on the rationale and the image;
  VAS is the mean image mass of the rationale tokens on the gold replies
- occlusion: the evidence boxes painted grey (and, as the control, as much area elsewhere): the
  share of answers that change
- early commitment: the model's own rationale cut short, the answer forced
"""
import argparse
import collections
import hashlib
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
from PIL import ImageDraw

import config
import data
import lora
import masses
from analysis import explorer
from analysis import report
from analysis.boxes import control_boxes
from analysis.commitment import CUTS, early_commitment
from answers import is_right, matches, read_answer, with_candidates
from generate import generate_answers
from records import read_records


def records_key(records):
    """What a row was measured on: a hash of the eval records (their every field but where in which
    file they were read), so that a row is never shown as another set's."""
    text = json.dumps([{k: v for k, v in r.items() if k != "source"} for r in records], sort_keys=True,
                      default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def bootstrap_ci(values, n=1000, seed=0):
    """95% percentile interval of the mean of 0/1 values, resampled n times (seeded)."""
    v = torch.tensor([float(x) for x in values])
    if len(v) == 0:
        return None
    idx = torch.randint(len(v), (n, len(v)), generator=torch.Generator().manual_seed(seed))
    means = v[idx].mean(1).sort().values
    return round(float(means[int(0.025 * n)]), 4), round(float(means[int(0.975 * n) - 1]), 4)


GREY = (128, 128, 128)


def occluded(image, boxes):
    """A copy of the image with each (x0, y0, x1, y1) pixel box painted grey."""
    im = data.load_image(image).convert("RGB")
    draw = ImageDraw.Draw(im)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=GREY)
    return im


def occlusion(model, proc, records, texts, batch_size=64, max_new_tokens=160, seed=0, log=None):
    """For the records with evidence `boxes` (pixel boxes in their one image): the share of answers
    that change, against the model's own unoccluded answer, when the evidence is painted grey, next
    to the share that change when as much area elsewhere is (the control: control_boxes). Reported:
    how many items each control rule covered, and the items left out by reason (no evidence box,
    not one image, no room for the control), and per item (its index in records) whether each
    changed its answer. A grounded model changes the first and not the second."""
    rng = np.random.default_rng(seed)
    picked, evidence, control, rules, left_out = [], [], [], collections.Counter(), collections.Counter()
    for i, (r, t) in enumerate(zip(records, texts)):
        if not r.get("boxes") or len(r["images"]) != 1:
            left_out["no evidence box" if not r.get("boxes") else "not one image"] += 1
            continue
        im = data.load_image(r["images"][0], r["source"])
        clip = lambda v, n: min(max(int(round(v)), 0), n)
        boxes = [(clip(b[0], im.width), clip(b[1], im.height), clip(b[2], im.width), clip(b[3], im.height))
                 for b in r["boxes"]]
        boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
        others, rule = (None, "boxes outside the image")
        if boxes:
            others, rule = control_boxes(boxes, im.width, im.height, rng)
        if others is None:
            left_out[rule] += 1
            continue
        rules[rule] += 1
        picked.append((i, r, t))
        evidence.append({**r, "images": [occluded(im, boxes)]})
        control.append({**r, "images": [occluded(im, others)]})
    if not picked:
        return None
    before = [read_answer(r, t) for _, r, t in picked]
    changed = lambda recs: [read_answer(r, t) != b for r, t, b in zip(
        recs, generate_answers(model, proc, recs, batch_size, max_new_tokens, log=log), before)]
    on_evidence, on_control = changed(evidence), changed(control)
    return {"n": len(picked), "evidence_changed": sum(on_evidence) / len(picked),
            "control_changed": sum(on_control) / len(picked), "control_rules": dict(rules),
            "left_out": dict(left_out),
            "items": [{"index": i, "evidence_changed": e, "control_changed": c}
                      for (i, _, _), e, c in zip(picked, on_evidence, on_control)]}


def text_prior(train_records):
    """Most common training answer per question type: the accuracy a model gets without looking."""
    by_type = collections.defaultdict(collections.Counter)
    for r in train_records:
        by_type[r.get("type")][str(r["answer"])] += 1
    return {t: c.most_common(1)[0][0] for t, c in by_type.items()}


# disjoint: the intervention's renormalisation (mass_kernel.boosted) needs it
PROFILE_GROUPS = ("image", "rationale")


@torch.no_grad()
def attention_profile(model, proc, records, layers, batch_size=32, bins=10):
    """Where the reply looks, teacher-forced on records (gold replies, or the model's own): per layer,
    the image mass of the rationale tokens (mean over heads and tokens); along the rationale, that
    mass (mean over the layers) in `bins` bins of relative position; and for the answer tokens, the
    mass on the rationale and on the image. Masses from mass_kernel.attention_mass, no (T, T) matrix."""
    model.eval()
    device = next(model.parameters()).device
    examples = data.encode_all(proc, records, skips=data.Skips())  # too long to teacher-force: left out
    by_layer, along, n_along = torch.zeros(len(layers)), torch.zeros(bins), torch.zeros(bins)
    n_r, n_a, answer = 0, 0, torch.zeros(2)
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device)
                 for k, v in data.collate(examples[s:s + batch_size], proc.pad_token_id).items()}
        rows, q_pos, row_span = masses.query_rows(batch["spans"])
        groups = masses.key_groups(batch["spans"], PROFILE_GROUPS)
        hook = masses.mass_fn(rows, q_pos, groups, len(PROFILE_GROUPS),
                              boost=model.boost_at)
        out = model(batch["input_ids"], batch.get("pixel_values"), batch.get("pixel_attention_mask"),
                    batch["attention_mask"], mass_layers=layers, mass_fn=hook,
                    mass_values=hook.values)  # the masses under the intervention
        m = torch.stack([out.masses[layer] for layer in layers]).mean(2).float().cpu()  # (L, B, Nq, 2)
        in_r, in_a = (row_span == data.R).cpu(), (row_span == data.A).cpu()
        by_layer += (m[..., 0] * in_r).sum((1, 2))
        step = (in_r.cumsum(1) - 1) / in_r.sum(1, keepdim=True).clamp(min=1)  # 0 .. <1 along each rationale
        b = (step * bins).long().clamp(0, bins - 1)[in_r]
        along.index_add_(0, b, m.mean(0)[..., 0][in_r])
        n_along.index_add_(0, b, torch.ones(len(b)))
        answer += (m.mean(0) * in_a[..., None]).sum((0, 1)).flip(0)  # (on the rationale, on the image)
        n_r, n_a = n_r + int(in_r.sum()), n_a + int(in_a.sum())
    return {"layers": list(layers), "image_mass_by_layer": (by_layer / max(n_r, 1)).tolist(),
            "image_mass_along_rationale": (along / n_along.clamp(min=1)).tolist(),
            "answer_mass_on_rationale": float(answer[0]) / max(n_a, 1),
            "answer_mass_on_image": float(answer[1]) / max(n_a, 1), "n": len(examples)}


def own_rationale_records(records, texts, marker="Answer:"):
    """The records with the model's own replies in place of the gold ones (those with an answer)."""
    return [{**r, "reply": t.strip()} for r, t in zip(records, texts) if marker in t and t.strip()]


def reply_steps(text, most=6, marker="Answer:"):
    """A reply -> its steps: the rationale's sentences (neighbours joined to at most `most`), then
    the answer part."""
    cut = text.rfind(marker) if marker in text else len(text)
    sentences = [p for p in re.split(r"(?<=[.;!?])\s+", text[:cut].strip()) if p]
    per = math.ceil(len(sentences) / most) if sentences else 1
    steps = [" ".join(sentences[i:i + per]) for i in range(0, len(sentences), per)]
    return steps + ([text[cut:].strip()] if marker in text else [])


def attention_steps(model, proc, rec, layers):
    """For a heatmap: the record's image, each image token's box in it, and per step of the reply
    (reply_steps) its words, its image mass and its mean attention on each image token."""
    weights, ids = explorer.image_attention(model, proc, rec, layers)
    weights = weights.mean(0)  # over the layers
    # where each token ends in the reply
    ends = [len(proc.decode(ids[:i + 1]).strip()) for i in range(len(ids))]
    steps, start, out = reply_steps(rec["reply"]), 0, []
    reply = proc.decode(ids).strip()
    for step in steps:
        found = reply.find(step, start)
        end = found + len(step) if found >= 0 else len(reply)
        picked = [i for i, e in enumerate(ends) if start < e <= end]
        start = end
        if picked:
            w = weights[picked].mean(0)
            out.append({"text": step, "image_mass": float(w.sum()), "weights": w.tolist()})
    im = data.load_image(rec["images"][0], rec["source"])
    return {"image": os.path.abspath(rec["images"][0]) if isinstance(rec["images"][0], str) else None,
            "question": rec["question"],
            "boxes": proc.image_token_boxes(im.width, im.height), "steps": out}


@data.remembering_images()  # the phases below read each record's image several times: decode and tile it once
def evaluate(model, proc, eval_records, train_records, layers=None, batch_size=128, max_new_tokens=160,
             commitment=True, heatmaps=3, explore=12, cot="bare", log=None):
    """-> dict with accuracy_cot and accuracy_direct (the question asks for the answer alone), each with
    its bootstrap 95% interval and the answers that could not be read (counted wrong), reply_tokens
    (mean reply length in each mode), text_prior_accuracy, prior_agreement (of the wrong answers that
    can be read, the share that are the prior's; prior_agreement_n of them), counterfactual_consistency
    (pairs whose both halves are in eval_records), where_it_looks (attention_profile on the gold and
    on the model's own rationales, for `layers`; vas_rationale is its mean image mass on the gold
    ones), occlusion (records with evidence boxes: answers changed by greying the evidence, and by
    greying as much elsewhere), early_commitment (per cut of the rationale: agreement with the final
    answer, accuracy), heatmaps (attention_steps on the model's own replies, or the gold ones where
    it wrote nothing, to the first few records with one image), explore (explorer.explore: each reply
    token's attention over the image per layer, for the first `explore` one-image records: what
    report.html shows), accuracy_by_type and accuracy_by_type_direct (each prompt's accuracy per
    question type), n, and seconds and items/s per phase. cot: how the CoT prompt asks (data.asked:
    "bare", the question as written, or "cot", with the step-by-step instruction); every measure but
    direct accuracy reads that prompt. log(line): progress."""
    if not eval_records:
        raise data.DataError("evaluate: no evaluation records")
    measured_on = records_key(eval_records)
    direct_records = [{**r, "question": data.asked(r["question"], "direct")} for r in eval_records]
    eval_records = [{**r, "question": data.asked(r["question"], cot)} for r in eval_records]
    eval_records = with_candidates(eval_records, train_records)  # answers are read among their type's
    phase_log = lambda phase: (lambda line: log(f"  {phase}: {line}")) if log else None
    t0, seconds = time.time(), {}
    texts = generate_answers(model, proc, eval_records, batch_size, max_new_tokens, log=phase_log("cot"))
    seconds["cot"], t0 = time.time() - t0, time.time()
    direct = generate_answers(model, proc, direct_records, batch_size, max_new_tokens,
                              log=phase_log("direct"))
    seconds["direct"] = time.time() - t0
    key = lambda i, r: r.get("id", i)
    got = [read_answer(r, t) for r, t in zip(eval_records, texts)]
    right = {key(i, r): matches(got[i], r) for i, r in enumerate(eval_records)}
    got_direct = [read_answer(r, t) for r, t in zip(eval_records, direct)]
    right_direct = [matches(g, r) for g, r in zip(got_direct, eval_records)]
    prior = text_prior(train_records)
    prior_right = [str(r["answer"]) == prior.get(r.get("type"), "") for r in eval_records]
    # reliance on the text prior: of the wrong answers that can be read, the share that are the prior's
    # answer for that type (a reply with no answer is counted as unparseable, not here)
    wrong = [(r, t) for i, (r, t) in enumerate(zip(eval_records, texts))
             if got[i] is not None and not right[key(i, r)]]
    says_prior = [r.get("type") in prior and is_right({**r, "answer": prior[r.get("type")]}, t)
                  for r, t in wrong]
    # both halves present
    pairs = [(r["twin_of"], r["id"]) for r in eval_records if r.get("twin_of") in right]
    consistent = [right[a] and right[b] for a, b in pairs]
    t0 = time.time()
    own = own_rationale_records(eval_records, texts)
    looks = {"gold": attention_profile(model, proc, eval_records, layers),
             "own": attention_profile(model, proc, own, layers)} if layers else None
    seconds["masses"], t0 = time.time() - t0, time.time()
    commit = early_commitment(model, proc, eval_records, texts, batch_size,
                              log=phase_log("commitment")) if commitment else None
    seconds["commitment"], t0 = time.time() - t0, time.time()
    occlude = occlusion(model, proc, eval_records, texts, batch_size, max_new_tokens,
                        log=phase_log("occlusion"))
    seconds["occlusion"], t0 = time.time() - t0, time.time()
    pictured = [(r, t.strip()) for r, t in zip(eval_records, texts)
                if len(r["images"]) == 1][:heatmaps] if layers else []
    maps = [{**attention_steps(model, proc, {**r, "reply": t or r["reply"]}, layers),
             "reply": "own" if t else "gold"} for r, t in pictured]
    seconds["heatmaps"], t0 = time.time() - t0, time.time()
    explored = explorer.explore(model, proc, eval_records, texts, layers, explore) if layers else []
    seconds["explore"] = time.time() - t0

    def n_tokens(replies):  # the mean reply length in tokens (stubs in tests have no processor)
        return sum(len(proc.tokenizer.encode(t).ids) for t in replies) / len(replies) if proc else None
    result = {
        "n": len(eval_records),
        "eval_key": measured_on,
        "accuracy_cot": sum(right.values()) / len(eval_records),
        "accuracy_cot_ci95": bootstrap_ci(right.values()),
        "unparseable": sum(g is None for g in got),
        "accuracy_direct": sum(right_direct) / len(eval_records),
        "accuracy_direct_ci95": bootstrap_ci(right_direct),
        "unparseable_direct": sum(g is None for g in got_direct),
        "reply_tokens": {"cot": n_tokens(texts), "direct": n_tokens(direct)},
        "text_prior_accuracy": sum(prior_right) / len(eval_records) if prior else None,
        "prior_agreement": sum(says_prior) / len(wrong) if wrong and prior else None,
        "prior_agreement_n": len(wrong),  # the wrong, readable answers it rests on
        "counterfactual_consistency": sum(consistent) / len(pairs) if pairs else None,
        "counterfactual_consistency_ci95": bootstrap_ci(consistent),
        "vas_rationale": sum(looks["gold"]["image_mass_by_layer"]) / len(layers) if looks else None,
        "where_it_looks": looks,
        "early_commitment": commit,
        "occlusion": occlude,
        "heatmaps": maps,
        "explore": explored,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "examples": [{"question": r["question"], "answer": r["answer"], "output": t, "direct": d}
                     for r, t, d in list(zip(eval_records, texts, direct))[:5]],
    }
    items = {"cot": len(eval_records), "direct": len(eval_records),
             "commitment": commit["n"] * len(CUTS) if commit else 0,
             "occlusion": 2 * occlude["n"] if occlude else 0,
             "masses": (len(eval_records) + len(own)) * bool(layers)}
    result["items_per_second"] = {k: round(n / seconds[k], 1) for k, n in items.items()
                                  if n and seconds[k] > 0}
    by_type, by_type_direct = collections.defaultdict(list), collections.defaultdict(list)
    for i, r in enumerate(eval_records):
        by_type[r.get("type")].append(right[key(i, r)])
        by_type_direct[r.get("type")].append(right_direct[i])
    result["accuracy_by_type"] = {t: sum(v) / len(v) for t, v in by_type.items()}
    result["accuracy_by_type_direct"] = {t: sum(v) / len(v) for t, v in by_type_direct.items()}
    return result


def model_names(dirs):
    """Folder -> a short name for the table: its own name, or its parent's for .../model, made unique."""
    names = []
    for d in dirs:
        parts = os.path.normpath(os.path.abspath(d)).split(os.sep)
        name = parts[-2] if parts[-1] in ("model", "checkpoint") and len(parts) > 1 else parts[-1]
        names.append(name if name not in names else f"{name}-{len(names) + 1}")
    return names


def parser():
    p = argparse.ArgumentParser(prog="eval.py", description="Evaluate checkpoints: one table, report.json, "
                                "report.md and PNGs.")
    p.add_argument("--model", action="append", required=True, help="a checkpoint folder (repeat to compare)")
    p.add_argument("--adapter", action="append", default=[], help="a LoRA adapter folder (this project's or "
                   "PEFT's) folded into the --model of the same place (repeat: one per --model, or none)")
    p.add_argument("--data", required=True, help="eval records (JSONL or LLaVA JSON, as for training)")
    p.add_argument("--train-data", default="", help="training records: the text-prior baseline, and each "
                   "question type's candidate answers, which answers are read among and early commitment "
                   "scores (default: none)")
    p.add_argument("--out", default="report", help="folder of the report (default: %(default)s)")
    p.add_argument("--limit", type=int, default=0, help="at most this many eval records (default: 0, all)")
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda or cuda:N "
                   "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="records per generation batch (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="longest reply (default: %(default)s)")
    p.add_argument("--prompt", default="bare", choices=("bare", "cot"), help="how the CoT prompt asks: bare "
                   "(the question as written) or cot (+ 'Think step by step.', for models of the base) "
                   "(default: %(default)s)")
    p.add_argument("--explore", type=int, default=12, help="eval items (with one image) whose every reply "
                   "token's attention report.html shows (default: %(default)s)")
    p.add_argument("--layers", default="all", help=f"the layers of the attention masses: "
                   f"{config.LAYER_GRAMMAR} (default: %(default)s)")
    p.add_argument("--visual-attn-scale", default="", help="test-time intervention: comma-separated "
                   "factors f; each model is also evaluated with its image keys' attention times f, a row "
                   "per f (default: none)")
    p.add_argument("--visual-attn-layers", default="all", help="the layers of the intervention, same "
                   "grammar as --layers (default: %(default)s)")
    return p


def main(argv=None):
    from device import pick_device
    args = parser().parse_args(argv)
    log = lambda line: print(line, file=sys.stderr, flush=True)
    with config.one_line_errors():
        try:
            scales = [float(f) for f in args.visual_attn_scale.split(",") if f.strip()]
        except ValueError:
            scales = [0.0]
        if any(f <= 0 for f in scales):
            raise config.ConfigError(f"--visual-attn-scale {args.visual_attn_scale}: want comma-separated "
                                     "numbers > 0")
        for flag in ("--layers", "--visual-attn-layers"):
            config.layer_set(getattr(args, flag[2:].replace("-", "_")), flag=flag)
        device = pick_device(args.device)
        skips = data.Skips()
        records = read_records(args.data, skips)[:args.limit or None]
        if not records:
            raise data.DataError(f"{args.data}: no usable evaluation record ({skips})")
        train_records = read_records(args.train_data, data.Skips()) if args.train_data else []
        results = {}
        if args.adapter and len(args.adapter) != len(args.model):
            raise config.ConfigError(f"--adapter given {len(args.adapter)} times for {len(args.model)} "
                                     "--model: one per model, in the same order, or none")
        adapters = args.adapter or [""] * len(args.model)
        for name, folder, adapter in zip(model_names(args.model), args.model, adapters):
            proc = data.Processor.from_pretrained(folder)
            dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
            model = lora.load(folder, adapter, dtype=dtype).to(device)
            layers = config.layer_set(args.layers, len(model.layers), "--layers")
            boost_layers = config.layer_set(args.visual_attn_layers, len(model.layers),
                                            "--visual-attn-layers")
            for f in [1.0] + scales:
                row = name if f == 1 else f"{name} img x{f:g}"
                log(f"{row}: {folder}, {len(records)} records")
                t0 = time.time()
                model.boost_image_attention(f, boost_layers)
                results[row] = evaluate(model, proc, records, train_records, layers, args.batch_size,
                                        args.max_new_tokens, explore=args.explore, cot=args.prompt, log=log)
                results[row]["wall_seconds"] = round(time.time() - t0, 1)
    print(report.table(results))
    meta = {"models": ", ".join(f"{n} = {f}" for n, f in zip(model_names(args.model), args.model)),
            "data": args.data,
            "n": len(records), "train data (text prior)": args.train_data or "none", "device": str(device)}
    if scales:
        meta["intervention"] = (f"image keys' attention times f in layers {args.visual_attn_layers} "
                                "(rows 'img x f')")
    print(f"wrote {report.write_report(results, args.out, meta)}")


if __name__ == "__main__":
    main()
