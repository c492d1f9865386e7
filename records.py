"""
Record files -> records: the formats --data takes, each record checked and turned into one dict
(images as absolute paths, question, reply, answer, source "file:line"). A record that cannot be
used is skipped and counted by reason (data.Skips), never silently dropped.

- JSONL: {image, question, rationale, answer, choices?} per line
- LLaVA-style JSON: a list of {image, conversations: [{from: human, value: "<image>..."},
  {from: gpt, value: "... Answer: ..."}]}
"""
import json
import os

import data


def _text(r, key, where):  # a field that must be a non-empty string (numbers allowed for answers)
    value = r.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise data.RecordError(where, f"no {key}", f" (missing or empty {key!r})")
    return value


def _images(r, base, where):
    im = r.get("image")
    ims = [] if im is None else [im] if isinstance(im, str) else im
    if not isinstance(ims, list) or not all(isinstance(p, str) and p for p in ims):
        raise data.RecordError(where, "bad image field", f" ({im!r}: a path or a list of paths)")
    return [os.path.join(base, p) for p in ims]


def _jsonl_record(line, where, base):
    try:
        r = json.loads(line)
    except json.JSONDecodeError as e:
        raise data.RecordError(where, "bad JSON", f" ({e})") from None
    if not isinstance(r, dict):
        raise data.RecordError(where, "bad JSON", " (a line must be one JSON object)")
    question, answer = _text(r, "question", where), _text(r, "answer", where)
    choices = r.get("choices") or []
    if not isinstance(choices, list):
        raise data.RecordError(where, "bad choices field", f" ({choices!r}: a list of options)")
    reply = f"{str(r.get('rationale') or '').strip()} Answer: {answer.strip()}".strip()
    return {**r, "images": _images(r, base, where),
            "question": question + "".join(f"\n{c}" for c in choices),
            "answer": answer.strip(), "reply": reply, "source": where}


def _llava_record(r, where, base):
    turns = r.get("conversations") if isinstance(r, dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise data.RecordError(where, "no conversations", " (a LLaVA record needs a list of {from, value} turns)")
    human = next((t for t in turns if t.get("from") == "human"), {})
    gpt = next((t for t in turns if t.get("from") == "gpt"), {})
    question, reply = _text(human, "value", where + " human turn"), _text(gpt, "value", where + " gpt turn")
    cut = data.split_reply(reply)
    if cut < 0:
        raise data.RecordError(where, "no answer", " (the gpt turn has no 'Answer:' or <answer>)")
    answer = reply[cut:].replace("<answer>", "").replace("</answer>", "").removeprefix("Answer:").strip()
    return {"images": _images(r, base, where), "question": question, "reply": reply, "answer": answer,
            "source": where}


def read_records(path, skips=None):
    """JSONL ({image, question, rationale, answer, choices?}) or LLaVA-style JSON ({image,
    conversations: [{from: human, value: "<image>..."}, {from: gpt, value}]}) -> list of dicts with
    images (absolute paths), question, reply, answer, and source ("file:line") for messages. A record
    that cannot be used (bad JSON, a missing or empty field, no answer) goes to skips (a Skips);
    with skips None the first one raises."""
    skips = data.Skips(strict=True) if skips is None else skips
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data file not found")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    if path.endswith(".jsonl"):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    if line.strip():
                        out.append(_jsonl_record(line, f"{path}:{n}", base))
                except data.RecordError as e:
                    skips.add(e)
        return out
    rows = data.read_json(path)
    if not isinstance(rows, list):
        raise data.DataError(f"{path}: expected a JSON list of LLaVA-style records (or a .jsonl file)")
    for n, r in enumerate(rows, 1):
        try:
            out.append(_llava_record(r, f"{path}:record {n}", base))
        except data.RecordError as e:
            skips.add(e)
    return out
