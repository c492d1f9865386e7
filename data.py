"""
Records and images -> model batches.

The Processor reproduces transformers' Idefics3Processor with its PIL image processor, reading the
files a SmolVLM repo ships: resize so the long side is `size`, resize again to multiples of the
tile size, cut tiles row-major plus a global image last, rescale and normalise, pad across the
batch; and in the text, each <image> becomes its tiles' <fake_token_around_image><row_r_col_c>
<image>*image_seq_len blocks.
"""
import collections
import json
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

MAX_IMAGE_SIDE = 4096  # transformers' absolute cap after the first resize
SPECIAL = {"image": "<image>", "fake": "<fake_token_around_image>", "global": "<global-img>",
           "eou": "<end_of_utterance>"}


def _read_json(path):
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def _token_text(t):  # special tokens are stored as "..." or {"content": "..."}
    return t["content"] if isinstance(t, dict) else t


def load_image(image, source=None):
    """A path or a PIL image -> a PIL image, with an error that names the file."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as im:
            im.load()
            return im
    except (OSError, ValueError) as e:
        raise ValueError(f"{source or image}: cannot read image {image!r} ({e})") from None


# -----------------------------------------------------------------------------
# image processor (the PIL path of transformers' Idefics3ImageProcessor)


def _fit_longest_edge(h, w, longest):
    """Long side -> longest (upscaling too), short side keeps the aspect, rounded up to even."""
    aspect = w / h
    if w >= h:
        w, h = longest, int(longest / aspect)
        h += h % 2
    else:
        h, w = longest, int(longest * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > MAX_IMAGE_SIDE:
        w, h = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE / aspect)
    elif h > w and h > MAX_IMAGE_SIDE:
        h, w = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE * aspect)
    return max(h, 1), max(w, 1)


def _fit_tile_multiple(h, w, m):
    """Both sides up to multiples of the tile size m, the long side first, keeping the aspect."""
    aspect = w / h
    if w >= h:
        w = math.ceil(w / m) * m
        h = math.ceil(int(w / aspect) / m) * m
    else:
        h = math.ceil(h / m) * m
        w = math.ceil(int(h * aspect) / m) * m
    return h, w


def to_rgb(im):  # transparency is composited onto white, as transformers does
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


class ImageProcessor:
    def __init__(self, cfg: dict):
        self.split = cfg.get("do_image_splitting", True)
        self.longest = cfg.get("size", {}).get("longest_edge", 4 * 364)
        self.tile = cfg.get("max_image_size", {}).get("longest_edge", 364)
        self.resample = Image.Resampling(cfg.get("resample", Image.Resampling.LANCZOS))
        self.do_resize = cfg.get("do_resize", True)
        self.scale = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
        self.mean = np.array(cfg.get("image_mean", [0.5] * 3), dtype=np.float32)
        self.std = np.array(cfg.get("image_std", [0.5] * 3), dtype=np.float32)
        self.normalize = cfg.get("do_normalize", True)
        self.cfg = cfg

    def _resize(self, im, h, w):
        return im.resize((w, h), resample=self.resample)

    def tiles(self, im):
        """One PIL image -> (list of RGB tiles, rows, cols); the global image is the last tile."""
        im = to_rgb(im)
        if self.do_resize:
            im = self._resize(im, *_fit_longest_edge(im.height, im.width, self.longest))
        m = self.tile
        if not self.split:
            return [self._resize(im, m, m)], 0, 0
        im = self._resize(im, *_fit_tile_multiple(im.height, im.width, m))
        if im.height <= m and im.width <= m:
            return [im], 0, 0
        rows, cols = (im.height - m) // m + 1, (im.width - m) // m + 1
        crops = [im.crop((c * m, r * m, c * m + m, r * m + m)) for r in range(rows) for c in range(cols)]
        return crops + [self._resize(im, m, m)], rows, cols

    def to_array(self, im):  # RGB PIL -> (3, H, W) float32, same arithmetic as transformers
        x = (np.asarray(im).astype(np.float64) * self.scale).astype(np.float32)
        if self.normalize:
            x = (x - self.mean) / self.std
        return x.transpose(2, 0, 1)

    def __call__(self, images):
        """images: list (per sample) of lists of PIL images -> pixel_values (B, N, 3, H, W),
        pixel_attention_mask (B, N, H, W), and rows/cols per image for the prompt."""
        arrays, rows, cols = [], [], []
        for sample in images:
            arrays.append([]), rows.append([]), cols.append([])
            for im in sample:
                tiles, r, c = self.tiles(im)
                arrays[-1] += [self.to_array(t) for t in tiles]
                rows[-1].append(r), cols[-1].append(c)
        n = max(len(a) for a in arrays)
        H = max(x.shape[1] for a in arrays for x in a)
        W = max(x.shape[2] for a in arrays for x in a)
        pixels = np.zeros((len(arrays), n, 3, H, W), dtype=np.float32)  # zero images are padding
        mask = np.zeros((len(arrays), n, H, W), dtype=np.int64)
        for i, a in enumerate(arrays):
            for j, x in enumerate(a):
                pixels[i, j, :, :x.shape[1], :x.shape[2]] = x
                mask[i, j, :x.shape[1], :x.shape[2]] = 1
        return torch.from_numpy(pixels), torch.from_numpy(mask), rows, cols


# -----------------------------------------------------------------------------
# the processor: tokenizer + chat template + image processor


class Processor:
    def __init__(self, tokenizer, image_processor, image_seq_len, chat_template=None, tokenizer_config=None):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_seq_len, self.chat_template = image_seq_len, chat_template
        self.tokenizer_config = tc = tokenizer_config or {}
        self.padding_side = tc.get("padding_side", "right")
        self.pad_token = _token_text(tc["pad_token"]) if tc.get("pad_token") else None
        self.eos_token = _token_text(tc["eos_token"]) if tc.get("eos_token") else None
        for name, token in SPECIAL.items():
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"tokenizer has no {token} token, which the SmolVLM prompt format needs")
        self.image_token_id = tokenizer.token_to_id(SPECIAL["image"])

    @property
    def eos_token_id(self):
        return self.tokenizer.token_to_id(self.eos_token or SPECIAL["eou"])

    @property
    def pad_token_id(self):
        return self.tokenizer.token_to_id(self.pad_token) if self.pad_token else None

    @classmethod
    def from_pretrained(cls, path):
        """Reads tokenizer.json (+ tokenizer_config.json, special_tokens_map.json), the image processor
        from preprocessor_config.json or nested in processor_config.json (transformers 5), image_seq_len
        from processor_config.json, and chat_template.json or chat_template.jinja."""
        from tokenizers import Tokenizer
        f = lambda name: os.path.join(path, name)
        if not os.path.exists(f("tokenizer.json")):
            raise FileNotFoundError(f"{f('tokenizer.json')}: not found (the processor needs the tokenizer file)")
        tokenizer = Tokenizer.from_file(f("tokenizer.json"))
        tc = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if os.path.exists(f(name)):
                tc.update({k: v for k, v in _read_json(f(name)).items() if v is not None})
        pc = _read_json(f("processor_config.json")) if os.path.exists(f("processor_config.json")) else {}
        if "image_processor" in pc:
            image_cfg = pc["image_processor"]
        elif os.path.exists(f("preprocessor_config.json")):
            image_cfg = _read_json(f("preprocessor_config.json"))
        else:
            raise FileNotFoundError(f"{path}: no preprocessor_config.json, nor an image_processor entry "
                                    "in processor_config.json")
        template = pc.get("chat_template") or tc.get("chat_template")
        if os.path.exists(f("chat_template.jinja")):
            template = open(f("chat_template.jinja")).read()
        elif os.path.exists(f("chat_template.json")):
            template = _read_json(f("chat_template.json"))["chat_template"]
        return cls(tokenizer, ImageProcessor(image_cfg), pc.get("image_seq_len", 64), template, tc)

    def save_pretrained(self, path):
        """The transformers-5 layout: tokenizer files, processor_config.json, chat_template.jinja."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        tc = {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "processor_class": "Idefics3Processor",
              "padding_side": self.padding_side,
              "pad_token": self.pad_token, "eos_token": self.eos_token, "model_max_length": 131072,
              "extra_special_tokens": [SPECIAL["fake"], SPECIAL["image"], SPECIAL["eou"]]}
        with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
            json.dump(tc, fh, indent=2)
        image_cfg = {**self.image_processor.cfg, "image_processor_type": "Idefics3ImageProcessor"}
        with open(os.path.join(path, "processor_config.json"), "w") as fh:
            json.dump({"processor_class": "Idefics3Processor", "image_seq_len": self.image_seq_len,
                       "image_processor": image_cfg}, fh, indent=2)
        if self.chat_template:
            with open(os.path.join(path, "chat_template.jinja"), "w") as fh:
                fh.write(self.chat_template)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """Render the checkpoint's own jinja template, in the environment transformers uses."""
        if not self.chat_template:
            raise ValueError("this processor has no chat template (chat_template.json / .jinja)")
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            eos_token=self.eos_token, pad_token=self.pad_token, **{"bos_token": self.tokenizer_config.get("bos_token")})

    def image_prompt(self, rows, cols):
        """The text one <image> placeholder expands to."""
        img = SPECIAL["image"] * self.image_seq_len
        glob = f"{SPECIAL['fake']}{SPECIAL['global']}{img}{SPECIAL['fake']}"
        if rows == 0 and cols == 0:
            return glob
        grid = "".join("".join(f"{SPECIAL['fake']}<row_{r + 1}_col_{c + 1}>{img}" for c in range(cols)) + "\n"
                       for r in range(rows))
        return grid + "\n" + glob

    def expand_images(self, text, rows, cols):
        """Each <image> placeholder in text -> the tile blocks of that image (rows, cols per image)."""
        parts = text.split(SPECIAL["image"])
        return parts[0] + "".join(self.image_prompt(r, c) + p for r, c, p in zip(rows, cols, parts[1:]))

    def __call__(self, text, images=None, padding_side=None):
        """text: str or list of str with <image> placeholders; images: list (per sample) of lists of
        PIL images or paths. Returns input_ids, attention_mask and, with images, pixel_values
        (B, N_img, 3, H, W) and pixel_attention_mask (B, N_img, H, W)."""
        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        if images is not None:
            if isinstance(images, Image.Image) or isinstance(images, (str, os.PathLike)):
                images = [[images]]
            if len(images) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(images)} image lists: give one list per text")
            images = [[load_image(im) for im in sample] for sample in images]
            for i, (t, sample) in enumerate(zip(texts, images)):
                if t.count(SPECIAL["image"]) != len(sample):
                    raise ValueError(f"text {i} has {t.count(SPECIAL['image'])} <image> placeholders "
                                     f"but {len(sample)} images were given for it")
            if any(images):
                pixels, pmask, rows, cols = self.image_processor([s for s in images])
                out.update(pixel_values=pixels, pixel_attention_mask=pmask)
                texts = [self.expand_images(t, r, c) for t, r, c in zip(texts, rows, cols)]
        elif any(SPECIAL["image"] in t for t in texts):
            raise ValueError("the text has <image> placeholders but no images were given")
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        out.update(self.pad(ids, padding_side or self.padding_side))
        return out

    def pad(self, ids, side="right"):
        """Lists of ids -> input_ids (B, T) and attention_mask, padded on `side` with the pad token."""
        T = max(len(x) for x in ids)
        if any(len(x) != T for x in ids) and self.pad_token_id is None:
            raise ValueError("texts of different lengths need a pad_token in tokenizer_config.json")
        input_ids = torch.full((len(ids), T), self.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for i, x in enumerate(ids):
            sl = slice(T - len(x), T) if side == "left" else slice(0, len(x))
            input_ids[i, sl], mask[i, sl] = torch.tensor(x, dtype=torch.long), 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens=True):
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


