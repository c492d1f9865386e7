"""
Measuring what the papers claim, and drawing it.

- accuracy with chain of thought: the model writes its rationale and answer (greedy); the answer
  after the last "Answer:" is compared with the gold one (REFERENCE.md section 4 conventions),
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
import collections
import re
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import kernels


def extract_answer(text, marker="Answer:"):
    """The answer part of a reply: inside <answer>...</answer>, else after the last marker, else
    after the last "the answer is", else the whole reply (a direct answer)."""
    if "<answer>" in text:
        text = text.split("<answer>")[-1].split("</answer>")[0]
    elif marker in text:
        text = text.split(marker)[-1]
    elif said := re.findall(r"answer is:?(.*)", text, flags=re.IGNORECASE | re.DOTALL):
        text = said[-1]
    return text.strip().strip(".").strip()


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def option_letter(pred, n_options):
    """The one option letter in pred ("(B)", "B.", "B) red", a bare "b"), else None. Within words,
    capitals only: "a" is an article."""
    bare = re.sub(r"[\W_]", "", pred)
    letters = {bare.upper()} if len(bare) == 1 else set(re.findall(r"\b([A-Z])\b", re.sub(r"[().:,]", " ", pred)))
    letters = {c for c in letters if 0 <= ord(c) - 65 < n_options}
    return letters.pop() if len(letters) == 1 else None


def parse_answer(pred, gold, choices=None):
    """pred -> the form it is compared in (REFERENCE.md section 4), or None if no answer can be read:
    an option letter for multiple choice (one letter, else the one option whose text it names), a
    number when the gold is one (the single number in pred), else the lower-cased text."""
    if choices:
        texts = [re.sub(r"^\(?[A-Z][).:]\s*", "", c).strip().lower() for c in choices]
        named = [chr(65 + i) for i, t in enumerate(texts) if t and re.search(rf"\b{re.escape(t)}\b", pred.lower())]
        return option_letter(pred, len(choices)) or (named[0] if len(named) == 1 else None)
    if NUMBER.fullmatch(str(gold).strip()):
        numbers = NUMBER.findall(pred.replace(",", ""))
        return float(numbers[0]) if len(numbers) == 1 else None
    return pred.strip().lower() or None


def read_answer(rec, text):
    """The answer a reply gives to a record, parsed for comparison (None: it cannot be read)."""
    return parse_answer(extract_answer(text), rec["answer"], rec.get("choices"))


def is_correct(pred, gold, choices=None):
    """Option letters; counting (integer gold) exact: 19 is not 20; other numbers within 5% (ChartQA's
    relaxed match); else exact text. An answer that cannot be read is wrong."""
    return matches(parse_answer(pred, gold, choices), gold, choices)


def matches(got, gold, choices=None):
    """A parsed answer (parse_answer) against the gold one, by is_correct's rules."""
    gold = str(gold).strip()
    if got is None:
        return False
    if isinstance(got, float):  # an integer gold ("20", not "20.0") is a count
        g = float(gold)
        return got == g if re.fullmatch(r"-?\d+", gold) else abs(got - g) <= 0.05 * abs(g)
    return got == (parse_answer(gold, gold, choices) if choices else gold.lower())  # a gold letter or option text


def bootstrap_ci(values, n=1000, seed=0):
    """95% percentile interval of the mean of 0/1 values, resampled n times (seeded)."""
    v = torch.tensor([float(x) for x in values])
    if len(v) == 0:
        return None
    idx = torch.randint(len(v), (n, len(v)), generator=torch.Generator().manual_seed(seed))
    means = v[idx].mean(1).sort().values
    return round(float(means[int(0.025 * n)]), 4), round(float(means[int(0.975 * n) - 1]), 4)


@torch.no_grad()
def generate_answers(model, proc, records, batch_size=64, max_new_tokens=160, replies=None):
    """Greedy generation for each record -> list of generated texts. replies: a text per record that
    the reply is forced to start with (a cut rationale and the answer marker, say)."""
    model.eval()
    device = next(model.parameters()).device
    texts = []
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        prompts = [data.record_prompt(proc, r) + (replies[s + i] if replies else "") for i, r in enumerate(chunk)]
        images = [[data.load_image(p, r["source"]) for p in r["images"]] for r in chunk]
        batch = proc(prompts, images if any(images) else None, padding_side="left")
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=proc.eos_token_id)
        texts += [proc.decode(row) for row in out]
    return texts


