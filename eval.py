"""
Measuring what the papers claim, and drawing it.

- accuracy with chain of thought: the model writes its rationale and answer (greedy); the answer
  after the last "Answer:" is compared with the gold one (REFERENCE.md section 4 conventions)
- text-prior baseline: the most common training answer per question type, never looking
- counterfactual consistency: for each (item, edited twin) pair whose answers differ, both right
- VAS: the mean attention mass of rationale tokens on the image tokens (teacher forced)
"""
import collections
import re

import torch
from PIL import Image, ImageDraw

import data


def extract_answer(text, marker="Answer:"):
    text = text.split("<answer>")[-1].split("</answer>")[0] if "<answer>" in text else text.split(marker)[-1]
    return text.strip().strip(".").strip()


def is_correct(pred, gold, choices=None):
    """Numbers within 5% (ChartQA convention); option letters with punctuation stripped; else exact."""
    pred, gold = pred.strip().lower(), str(gold).strip().lower()
    try:
        g = float(gold)
        return abs(float(pred) - g) <= 0.05 * abs(g) if g else float(pred) == 0
    except ValueError:
        pass
    if choices:
        letters = re.findall(r"\b([a-z])\b", re.sub(r"[().:]", " ", pred))
        if len(letters) == 1:
            return letters[0] == gold
    return pred == gold


@torch.no_grad()
def generate_answers(model, proc, records, batch_size=64, max_new_tokens=160):
    """Greedy CoT generation for each record -> list of generated texts."""
    model.eval()
    device = next(model.parameters()).device
    texts = []
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        prompts = [data.record_prompt(proc, r) for r in chunk]
        images = [[data.load_image(p, r["source"]) for p in r["images"]] for r in chunk]
        batch = proc(prompts, images if any(images) else None, padding_side="left")
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=proc.eos_token_id)
        texts += [proc.decode(row) for row in out]
    return texts


def text_prior(train_records):
    """Most common training answer per question type: the accuracy a model gets without looking."""
    by_type = collections.defaultdict(collections.Counter)
    for r in train_records:
        by_type[r.get("type")][str(r["answer"])] += 1
    return {t: c.most_common(1)[0][0] for t, c in by_type.items()}


@torch.no_grad()
def visual_attention_score(model, proc, records, vas_fn, batch_size=32):
    """Mean over rationale tokens of the attention mass on image tokens; vas_fn(model, batch) gives
    {"vas_sum", "r_count"} for a teacher-forced batch (nanoattcot.loss_terms computes them)."""
    model.eval()
    device = next(model.parameters()).device
    examples = data.encode_all(proc, records, skips=data.Skips())  # too long to teacher-force: left out
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in data.collate(examples[s:s + batch_size], proc.pad_token_id).items()}
        terms = vas_fn(model, batch)
        total, count = total + terms["vas_sum"], count + terms["r_count"]
    return total / max(count, 1)


def evaluate(model, proc, eval_records, train_records, vas_fn=None, batch_size=64, max_new_tokens=160):
    """-> dict with accuracy_cot, text_prior_accuracy, counterfactual_consistency, vas_rationale, n."""
    if not eval_records:
        raise data.DataError("evaluate: no evaluation records")
    texts = generate_answers(model, proc, eval_records, batch_size, max_new_tokens)
    right = {r["id"] if "id" in r else i: is_correct(extract_answer(t), r["answer"], r.get("choices"))
             for i, (r, t) in enumerate(zip(eval_records, texts))}
    prior = text_prior(train_records)
    prior_right = [str(r["answer"]) == prior.get(r.get("type"), "") for r in eval_records]
    pairs = [(r["twin_of"], r["id"]) for r in eval_records if r.get("twin_of") in right]  # both halves present
    result = {
        "n": len(eval_records),
        "accuracy_cot": sum(right.values()) / len(eval_records),
        "text_prior_accuracy": sum(prior_right) / len(eval_records),
        "counterfactual_consistency": sum(right[a] and right[b] for a, b in pairs) / len(pairs) if pairs else None,
        "vas_rationale": visual_attention_score(model, proc, eval_records, vas_fn) if vas_fn else None,
        "examples": [{"question": r["question"], "answer": r["answer"], "output": t}
                     for r, t in list(zip(eval_records, texts))[:5]],
    }
    by_type = collections.defaultdict(list)
    for i, r in enumerate(eval_records):
        by_type[r.get("type")].append(right[r["id"] if "id" in r else i])
    result["accuracy_by_type"] = {t: sum(v) / len(v) for t, v in by_type.items()}
    return result


def plot_curves(metrics, path, keys=("loss", "ce", "vis", "ans", "vas"), size=(720, 420)):
    """Training curves as a PNG drawn with Pillow: one panel per logged key, against the step."""
    keys = [k for k in keys if any(k in m for m in metrics)]
    W, H = size
    im = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(im)
    ph, left = H // max(len(keys), 1), 60
    for n, key in enumerate(keys):
        pts = [(m["step"], m[key]) for m in metrics if key in m and m[key] == m[key]]
        top, right, bottom = n * ph + 14, W - 10, (n + 1) * ph - 8
        draw.rectangle([left, top, right, bottom], outline=(180, 180, 180))
        draw.text((4, top), key, fill="black")
        if len(pts) < 2:
            continue
        (x0, x1), (y0, y1) = (min(p[0] for p in pts), max(p[0] for p in pts)), (min(p[1] for p in pts), max(p[1] for p in pts))
        draw.text((4, top + 12), f"{y1:.3g}", fill=(90, 90, 90))
        draw.text((4, bottom - 10), f"{y0:.3g}", fill=(90, 90, 90))
        xy = [(left + (x - x0) / max(x1 - x0, 1e-9) * (right - left),
               bottom - (y - y0) / max(y1 - y0, 1e-9) * (bottom - top)) for x, y in pts]
        draw.line(xy, fill=(30, 90, 200), width=2)
    draw.text((left, H - 12), f"step {metrics[0]['step'] if metrics else 0} .. {metrics[-1]['step'] if metrics else 0}",
              fill="black")
    im.save(path)
