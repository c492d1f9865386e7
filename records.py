"""
Record files -> records: the formats --data takes, each record checked and turned into one dict
(images as absolute paths, question, reply, answer, source "file:line"; history and system when
the record has earlier turns or a system message). A record that cannot be used is skipped and
counted by reason (data.Skips), never silently dropped. In a .json list or a .jsonl file, each
record may take any of these shapes:

- {image, question, rationale, answer, choices?}: this project's own
- LLaVA: {image, conversations: [{from: human, value: "<image>..."}, {from: gpt, value: "..."}]}
- LLaMA-Factory / ms-swift / TRL: {messages: [{role: system?, content}, {role: user, content:
  "<image>..."}, {role: assistant, content: "..."}], images: [path, ...]}, a content being a string
  with <image> tags or a list of typed parts ({type: text, text} and {type: image}); or TRL's
  {prompt: [messages], completion: [the assistant's message]}

The assistant's last message is the reply to train on, split into rationale and answer by
data.split_reply (<answer>...</answer>, else the last "Answer:", else the last "the answer is"); a
reply without an answer part is skipped. The messages before it (a system message, earlier turns)
are the prompt's history, rendered by the chat template before the question (earlier replies are
prompt, not trained on). A messages record must have as many <image> tags as images.
"""
import json
import os
import re

import data
from files import read_json

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
FORMATS = "question/answer fields, LLaVA conversations, or messages"


def _text(r, key, where):  # a field that must be a non-empty string (numbers allowed for answers)
    value = r.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise data.RecordError(where, f"no {key}", f" (missing or empty {key!r})")
    return value


def _images(r, base, where):
    im = r.get("images", r.get("image"))
    ims = [] if im is None else [im] if isinstance(im, str) else im
    if not isinstance(ims, list) or not all(isinstance(p, str) and p for p in ims):
        raise data.RecordError(where, "bad image field", f" ({im!r}: a path or a list of paths)")
    return [os.path.join(base, p) for p in ims]


def _content(content, where):
    """A message's content as text, its images as <image> tags in place."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [None]
    part_ok = lambda p: isinstance(p, dict) and (p.get("type") == "image" or isinstance(p.get("text"), str))
    if not all(part_ok(p) for p in parts):
        raise data.RecordError(where, "bad content", f" ({content!r:.80}: a string or a list of text and "
                               "image parts)")
    return "".join(data.SPECIAL["image"] if p.get("type") == "image" else p["text"] for p in parts)


def answer_part(reply, cut):
    """The answer a reply gives, from data.split_reply's cut, its marker and tags taken off."""
    part = re.sub(r"^(<answer>|Answer:|the answer is:?)", "", reply[cut:], flags=re.IGNORECASE)
    return part.replace("</answer>", "").strip()


def _turns_record(r, turns, where, base, tags_required):
    """[(role, text)] of a conversation -> the record: the last turn the reply, the one before it the
    question, the ones before that the history."""
    if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise data.RecordError(where, "no user turn then assistant reply", " (the last two messages must be "
                               "the user's and the assistant's)")
    question, reply = turns[-2][1], turns[-1][1].strip()
    if not question.strip() or not reply:
        raise data.RecordError(where, "empty turn", " (the last user message or the reply is empty)")
    cut = data.split_reply(reply)
    if cut < 0:
        raise data.RecordError(where, "no answer",
                               " (the reply has no 'Answer:', <answer> or 'the answer is')")
    images = _images(r, base, where)
    tags = sum(text.count(data.SPECIAL["image"]) for _, text in turns)
    if tags != len(images) and (tags_required or tags):
        raise data.RecordError(where, "<image> tags do not match images",
                               f" ({tags} tags, {len(images)} images)")
    history = [{"role": role, "text": text} for role, text in turns[:-2]]
    system = history[0]["text"] if history and history[0]["role"] == "system" else None
    known = ("messages", "prompt", "completion", "conversations", "images", "image")
    return {**{k: v for k, v in r.items() if k not in known}, "images": images, "question": question,
            "reply": reply, "answer": answer_part(reply, cut), "source": where,
            **({"history": history} if history else {}), **({"system": system} if system else {})}


def _messages_record(r, where, base):
    if "messages" in r:
        messages = r["messages"]
    else:  # TRL's conversational prompt/completion (lists of messages; strings are its other form)
        listed = all(isinstance(r[k], list) for k in ("prompt", "completion"))
        messages = r["prompt"] + r["completion"] if listed else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise data.RecordError(where, "bad messages", " (a list of {role, content} messages)")
    turns = []
    for k, m in enumerate(messages, 1):
        if m.get("role") not in ("system", "user", "assistant"):
            raise data.RecordError(where, "bad role",
                                   f" (message {k}: {m.get('role')!r}, want system, user or "
                                   "assistant)")
        turns.append((m["role"], _content(m.get("content"), f"{where} message {k}")))
    return _turns_record(r, turns, where, base, tags_required=True)


def _llava_record(r, where, base):
    turns = r.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and t.get("from") in ROLES for t in turns):
        raise data.RecordError(where, "no conversations",
                               " (a LLaVA record needs a list of {from, value} turns)")
    for t in turns:
        _text(t, "value", f"{where} {t['from']} turn")
    return _turns_record(r, [(ROLES[t["from"]], str(t["value"])) for t in turns], where, base,
                         tags_required=False)  # LLaVA's own: no tag, the image before the question


def _own_record(r, where, base):
    question, answer = _text(r, "question", where), _text(r, "answer", where)
    choices = r.get("choices") or []
    if not isinstance(choices, list):
        raise data.RecordError(where, "bad choices field", f" ({choices!r}: a list of options)")
    reply = f"{str(r.get('rationale') or '').strip()} Answer: {answer.strip()}".strip()
    return {**r, "images": _images(r, base, where),
            "question": question + "".join(f"\n{c}" for c in choices),
            "answer": answer.strip(), "reply": reply, "source": where}


def parse_record(r, where, base):
    """One record in any of the shapes (the module docstring) -> the record dict."""
    if not isinstance(r, dict):
        raise data.RecordError(where, "not an object", f" ({r!r:.40}: a record is one JSON object)")
    if "messages" in r or ("prompt" in r and "completion" in r):
        return _messages_record(r, where, base)
    if "conversations" in r:
        return _llava_record(r, where, base)
    if "question" not in r and "answer" not in r:
        raise data.RecordError(where, "unknown record shape", f" (keys {sorted(r)[:6]}: want {FORMATS})")
    return _own_record(r, where, base)


def read_records(path, skips=None):
    """A .jsonl file (a record per line) or a .json list of records -> list of record dicts (the
    module docstring). A record that cannot be used (bad JSON, a missing or empty field, no answer,
    <image> tags that do not match the images) goes to skips (a data.Skips); with skips None the
    first one raises."""
    skips = data.Skips(strict=True) if skips is None else skips
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data file not found")
    base = os.path.dirname(os.path.abspath(path))
    out = []

    def add(r, where):
        try:
            out.append(parse_record(r, where, base))
        except data.RecordError as e:
            skips.add(e)
    if path.endswith(".jsonl"):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    skips.add(data.RecordError(f"{path}:{n}", "bad JSON", f" ({e})"))
                    continue
                add(r, f"{path}:{n}")
        return out
    listed = read_json(path, data.DataError)
    if not isinstance(listed, list):
        raise data.DataError(f"{path}: expected a JSON list of records ({FORMATS}), or a .jsonl file")
    for n, r in enumerate(listed, 1):
        add(r, f"{path}:record {n}")
    return out
