"""
Records and images -> model batches.

The Processor reproduces transformers' Idefics3Processor with its PIL image processor, reading the
files a SmolVLM repo ships: resize so the long side is `size`, resize again to multiples of the
tile size, cut tiles row-major plus a global image last, rescale and normalise, pad across the
batch; and in the text, each <image> becomes its tiles' <fake_token_around_image><row_r_col_c>
<image>*image_seq_len blocks.
"""
import collections
import contextlib
import functools
import json
import math
import os

import numpy as np
import torch
from PIL import Image

from files import read_json

MAX_IMAGE_SIDE = 4096  # transformers' absolute cap after the first resize
SPECIAL = {"image": "<image>", "fake": "<fake_token_around_image>", "global": "<global-img>",
           "eou": "<end_of_utterance>"}


class DataError(ValueError):
    """Bad input (a data file, a record, a processor folder): the message names it, and the command
    line prints it alone, without a traceback."""


def _token_text(t):  # special tokens are stored as "..." or {"content": "..."}
    return t["content"] if isinstance(t, dict) else t


def load_image(image, source=None):
    """A path or a PIL image -> a PIL image, with an error that names the file. Inside
    remembering_images, a path is decoded once."""
    if isinstance(image, Image.Image):
        return image
    if _memo is not None and image in _memo["decoded"]:
        return _memo["decoded"][image]
    try:
        with Image.open(image) as im:
            im.load()
    except (OSError, ValueError) as e:
        raise DataError(f"{source or image}: cannot read image {image!r} ({e})") from None
    size = im.width * im.height * len(im.getbands())
    if _memo is not None and _memo["bytes"] + size <= _memo["budget"]:
        _memo["decoded"][image], _memo["bytes"] = im, _memo["bytes"] + size
        _memo["decoded_ids"].add(id(im))
    return im


_memo = None  # while remembering_images: path -> decoded image; (processor, decoded image) -> arrays