GREY = (128, 128, 128)


def occluded(image, boxes):
    """A copy of the image with each (x0, y0, x1, y1) pixel box painted grey."""
    im = data.load_image(image).convert("RGB")
    draw = ImageDraw.Draw(im)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=GREY)
    return im


def control_boxes(boxes, width, height, rng, tries=100):
    """For each evidence box, a box of the same size at a random place that overlaps no evidence box
    (the control: the same area hidden, elsewhere). None if one cannot be placed."""
    out = []
    overlaps = lambda a, b: a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
    for x0, y0, x1, y1 in boxes:
        w, h = x1 - x0, y1 - y0
        for _ in range(tries):
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            if not any(overlaps((x, y, x + w, y + h), b) for b in boxes):
                out.append((x, y, x + w, y + h))
                break
        else:
            return None
    return out


def occlusion(model, proc, records, texts, batch_size=64, max_new_tokens=160, seed=0):
    """For the records with evidence `boxes` (pixel boxes in their one image): the share of answers
    that change when the evidence is painted grey, next to the share that change when boxes of the
    same size elsewhere are (the control). A grounded model changes the first and not the second."""
    rng = np.random.default_rng(seed)
    picked, evidence, control = [], [], []
    for r, t in zip(records, texts):
        if not r.get("boxes") or len(r["images"]) != 1:
            continue
        im = data.load_image(r["images"][0], r["source"])
        boxes = control_boxes(r["boxes"], im.width, im.height, rng)
        if boxes is None:
            continue
        picked.append((r, t))
        evidence.append({**r, "images": [occluded(im, r["boxes"])]})
        control.append({**r, "images": [occluded(im, boxes)]})
    if not picked:
        return None
    before = [read_answer(r, t) for r, t in picked]
    changed = lambda recs: sum(read_answer(r, t) != b for r, t, b in zip(
        recs, generate_answers(model, proc, recs, batch_size, max_new_tokens), before)) / len(recs)
    return {"n": len(picked), "evidence_changed": changed(evidence), "control_changed": changed(control)}


CUTS = (0, 25, 50, 75, 100)  # % of the model's own rationale tokens kept before the answer is forced


def early_commitment(model, proc, records, texts, batch_size=64, cuts=CUTS, marker="Answer:"):
    """The model's own rationale cut at each share of its tokens, then the answer marker, then a few
    greedy tokens: the forced answer against the model's final answer (agreement) and the gold one
    (accuracy), per cut. A model that already agrees at 0-25% decided before it reasoned."""
    finals = [read_answer(r, t) for r, t in zip(records, texts)]
    rationales = [proc.tokenizer.encode(t[:t.rfind(marker)] if marker in t else t).ids for t in texts]
    out = {"cuts": list(cuts), "agreement": [], "accuracy": []}
    for cut in cuts:
        kept = [proc.decode(ids[:round(len(ids) * cut / 100)]).strip() for ids in rationales]
        replies = [" " + " ".join(filter(None, [k, marker])) for k in kept]  # the training format: " rationale Answer: x"
        forced = generate_answers(model, proc, records, batch_size, max_new_tokens=8, replies=replies)
        read = [read_answer(r, f) for r, f in zip(records, forced)]
        out["agreement"].append(sum(a is not None and a == b for a, b in zip(read, finals)) / len(records))
        out["accuracy"].append(sum(matches(a, r["answer"], r.get("choices")) for a, r in zip(read, records)) / len(records))
    return out


def text_prior(train_records):
    """Most common training answer per question type: the accuracy a model gets without looking."""
    by_type = collections.defaultdict(collections.Counter)
    for r in train_records:
        by_type[r.get("type")][str(r["answer"])] += 1
    return {t: c.most_common(1)[0][0] for t, c in by_type.items()}