# -----------------------------------------------------------------------------
# a tokenizer for from-scratch models, with the SmolVLM special tokens

SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def train_tokenizer(texts, vocab_size=1000):
    """Byte-level BPE trained on texts, with SmolVLM's special tokens (<|endoftext|> 0, <|im_start|> 1,
    <|im_end|> 2, then the image and turn tokens after the learned vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok.add_special_tokens([SPECIAL["global"], *grid, SPECIAL["fake"], SPECIAL["image"], SPECIAL["eou"]])
    return tok


def new_processor(texts, tile, image_seq_len, vocab_size=1000, split=False):
    """A processor for a model trained from scratch: a tokenizer trained on texts, images resized to
    one tile x tile image (split=False) or tiled, the SmolVLM chat template."""
    image_cfg = {"do_image_splitting": split, "size": {"longest_edge": tile * (3 if split else 1)},
                 "max_image_size": {"longest_edge": tile}, "resample": 1, "rescale_factor": 1 / 255,
                 "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return Processor(train_tokenizer(texts, vocab_size), ImageProcessor(image_cfg), image_seq_len,
                     SMOLVLM_CHAT_TEMPLATE, {"pad_token": "<|im_end|>", "eos_token": SPECIAL["eou"]})


# -----------------------------------------------------------------------------
# chain-of-thought records -> training batches with per-token spans

P, V, R, A = 1, 2, 3, 4  # span ids: prompt text, visual (<image>) tokens, rationale, answer; 0 = padding


class RecordError(ValueError):
    """A record that cannot be used; .reason is the short cause, counted when records are skipped."""
    def __init__(self, where, reason, detail=""):
        super().__init__(f"{where}: {reason}{detail}")
        self.reason = reason


def split_reply(reply, marker="Answer:"):
    """A reply -> (rationale, answer) character split index. `<think>..</think><answer>..</answer>`
    replies split at <answer>; others at the last `marker`. -1 if the reply has no answer part."""
    if "<answer>" in reply:
        return reply.index("<answer>")
    return reply.rfind(marker)


def read_records(path):
    """JSONL ({image, question, rationale, answer, choices?}) or LLaVA-style JSON ({image,
    conversations: [{from: human, value: "<image>..."}, {from: gpt, value}]}) -> list of dicts with
    images (absolute paths), question, reply, and source ("file:line") for error messages."""
    base = os.path.dirname(os.path.abspath(path))
    paths = lambda im: [os.path.join(base, p) for p in ([im] if isinstance(im, str) else im or [])]
    out = []
    if path.endswith(".jsonl"):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                question = r["question"] + ("".join(f"\n{c}" for c in r["choices"]) if r.get("choices") else "")
                reply = f"{r.get('rationale', '').strip()} Answer: {r.get('answer', '')}".strip()
                out.append({**r, "images": paths(r.get("image")), "question": question, "reply": reply,
                            "has_answer": bool(str(r.get("answer", "")).strip()), "source": f"{path}:{n}"})
    else:
        for n, r in enumerate(_read_json(path), 1):
            turns = r["conversations"]
            human = next(t["value"] for t in turns if t["from"] == "human")
            gpt = next(t["value"] for t in turns if t["from"] == "gpt")
            out.append({"images": paths(r.get("image")), "question": human, "reply": gpt,
                        "has_answer": split_reply(gpt) >= 0, "source": f"{path}:record {n}"})
    return out


def record_prompt(proc, rec):
    """The chat prompt of a record, up to "Assistant:", with its <image> placeholders (JSONL records
    carry none in the question: the images go before it)."""
    question = rec["question"]
    if rec["images"] and SPECIAL["image"] not in question:
        question = SPECIAL["image"] * len(rec["images"]) + question
    return proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": question}]}])


def encode_record(proc, rec, max_len=2048, marker="Answer:"):
    """One record -> dict of ids, labels, spans (1-D tensors) and its images; raises ValueError naming
    the record for a missing or unreadable image, an empty answer, or an image without a place.
    Length policy: a record longer than max_len is rejected (the answer is never cut)."""
    where = rec["source"]
    if not rec["has_answer"]:
        raise RecordError(where, "empty answer")
    try:
        images = [load_image(p, where) for p in rec["images"]]
    except ValueError as e:
        raise RecordError(where, "cannot read image", f" ({e})") from None
    prompt = record_prompt(proc, rec)
    if prompt.count(SPECIAL["image"]) != len(images):
        raise RecordError(where, "no <image> place for each image",
                          f" ({prompt.count(SPECIAL['image'])} places, {len(images)} images)")
    reply = " " + rec["reply"] + SPECIAL["eou"] + "\n"
    pixels = None
    if images:
        pixels, pmask, rows, cols = proc.image_processor([images])
        prompt = proc.expand_images(prompt, rows[0], cols[0])
    cut = len(prompt) + split_reply(reply, marker)
    while (prompt + reply)[cut - 1].isspace():  # " Answer" is one token: its space belongs to the answer
        cut -= 1
    enc = proc.tokenizer.encode(prompt + reply)
    ids = torch.tensor(enc.ids)
    starts = torch.tensor([s for s, _ in enc.offsets])
    span = torch.where(starts < len(prompt), P, torch.where(starts < cut, R, A))
    span[ids == proc.image_token_id] = V
    if len(ids) > max_len:
        raise RecordError(where, "too long", f" ({len(ids)} tokens > max_len {max_len})")
    labels = torch.where(span >= R, ids, -100)  # the loss is on the reply only
    out = {"input_ids": ids, "labels": labels, "spans": span}
    if pixels is not None:
        out.update(pixel_values=pixels[0], pixel_attention_mask=pmask[0])
    return out


def collate(examples, pad_id):
    """Right-pads ids/labels/spans; pads pixel batches to the most images and the largest tiles."""
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    batch = {"input_ids": torch.full((B, T), pad_id), "attention_mask": torch.zeros(B, T, dtype=torch.long),
             "labels": torch.full((B, T), -100), "spans": torch.zeros(B, T, dtype=torch.long)}
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n], batch["labels"][i, :n], batch["spans"][i, :n] = e["input_ids"], e["labels"], e["spans"]
        batch["attention_mask"][i, :n] = 1
    with_images = [e for e in examples if "pixel_values" in e]
    if with_images:
        N = max(e["pixel_values"].shape[0] for e in with_images)
        H = max(e["pixel_values"].shape[2] for e in with_images)
        W = max(e["pixel_values"].shape[3] for e in with_images)
        batch["pixel_values"] = torch.zeros(B, N, 3, H, W)
        batch["pixel_attention_mask"] = torch.zeros(B, N, H, W, dtype=torch.long)
        for i, e in enumerate(examples):
            if "pixel_values" in e:
                n, _, h, w = e["pixel_values"].shape
                batch["pixel_values"][i, :n, :, :h, :w] = e["pixel_values"]
                batch["pixel_attention_mask"][i, :n, :h, :w] = e["pixel_attention_mask"]
    return batch


def encode_all(proc, records, max_len=2048, strict=False):
    """Encodes every record; bad ones are skipped and counted by reason (strict: the first raises)."""
    kept, skipped = [], {}
    for rec in records:
        try:
            kept.append(encode_record(proc, rec, max_len))
        except RecordError as e:
            if strict:
                raise
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
    return kept, skipped


# -----------------------------------------------------------------------------
# a synthetic visual reasoning set: shapes in a 3x3 grid, questions that need looking

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
KINDS, GRID = ("circle", "square", "triangle"), 3


def _render(grid, size):
    """grid: GRID x GRID of None or (colour, kind, large) -> RGB image; cell boxes are size / GRID."""
    im = Image.new("RGB", (size, size), (235, 235, 235))
    draw, cell = ImageDraw.Draw(im), size / GRID
    for r in range(GRID):
        for c in range(GRID):
            if grid[r][c] is None:
                continue
            colour, kind, large = grid[r][c]
            half = cell * (0.4 if large else 0.22)
            cx, cy = (c + 0.5) * cell, (r + 0.5) * cell
            box = [cx - half, cy - half, cx + half, cy + half]
            if kind == "circle":
                draw.ellipse(box, fill=COLOURS[colour])
            elif kind == "square":
                draw.rectangle(box, fill=COLOURS[colour])
            else:
                draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=COLOURS[colour])
    return im


def _describe(item):
    return "nothing" if item is None else f"a {'large' if item[2] else 'small'} {item[0]} {item[1]}"


def _solve(grid, q):
    """(answer, rationale, cells the answer depends on) for question q on grid. The rationale walks
    the cells row by row (a cell question stops at its cell) and keeps a running tally of the shapes
    the question asks about, so each step is one look and the summary copies the latest one."""
    tally = collections.Counter()

    def tag(r, c):  # what this cell adds to the tally, if anything
        item = grid[r][c]
        if item and item[1] in q.get("kinds", ()):  # count and compare: the shape word just said decides
            key = item[1]
        elif q["type"] == "cell" and (r, c) == tuple(q["cell"]):
            return " (this one)"
        else:
            return ""
        tally[key] += 1
        return f" ({key} {tally[key]})"
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    walked = cells[:cells.index(tuple(q["cell"])) + 1] if q["type"] == "cell" else cells  # up to the asked cell
    walk = " ".join(f"Row {r + 1}: " + ", ".join(_describe(grid[r][c]) + tag(r, c) for rr, c in walked if rr == r) + "."
                    for r in sorted({r for r, _ in walked}))
    if q["type"] == "count":
        hits = [(r, c) for r, c in cells if grid[r][c] and grid[r][c][1] == q["kinds"][0]]
        return str(len(hits)), f"{walk} So {len(hits)} {q['kinds'][0]}s.", hits
    if q["type"] == "compare":
        k1, k2 = q["kinds"]
        a, b = ([(r, c) for r, c in cells if grid[r][c] and grid[r][c][1] == k] for k in (k1, k2))
        ans = "yes" if len(a) > len(b) else "no"
        return ans, f"{walk} So {len(a)} {k1}s and {len(b)} {k2}s.", a + b
    r, c = q["cell"]
    return grid[r][c][0], f"{walk} So the colour is {grid[r][c][0]}.", [(r, c)]


def _question_text(q):
    if q["type"] == "count":
        return f"How many {q['kinds'][0]}s are there?"
    if q["type"] == "compare":
        return f"Are there more {q['kinds'][0]}s than {q['kinds'][1]}s?"
    return f"What colour is the shape in row {q['cell'][0] + 1}, column {q['cell'][1] + 1}?"


def _random_item(rng, colours=tuple(COLOURS), kinds=KINDS):
    return (colours[rng.integers(len(colours))], kinds[rng.integers(len(kinds))], bool(rng.integers(2)))


def _sample(rng, qtype, skewed):
    """A grid and question whose answer follows a skewed (training text prior) or uniform distribution."""
    grid = [[None if rng.random() < 0.35 else _random_item(rng) for _ in range(GRID)] for _ in range(GRID)]
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    order = [cells[i] for i in rng.permutation(len(cells))]
    if qtype == "count":
        kind = KINDS[rng.integers(3)]
        n = int(rng.choice(5, p=[0.1, 0.6, 0.1, 0.1, 0.1] if skewed else None))
        others = tuple(k for k in KINDS if k != kind)
        for i, (r, c) in enumerate(order):  # exactly n shapes of that kind
            if i < n:
                grid[r][c] = _random_item(rng, kinds=(kind,))
            elif grid[r][c] and grid[r][c][1] == kind:
                grid[r][c] = _random_item(rng, kinds=others)
        q = {"type": "count", "kinds": (kind,)}
    elif qtype == "compare":
        k1, k2 = (KINDS[i] for i in rng.permutation(3)[:2])
        yes = rng.random() < (0.8 if skewed else 0.5)
        n1, n2 = sorted(rng.choice(4, 2, replace=False))[::-1] if yes else sorted(rng.choice(4, 2))
        for i, (r, c) in enumerate(order):
            kind = k1 if i < n1 else k2 if i < n1 + n2 else KINDS[3 - KINDS.index(k1) - KINDS.index(k2)]
            grid[r][c] = _random_item(rng, kinds=(kind,)) if i < n1 + n2 or grid[r][c] else None
        q = {"type": "compare", "kinds": (k1, k2)}
    else:
        r, c = order[0]
        colour = "red" if skewed and rng.random() < 0.6 else list(COLOURS)[rng.integers(4)]
        grid[r][c] = _random_item(rng, (colour,))
        q = {"type": "cell", "cell": (r, c)}
    return grid, q


def _twin(rng, grid, q):
    """The counterfactual: the same question on a minimally edited grid whose answer differs."""
    answer = _solve(grid, q)[0]
    for _ in range(100):
        g = [row[:] for row in grid]
        r, c = int(rng.integers(GRID)), int(rng.integers(GRID))
        if q["type"] == "cell":
            r, c = q["cell"]
        g[r][c] = _random_item(rng) if q["type"] != "count" or rng.random() < 0.7 else None
        if _solve(g, q)[0] != answer:
            return g
    return None


def make_synthetic(out_dir, n_train=2000, n_eval=300, seed=0, image_size=96):
    """Writes train.jsonl (answers skewed per question type: a text prior to exploit) and eval.jsonl
    (balanced, each item with a counterfactual twin: same question, edited image, other answer),
    with PNGs under images/. Each record keeps the boxes of the cells its answer depends on."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    cell = image_size / GRID
    box = lambda rc: [round(rc[1] * cell), round(rc[0] * cell), round((rc[1] + 1) * cell), round((rc[0] + 1) * cell)]

    def record(name, grid, q, **extra):
        _render(grid, image_size).save(os.path.join(out_dir, "images", f"{name}.png"))
        answer, rationale, cells = _solve(grid, q)
        return {"id": name, "image": f"images/{name}.png", "question": _question_text(q), "rationale": rationale,
                "answer": answer, "type": q["type"], "boxes": [box(rc) for rc in cells], **extra}

    for split, n in (("train", n_train), ("eval", n_eval)):
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w") as f:
            i = 0
            while i < n:
                qtype = ("count", "compare", "cell")[i % 3]
                grid, q = _sample(rng, qtype, skewed=split == "train")
                if split == "eval":
                    twin = _twin(rng, grid, q)
                    if twin is None:
                        continue
                    f.write(json.dumps(record(f"{split}{i:05d}b", twin, q, twin_of=f"{split}{i:05d}")) + "\n")
                f.write(json.dumps(record(f"{split}{i:05d}", grid, q)) + "\n")
                i += 1
    return os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "eval.jsonl")