@contextlib.contextmanager
def remembering_images(budget=2**30):
    """Within it (or a function it decorates), each image path is decoded once and each decoded image
    tiled and normalised once, until `budget` bytes are kept (images past it are processed every
    time, as outside): eval's phases read each record's image five to seven times. The images
    handed out are shared: copy one before drawing on it."""
    global _memo
    outer, _memo = _memo, {"decoded": {}, "decoded_ids": set(), "arrays": {}, "bytes": 0, "budget": budget}
    try:
        yield
    finally:
        _memo = outer


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

    def windows(self, width, height):
        """The box (x0, y0, x1, y1) of a width x height image that each tile of tiles() shows on its
        m x m canvas, in the same order (a small image's box reaches past its edge: that is padding)."""
        h, w = _fit_longest_edge(height, width, self.longest) if self.do_resize else (height, width)
        if not self.split:
            return [(0, 0, width, height)]
        m = self.tile
        h, w = _fit_tile_multiple(h, w, m)
        sx, sy = width / w, height / h  # resized pixels -> original pixels
        if h <= m and w <= m:
            return [(0, 0, m * sx, m * sy)]
        rows, cols = (h - m) // m + 1, (w - m) // m + 1
        crops = [(c * m * sx, r * m * sy, (c + 1) * m * sx, (r + 1) * m * sy) for r in range(rows)
                 for c in range(cols)]
        return crops + [(0, 0, width, height)]

    def to_array(self, im):  # RGB PIL -> (3, H, W) float32, same arithmetic as transformers
        x = (np.asarray(im).astype(np.float64) * self.scale).astype(np.float32)
        if self.normalize:
            x = (x - self.mean) / self.std
        return x.transpose(2, 0, 1)

    def arrays(self, im):
        """One PIL image -> (its tiles as (3, m, m) float32 arrays, rows, cols); an image that
        load_image decoded within remembering_images is processed once."""
        remember = _memo is not None and id(im) in _memo["decoded_ids"]  # they stay alive: ids are theirs
        key = (id(self), id(im))  # another processor tiles the same image otherwise
        if remember and key in _memo["arrays"]:
            return _memo["arrays"][key]
        tiles, r, c = self.tiles(im)
        out = [self.to_array(t) for t in tiles], r, c
        if remember and _memo["bytes"] + sum(a.nbytes for a in out[0]) <= _memo["budget"]:
            _memo["arrays"][key] = out
            _memo["bytes"] += sum(a.nbytes for a in out[0])
        return out

    def __call__(self, images):
        """images: list (per sample) of lists of PIL images -> pixel_values (B, N, 3, H, W),
        pixel_attention_mask (B, N, H, W), and rows/cols per image for the prompt."""
        per_image = [[self.arrays(im) for im in sample] for sample in images]  # (tiles, rows, cols)
        arrays = [[tile for tiles, _, _ in sample for tile in tiles] for sample in per_image]
        rows = [[r for _, r, _ in sample] for sample in per_image]
        cols = [[c for _, _, c in sample] for sample in per_image]
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
            raise FileNotFoundError(f"{f('tokenizer.json')}: not found (the processor needs the tokenizer "
                                    "file)")
        try:
            tokenizer = Tokenizer.from_file(f("tokenizer.json"))
        except Exception as e:  # tokenizers raises its own exception type for a corrupt file
            raise DataError(f"{f('tokenizer.json')}: cannot read the tokenizer ({e})") from None
        tc = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if os.path.exists(f(name)):
                tc.update({k: v for k, v in read_json(f(name), DataError).items() if v is not None})
        pc = read_json(f("processor_config.json"), DataError) if os.path.exists(f("processor_config.json")) \
            else {}
        if "image_processor" in pc:
            image_cfg = pc["image_processor"]
        elif os.path.exists(f("preprocessor_config.json")):
            image_cfg = read_json(f("preprocessor_config.json"), DataError)
        else:
            raise FileNotFoundError(f"{path}: no preprocessor_config.json, nor an image_processor entry "
                                    "in processor_config.json")
        template = pc.get("chat_template") or tc.get("chat_template")
        if os.path.exists(f("chat_template.jinja")):
            template = open(f("chat_template.jinja")).read()
        elif os.path.exists(f("chat_template.json")):
            template = read_json(f("chat_template.json"), DataError)["chat_template"]
        try:
            return cls(tokenizer, ImageProcessor(image_cfg), pc.get("image_seq_len", 64), template, tc)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: unsupported processor files ({type(e).__name__}: {e})") from None

    def save_pretrained(self, path):
        """The transformers-5 layout: tokenizer files, processor_config.json, chat_template.jinja."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        tc = {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend",
              "processor_class": "Idefics3Processor",
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
        if getattr(self, "_template", (None,))[0] != self.chat_template:  # compiling costs 10 ms: once
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(f"chat template: {message}")
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
            env.globals["raise_exception"] = raise_exception
            self._template = (self.chat_template, env.from_string(self.chat_template))
        return self._template[1].render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            eos_token=self.eos_token, pad_token=self.pad_token,
            **{"bos_token": self.tokenizer_config.get("bos_token")})

    def image_prompt(self, rows, cols):
        """The text one <image> placeholder expands to."""
        img = SPECIAL["image"] * self.image_seq_len
        glob = f"{SPECIAL['fake']}{SPECIAL['global']}{img}{SPECIAL['fake']}"
        if rows == 0 and cols == 0:
            return glob
        grid = "".join("".join(f"{SPECIAL['fake']}<row_{r + 1}_col_{c + 1}>{img}" for c in range(cols))
                       + "\n"
                       for r in range(rows))
        return grid + "\n" + glob

    def image_token_boxes(self, width, height):
        """The box in a width x height image that each of its image tokens covers, in prompt order:
        tiles row-major, then the global image; within a tile, the pixel-shuffle cells row-major
        (each cell s x s patches, so an image_seq_len = n^2 tile is an n x n grid of cells)."""
        n = math.isqrt(self.image_seq_len)
        return [(x0 + (x1 - x0) * j / n, y0 + (y1 - y0) * i / n, x0 + (x1 - x0) * (j + 1) / n,
                 y0 + (y1 - y0) * (i + 1) / n)
                for x0, y0, x1, y1 in self.image_processor.windows(width, height) for i in range(n)
                for j in range(n)]

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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
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

# span ids: S the chat scaffolding before the user's content ("<|im_start|>User: "), P the rest of the
# prompt text, V visual (<image>) tokens, R rationale, A answer; 0 = padding. The reply is span >= R.
S, P, V, R, A = 1, 2, 3, 4, 5


class RecordError(DataError):
    """A record that cannot be used; .reason is the short cause, counted when records are skipped."""
    def __init__(self, where, reason, detail=""):
        super().__init__(f"{where}: {reason}{detail}")
        self.reason = reason


class Skips(collections.Counter):
    """Records that could not be used, counted by reason, with the first few messages ("file:line:
    reason") for the log. strict: the first one raises instead."""
    def __init__(self, strict=False):
        super().__init__()
        self.strict, self.examples = strict, []

    def add(self, err):
        if self.strict:
            raise err
        self[err.reason] += 1
        if len(self.examples) < 3:
            self.examples.append(str(err))

    def __str__(self):
        if not self:
            return "none skipped"
        return (f"{self.total()} skipped (" + ", ".join(f"{r}: {n}" for r, n in self.most_common())
                + "); first: " + "; ".join(self.examples))


def split_reply(reply, marker="Answer:"):
    """A reply -> (rationale, answer) character split index. `<think>..</think><answer>..</answer>`
    replies split at <answer>; others at the last `marker`, else at the last "the answer is". -1 if
    the reply has no answer part."""
    if "<answer>" in reply:
        return reply.index("<answer>")
    if marker in reply:
        return reply.rfind(marker)
    return reply.lower().rfind("the answer is")


# the two ways a question is asked: for the answer alone, or for a chain of thought in words (models
# trained from the base learnt both; the from-scratch models were only ever asked the bare question)
DIRECT, COT = "\nGive the answer alone, without reasoning.", "\nThink step by step."


def asked(question, mode):  # the question as the prompt puts it; mode: "direct", "cot" or "bare"
    return question + {"direct": DIRECT, "cot": COT, "bare": ""}[mode]


def chat_prompt(proc, question, n_images=0, history=()):
    """The one prompt builder (training, eval, GRPO, generate.py): the chat template on the question,
    after history (earlier messages [{role, text}]: a system message, earlier turns), up to
    "Assistant:", with an <image> placeholder per image before the question unless the messages
    place their own ("User: <image>How many?")."""
    if n_images and not any(SPECIAL["image"] in m["text"] for m in [*history, {"text": question}]):
        question = SPECIAL["image"] * n_images + question
    messages = [*history, {"role": "user", "text": question}]
    return proc.apply_chat_template([{"role": m["role"], "content": [{"type": "text", "text": m["text"]}]}
                                     for m in messages])


def record_prompt(proc, rec):
    """The chat prompt of a record (chat_prompt of its question, images and history)."""
    return chat_prompt(proc, rec["question"], len(rec["images"]), rec.get("history", ()))


@functools.lru_cache(maxsize=64)
def chat_head(proc, system=None):
    """The chat template's text before the user's content ("<|im_start|>User: "), with a system
    message everything before the first user's content: the S span (AVAR's "system" tokens)."""
    history = [{"role": "system", "text": system}] if system else []
    return chat_prompt(proc, "\0", 0, history).split("\0")[0]


def encode_record(proc, rec, max_len=2048, marker="Answer:"):
    """One record -> dict of ids, labels, spans (1-D tensors) and its images; raises RecordError naming
    the record for a missing or unreadable image, an image without a place, or too many tokens.
    Length policy: a record longer than max_len is rejected (the answer is never cut)."""
    text, prompt_len, cut, pixels = record_text(proc, rec, marker)
    return tokens_to_example(proc, rec, proc.tokenizer.encode(text), prompt_len, cut, pixels, max_len)


def record_text(proc, rec, marker="Answer:"):
    """The first half of encode_record: the record's images processed, its full text (prompt with the
    images expanded, then the reply) -> text, the prompt's length, where the answer starts (characters)
    and the pixels ((pixel_values, pixel_attention_mask) or None)."""
    where = rec["source"]
    try:
        images = [load_image(p, where) for p in rec["images"]]
    except DataError as e:
        raise RecordError(where, "cannot read image", f" ({e})") from None
    prompt = record_prompt(proc, rec)
    if prompt.count(SPECIAL["image"]) != len(images):
        raise RecordError(where, "no <image> place for each image",
                          f" ({prompt.count(SPECIAL['image'])} places, {len(images)} images)")
    reply = " " + rec["reply"] + SPECIAL["eou"] + "\n"
    if images:
        pixels, pmask, rows, cols = proc.image_processor([images])
        prompt = proc.expand_images(prompt, rows[0], cols[0])
    cut = len(prompt) + split_reply(reply, marker)
    while (prompt + reply)[cut - 1].isspace():  # " Answer" is one token: its space belongs to the answer
        cut -= 1
    return prompt + reply, len(prompt), cut, (pixels[0], pmask[0]) if images else None


def tokens_to_example(proc, rec, enc, prompt_len, cut, pixels, max_len=2048):
    """The second half: the tokenizer's encoding of record_text's text -> the example (ids, labels,
    spans, pixels), each token's span read off its character offsets."""
    ids = torch.tensor(enc.ids)
    starts, ends = torch.from_numpy(np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)).T
    # S by end offset: a token straddling the head's last space (" What" after "User:") is the user's
    span = torch.where(ends <= len(chat_head(proc, rec.get("system"))), S,
                       torch.where(starts < prompt_len, P, torch.where(starts < cut, R, A)))
    span[ids == proc.image_token_id] = V
    if len(ids) > max_len:
        raise RecordError(rec["source"], "too long", f" ({len(ids)} tokens > max_len {max_len})")
    labels = torch.where(span >= R, ids, -100)  # the loss is on the reply only
    out = {"input_ids": ids, "labels": labels, "spans": span}
    if pixels is not None:
        out.update(pixel_values=pixels[0], pixel_attention_mask=pixels[1])
    return out