@torch.no_grad()
def attention_profile(model, proc, records, layers, batch_size=32, bins=10):
    """Where the reply looks, teacher-forced on records (gold replies, or the model's own): per layer,
    the image mass of the rationale tokens (mean over heads and tokens); along the rationale, that
    mass (mean over the layers) in `bins` bins of relative position; and for the answer tokens, the
    mass on the rationale and on the image. Masses from kernels.attention_mass, no (T, T) matrix."""
    model.eval()
    device = next(model.parameters()).device
    examples = data.encode_all(proc, records, skips=data.Skips())  # too long to teacher-force: left out
    by_layer, along, n_along = torch.zeros(len(layers)), torch.zeros(bins), torch.zeros(bins)
    n_r, n_a, answer = 0, 0, torch.zeros(2)
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in data.collate(examples[s:s + batch_size], proc.pad_token_id).items()}
        spans = batch["spans"]
        rows, q_pos, row_span = data.reply_rows(spans)
        groups = ((spans == data.V).int() | ((spans == data.R).int() << 1)).to(torch.uint8)  # bit 0 image, bit 1 rationale

        def mass_fn(layer, q, k):
            return kernels.attention_mass(data.take_rows(q, rows), k, q_pos, groups, num_groups=2)
        out = model(batch["input_ids"], batch.get("pixel_values"), batch.get("pixel_attention_mask"),
                    batch["attention_mask"], mass_layers=layers, mass_fn=mass_fn)
        m = torch.stack([out.masses[layer] for layer in layers]).mean(2).float().cpu()  # (L, B, Nq, 2)
        in_r, in_a = (row_span == data.R).cpu(), (row_span == data.A).cpu()
        by_layer += (m[..., 0] * in_r).sum((1, 2))
        step = (in_r.cumsum(1) - 1) / in_r.sum(1, keepdim=True).clamp(min=1)  # 0 .. <1 along each rationale
        b = (step * bins).long().clamp(0, bins - 1)[in_r]
        along.index_add_(0, b, m.mean(0)[..., 0][in_r])
        n_along.index_add_(0, b, torch.ones(len(b)))
        answer += (m.mean(0) * in_a[..., None]).sum((0, 1)).flip(0)  # (on the rationale, on the image)
        n_r, n_a = n_r + int(in_r.sum()), n_a + int(in_a.sum())
    return {"image_mass_by_layer": (by_layer / max(n_r, 1)).tolist(),
            "image_mass_along_rationale": (along / n_along.clamp(min=1)).tolist(),
            "answer_mass_on_rationale": float(answer[0]) / max(n_a, 1),
            "answer_mass_on_image": float(answer[1]) / max(n_a, 1), "n": len(examples)}


def own_rationale_records(records, texts, marker="Answer:"):
    """The records with the model's own replies in place of the gold ones (those with an answer)."""
    return [{**r, "reply": t.strip()} for r, t in zip(records, texts) if marker in t and t.strip()]


