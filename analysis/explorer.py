"""
report.html: where each token of a reply looks, in one page that opens from disk. Scripts, styles,
images and numbers are inline (the page's code is explorer.html); it asks the network for nothing.

For the first few eval items with one image (eval.py --explore N), the model's own reply (the gold
one where it wrote none) is teacher forced and each reply token's attention on each image token is
read per layer (mean over heads), from the same pass the PNG heatmaps use. The page lays a token's
weights over the image as those heatmaps do: each image token's cell mapped back to its pixels
(tiles row-major, then the global image; pixel-shuffle cells row-major within a tile), a cell's
weight spread evenly over its pixels, overlapping cells adding up, the brightest pixel strongest.
"""
import base64
import io
import json
import math
import os

import torch

import data

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explorer.html")
IMAGE_SIDE = 512  # images are inlined at most this large (the boxes stay in the original's pixels)


@torch.no_grad()
def image_attention(model, proc, rec, layers):
    """One record, its reply teacher forced -> (L, n_reply, n_image): each reply token's attention on
    each image token in each of `layers` (mean over heads; under the test-time intervention when it
    is on), and the reply's token ids. One item's reply rows x keys are few, so the probabilities are
    formed directly here (a picture, not a training statistic)."""
    model.eval()
    device = next(model.parameters()).device
    ex = data.encode_record(proc, rec)
    batch = {k: v.to(device) for k, v in data.collate([ex], proc.pad_token_id).items()}
    rows = torch.nonzero(batch["spans"][0] >= data.R)[:, 0]
    image = torch.nonzero(batch["spans"][0] == data.V)[:, 0]

    def probs(layer, q, k):  # q (1, Hq, T, d), k (1, Hkv, T, d)
        k = k[0].repeat_interleave(q.shape[1] // k.shape[1], 0).float()
        scores = q[0][:, rows].float() @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (Hq, n, T)
        scores[..., image] += math.log(model.boost_at(layer))
        hidden = torch.arange(k.shape[1], device=device)[None, :] > rows[:, None]
        return scores.masked_fill(hidden, float("-inf")).softmax(-1)[..., image].mean(0)
    out = model(batch["input_ids"], batch.get("pixel_values"), batch.get("pixel_attention_mask"),
                batch["attention_mask"], mass_layers=layers, mass_fn=probs)
    return torch.stack([out.masses[layer] for layer in layers]).cpu(), ex["input_ids"][rows.cpu()]


def token_texts(proc, ids):
    """Each token's piece of the decoded reply (special tokens shown), by decoding the prefixes: the
    pieces of a byte-level BPE join up into the text."""
    pieces, before = [], ""
    for i in range(len(ids)):
        now = proc.decode(ids[:i + 1], skip_special_tokens=False)
        pieces.append(now[len(before):])
        before = now
    return pieces


def explore(model, proc, records, texts, layers, n=12):
    """The first n records with one image, each with the model's own reply (texts; the gold reply
    where it wrote none) -> JSON-ready items: index (in records), question, answer, reply ("own" or
    "gold"), image (path), width, height, boxes (each image token's pixel box), tokens (the reply's
    pieces) and weights[layer][token][image token] (image_attention, 4 decimals; layers in order)."""
    items = []
    for i, (r, t) in enumerate(zip(records, texts)):
        if len(items) == n:
            break
        if len(r["images"]) != 1 or not isinstance(r["images"][0], str):
            continue
        try:
            weights, ids = image_attention(model, proc, {**r, "reply": t.strip() or r["reply"]}, layers)
        except data.RecordError:  # too long to teacher-force
            continue
        im = data.load_image(r["images"][0], r["source"])
        items.append({"index": i, "question": r["question"], "answer": str(r["answer"]),
                      "reply": "own" if t.strip() else "gold", "image": os.path.abspath(r["images"][0]),
                      "width": im.width, "height": im.height,
                      "boxes": [[round(v, 3) for v in b]
                                for b in proc.image_token_boxes(im.width, im.height)],
                      "tokens": token_texts(proc, ids.tolist()), "layers": list(layers),
                      "weights": [[[round(float(w), 4) for w in row] for row in layer]
                                  for layer in weights]})
    return items


def data_uri(image):
    """A path or PIL image -> a PNG data: URI, at most IMAGE_SIDE on its long side."""
    im = data.load_image(image).convert("RGB")
    if max(im.size) > IMAGE_SIDE:
        im.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def by_index(part):
    """A measure's per-item list (early commitment's or occlusion's "items") -> {record index: item}."""
    return {str(item["index"]): item for item in (part or {}).get("items", [])}


def write_html(path, results, table_rows, figures, meta):
    """report.html at path: results {name: evaluate() result}, table_rows as report.table_rows gives
    them, figures [(heading, PNG path)] and meta {key: value}."""
    names = list(results)
    images = {item["image"] for r in results.values() for item in r.get("explore") or []}
    payload = {
        "meta": {k: str(v) for k, v in (meta or {}).items()},
        "names": names,
        "table": [[measure, cells] for measure, cells in table_rows],
        "figures": [[heading, data_uri(file)] for heading, file in figures if os.path.exists(file)],
        "images": {p: data_uri(p) for p in images},
        "models": {name: {"explore": r.get("explore") or [],
                          "commitment": by_index(r.get("early_commitment")),
                          "cuts": (r.get("early_commitment") or {}).get("cuts", []),
                          "occlusion": by_index(r.get("occlusion"))} for name, r in results.items()},
    }
    page = open(PAGE).read().replace("__DATA__", json.dumps(payload).replace("</", "<\\/"))
    with open(path, "w") as f:
        f.write(page)
    return path