def to_device(batch, device):
    """A batch, and its cut copies ("commit", a batch or None) with it, on the device."""
    return {k: to_device(v, device) if isinstance(v, dict) else v if v is None else v.to(device)
            for k, v in batch.items()}


def collate(examples, pad_id):
    """Right-pads ids/labels/spans; pads pixel batches to the most images and the largest tiles."""
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    batch = {"input_ids": torch.full((B, T), pad_id), "attention_mask": torch.zeros(B, T, dtype=torch.long),
             "labels": torch.full((B, T), -100), "spans": torch.zeros(B, T, dtype=torch.long)}
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n], batch["labels"][i, :n] = e["input_ids"], e["labels"]
        batch["spans"][i, :n] = e["spans"]
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


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n):
    """The order of n records in one epoch: a fixed permutation per (seed, epoch), so that a resumed
    run (SFT or GRPO) sees exactly the batches an uninterrupted one would."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def record_at(seed, i, n):
    """The index of the record at place i of a run's sequence of epochs (each in epoch_order)."""
    epoch, pos = divmod(i, n)
    return epoch_order(seed, epoch, n)[pos]


def encode_all(proc, records, max_len=2048, skips=None):
    """encode_record for every record, the texts through the tokenizer in one batch (its threads); a
    record that cannot be used goes to skips (None: the first one raises)."""
    skips = Skips(strict=True) if skips is None else skips
    prepared = []
    for rec in records:
        try:
            prepared.append((rec, *record_text(proc, rec)))
        except RecordError as e:
            skips.add(e)
    encodings = proc.tokenizer.encode_batch([text for _, text, *_ in prepared])
    kept = []
    for (rec, _, prompt_len, cut, pixels), enc in zip(prepared, encodings):
        try:
            kept.append(tokens_to_example(proc, rec, enc, prompt_len, cut, pixels, max_len))
        except RecordError as e:
            skips.add(e)
    return kept