def evaluate(model, proc, eval_records, train_records, layers=None, batch_size=64, max_new_tokens=160,
             commitment=True):
    """-> dict with accuracy_cot (and its bootstrap 95% interval), unparseable (answers that could not
    be read: counted wrong), text_prior_accuracy, prior_agreement, counterfactual_consistency (pairs
    whose both halves are in eval_records), where_it_looks (attention_profile on the gold and on the
    model's own rationales, for `layers`; vas_rationale is its mean image mass on the gold ones),
    occlusion (records with evidence boxes: answers changed by greying the evidence, and by greying
    as much elsewhere), early_commitment (per cut of the rationale:
    agreement with the final answer, accuracy), accuracy_by_type, n, and seconds per phase."""
    if not eval_records:
        raise data.DataError("evaluate: no evaluation records")
    t0 = time.time()
    texts = generate_answers(model, proc, eval_records, batch_size, max_new_tokens)
    seconds = {"cot": time.time() - t0}
    key = lambda i, r: r.get("id", i)
    preds = {key(i, r): extract_answer(t) for i, (r, t) in enumerate(zip(eval_records, texts))}
    got = [read_answer(r, t) for r, t in zip(eval_records, texts)]
    right = {key(i, r): matches(got[i], r["answer"], r.get("choices")) for i, r in enumerate(eval_records)}
    prior = text_prior(train_records)
    prior_right = [str(r["answer"]) == prior.get(r.get("type"), "") for r in eval_records]
    # reliance on the text prior: of the wrong answers, the share that are the prior's answer for that type
    wrong = [(r, preds[key(i, r)]) for i, r in enumerate(eval_records) if not right[key(i, r)]]
    says_prior = [r.get("type") in prior and is_correct(p, prior[r.get("type")], r.get("choices")) for r, p in wrong]
    pairs = [(r["twin_of"], r["id"]) for r in eval_records if r.get("twin_of") in right]  # both halves present
    consistent = [right[a] and right[b] for a, b in pairs]
    t0 = time.time()
    looks = {"gold": attention_profile(model, proc, eval_records, layers),
             "own": attention_profile(model, proc, own_rationale_records(eval_records, texts), layers)} if layers else None
    seconds["masses"], t0 = time.time() - t0, time.time()
    commit = early_commitment(model, proc, eval_records, texts, batch_size) if commitment else None
    seconds["commitment"], t0 = time.time() - t0, time.time()
    occlude = occlusion(model, proc, eval_records, texts, batch_size, max_new_tokens)
    seconds["occlusion"] = time.time() - t0
    result = {
        "n": len(eval_records),
        "accuracy_cot": sum(right.values()) / len(eval_records),
        "accuracy_cot_ci95": bootstrap_ci(right.values()),
        "unparseable": sum(g is None for g in got),
        "text_prior_accuracy": sum(prior_right) / len(eval_records),
        "prior_agreement": sum(says_prior) / len(wrong) if wrong else None,
        "counterfactual_consistency": sum(consistent) / len(pairs) if pairs else None,
        "counterfactual_consistency_ci95": bootstrap_ci(consistent),
        "vas_rationale": sum(looks["gold"]["image_mass_by_layer"]) / len(layers) if looks else None,
        "where_it_looks": looks,
        "early_commitment": commit,
        "occlusion": occlude,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "examples": [{"question": r["question"], "answer": r["answer"], "output": t}
                     for r, t in list(zip(eval_records, texts))[:5]],
    }
    by_type = collections.defaultdict(list)
    for i, r in enumerate(eval_records):
        by_type[r.get("type")].append(right[key(i, r)])
    result["accuracy_by_type"] = {t: sum(v) / len(v) for t, v in by_type.items()}
    return result


def table(summaries):
    """{name: evaluate() result (+ wall_seconds)} -> the side-by-side text table the run prints."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else f"{v[0]:.2f}-{v[1]:.2f}" if isinstance(v, (tuple, list)) else str(v)
    pair = lambda a, b: f"{a:6.2f}{b:6.2f}"
    runs = list(summaries.values())
    lines = [f"{'':30s}" + "".join(f"{name:>12s}" for name in summaries)]
    for key in ("accuracy_cot", "accuracy_cot_ci95", "unparseable", "text_prior_accuracy", "prior_agreement",
                "counterfactual_consistency", "vas_rationale", "wall_seconds"):
        lines.append(f"{key:30s}" + "".join(f"{cell(r.get(key)):>12s}" for r in runs))
    for which in ("gold", "own"):  # where the rationale and the answer look, teacher forced
        looks = [r["where_it_looks"][which] if r.get("where_it_looks") else None for r in runs]
        lines.append(f"{which + ': image mass 1st/last 10%':30s}" + "".join(
            pair(l["image_mass_along_rationale"][0], l["image_mass_along_rationale"][-1]) if l else f"{'-':>12s}"
            for l in looks))
        lines.append(f"{which + ': answer -> rationale/img':30s}" + "".join(
            pair(l["answer_mass_on_rationale"], l["answer_mass_on_image"]) if l else f"{'-':>12s}" for l in looks))
    lines.append(f"{'occlusion: changed evid/ctrl':30s}" + "".join(
        pair(r["occlusion"]["evidence_changed"], r["occlusion"]["control_changed"]) if r.get("occlusion")
        else f"{'-':>12s}" for r in runs))
    for i, cut in enumerate(CUTS):  # early commitment: the answer forced after cut% of the rationale
        lines.append(f"{f'forced at {cut}%: agree / acc':30s}" + "".join(
            pair(r["early_commitment"]["agreement"][i], r["early_commitment"]["accuracy"][i])
            if r.get("early_commitment") else f"{'-':>12s}" for r in runs))
    return "\n".join(lines)


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
