"""
The base's first stage: the vision encoder pretrained on images and their descriptions before the
VLM exists, as SigLIP's was, with its sigmoid loss in miniature; then a linear probe of its tokens.

SigLIP (Zhai et al. 2023) embeds a batch of n images (x_i) and n texts (y_j), each L2-normalised,
and scores every pair with logit_ij = t x_i . y_j + b, t = exp(t') and b learnt (from log 10 and
-10). Each pair is its own binary question, "do they match?", z_ij = +1 on the matching pairs and -1
on the rest:

    L = -1/n sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b))

Two units of a pair are possible here, since each of the small model's 9 image tokens covers one cell:
  unit "image": an image (the mean of its tokens' embeddings) against its whole description ("Row 1:
                nothing, a small red circle, ... "), n = the batch's images;
  unit "cell":  each image token against its cell's phrase ("a small red circle", "nothing"), the
                texts being the batch's distinct phrases (a cell's phrase repeats across a batch: the
                sigmoid loss takes any number of positives per row, where softmax wants one).
The README says which wins and why (measured by the caption check of a VLM built on each).

    tower, seconds = pretrain(cfg, proc, out_dir)   # out_dir/tower.safetensors, probe.json, summary.json
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from files import atomic_write
from model import pixel_shuffle
from setting import synthetic
from siglip import VisionBlock, VisionConfig, VisionTower


UNITS = ("image", "cell")


@dataclass
class VisionStageConfig:
    unit: str = "image"   # one of UNITS, the module docstring
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    pairs: int = 4000     # images rendered (in memory) with their descriptions
    embed: int = 64       # the shared embedding's width, and the text tower's
    seed: int = 0


class TextTower(nn.Module):
    """SigLIP's text tower in miniature: token and position embeddings, one transformer block (the
    vision tower's own, bidirectional), a final LayerNorm, the mean over the text's tokens, a linear
    head."""
    def __init__(self, vocab_size, width, max_len=160):
        super().__init__()
        c = VisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1,
                         num_attention_heads=2)
        self.token, self.position = nn.Embedding(vocab_size, width), nn.Embedding(max_len, width)
        self.block, self.norm, self.head = VisionBlock(c), nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, ids, mask):  # (m, L) token ids, (m, L) bool -> (m, width)
        x = self.token(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        x = self.norm(self.block(x, mask[:, None, None, :]))
        return self.head((x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))


class SigLIP(nn.Module):
    """The VLM's vision tower with an image head on its pixel-shuffled tokens (what the connector will
    read), the text tower, and the loss's temperature t' and bias b."""
    def __init__(self, vision: VisionConfig, scale_factor, vocab_size, cfg: VisionStageConfig):
        super().__init__()
        self.unit, self.scale_factor = cfg.unit, scale_factor
        self.tower = VisionTower(vision)
        self.image_head = nn.Linear(vision.hidden_size * scale_factor**2, cfg.embed)
        self.text = TextTower(vocab_size, cfg.embed)
        self.t_prime = nn.Parameter(torch.tensor(math.log(10.0)))  # t = exp(t') starts at 10
        self.bias = nn.Parameter(torch.tensor(-10.0))
        for m in self.tower.modules():  # the tower as the VLM initialises it; the heads keep torch's
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):  # (with N(0, 0.02) they learn 2x slower)
                nn.init.normal_(m.weight, std=0.02)

    def tokens(self, pixels):  # (n, 3, H, W) -> (n, 9, C s^2): what the VLM's connector takes
        patch_mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool, device=pixels.device)
        p = self.tower.embeddings.patch_size
        return pixel_shuffle(self.tower(pixels, patch_mask[:, ::p, ::p]), self.scale_factor)

    def image_embeddings(self, pixels):  # -> (n, E) per image, or (n * 9, E) per token
        x = self.image_head(self.tokens(pixels))
        return F.normalize(x.mean(1) if self.unit == "image" else x.flatten(0, 1), dim=-1)

    def text_embeddings(self, ids, mask):
        return F.normalize(self.text(ids, mask), dim=-1)


def sigmoid_loss(img, txt, match, t_prime, bias):
    """SigLIP's loss: img (n, E) and txt (m, E) unit vectors, match (n, m) bool -> a scalar, the sum
    over every pair of -log sigmoid(z (t x.y + b)), divided by n."""
    logits = t_prime.exp() * img @ txt.T + bias
    z = match.float() * 2 - 1
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


def random_grid(rng):  # the synthetic set's own grid: a cell is empty 35% of the time
    return [[None if rng.random() < 0.35 else synthetic.random_item(rng) for _ in range(synthetic.GRID)]
            for _ in range(synthetic.GRID)]


def cells(grid):  # row-major, as the image tokens are
    return [grid[r][c] for r in range(synthetic.GRID) for c in range(synthetic.GRID)]


def pixels_of(proc, grids, image_size):
    """Grids -> (n, 3, S, S) pixel values, rendered in memory and processed as the VLM sees them."""
    return torch.stack([torch.from_numpy(proc.image_processor.arrays(synthetic.render(g, image_size))[0][-1])
                        for g in grids])


def encode(proc, texts):  # -> (m, L) ids, (m, L) bool, right-padded
    ids = [e.ids for e in proc.tokenizer.encode_batch(texts)]
    out = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    mask = torch.zeros(out.shape, dtype=torch.bool)
    for i, x in enumerate(ids):
        out[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), True
    return out, mask


def batch_texts(grids, unit):
    """The texts of a batch and which image (or token) matches which: unit "image", the descriptions
    (match = identity); unit "cell", the batch's distinct cell phrases (match: token i's own)."""
    if unit == "image":
        return [synthetic.in_words(g) for g in grids], torch.eye(len(grids), dtype=torch.bool)
    said = [synthetic.describe(c) for g in grids for c in cells(g)]
    phrases = sorted(set(said))
    return phrases, torch.tensor([[s == p for p in phrases] for s in said])


def pretrain(cfg: VisionStageConfig, proc, model_config, out_dir, log=print):
    """Trains SigLIP for cfg.steps on cfg.pairs rendered images, with a checkpoint every 100 steps (a
    killed stage resumes there: the batches are drawn from the step), then writes the tower's weights
    (tower.safetensors) and summary.json. -> the trained VisionTower."""
    from safetensors.torch import load_file, save_file
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, "tower.safetensors")
    torch.manual_seed(cfg.seed)
    model = SigLIP(model_config.vision, model_config.scale_factor, proc.tokenizer.get_vocab_size(), cfg)
    if os.path.exists(final):
        model.tower.load_state_dict(load_file(final))
        return model.tower
    rng = np.random.default_rng(cfg.seed)
    grids = [random_grid(rng) for _ in range(min(cfg.pairs, cfg.steps * cfg.batch_size))]  # (all a run draws)
    pixels = pixels_of(proc, grids, model_config.vision.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    ckpt, step, losses, t0 = os.path.join(out_dir, "checkpoint.pt"), 0, [], time.time()
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, losses = state["step"], state["losses"]
        log(f"vision: resumed from {ckpt} at step {step}")
    def save():  # (a file object: torch.save names its archive after a path, and .tmp-x is no name)
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "losses": losses}
        atomic_write(ckpt, lambda tmp: torch.save(state, open(tmp, "wb")))
    try:
        while step < cfg.steps:
            for g in opt.param_groups:  # linear warmup over a tenth, cosine to a tenth
                g["lr"] = cfg.lr * lr_factor(step, cfg.steps)
            drawn = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the same after a resume
            pick = torch.randint(len(grids), (cfg.batch_size,), generator=drawn).tolist()
            texts, match = batch_texts([grids[i] for i in pick], cfg.unit)
            img, txt = model.image_embeddings(pixels[pick]), model.text_embeddings(*encode(proc, texts))
            loss = sigmoid_loss(img, txt, match, model.t_prime, model.bias)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, losses = step + 1, losses + [loss.item()]
            if step % 100 == 0 or step == cfg.steps:
                log(f"vision step {step:4d}/{cfg.steps} loss {sum(losses[-100:]) / len(losses[-100:]):.3f} "
                    f"t {model.t_prime.exp().item():.1f} b {model.bias.item():.2f} | {time.time() - t0:.0f}s")
                if step < cfg.steps:
                    save()
    except KeyboardInterrupt:
        save()
        log(f"interrupted: saved {ckpt} at step {step}; the same command continues")
        raise SystemExit(130)
    atomic_write(final, lambda tmp: save_file(model.tower.state_dict(), tmp))
    rng = np.random.default_rng(cfg.seed + 2)  # unseen images
    write_json(os.path.join(out_dir, "summary.json"), {
        "config": asdict(cfg), "losses": losses, "seconds": round(time.time() - t0, 1),
        "retrieval": retrieval(model, proc, [random_grid(rng) for _ in range(100)], model_config)})
    if os.path.exists(ckpt):
        os.remove(ckpt)
    return model.tower


@torch.no_grad()
def retrieval(model, proc, grids, model_config):
    """What the contrastive stage taught, on unseen images: the share of images (unit image) or tokens
    (unit cell) whose likeliest text, among the texts of all of them, is their own."""
    texts, match = batch_texts(grids, model.unit)
    img = model.image_embeddings(pixels_of(proc, grids, model_config.vision.image_size))
    best = (img @ model.text_embeddings(*encode(proc, texts)).T).argmax(1)
    return float(match[torch.arange(len(best)), best].float().mean())


def lr_factor(step, steps):
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(steps - warm, 1)))


def write_json(path, obj):
    atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(obj)))


# -----------------------------------------------------------------------------
# the linear probe: does each token say what its cell holds?

ATTRIBUTES = (("empty", 2), ("colour", len(synthetic.COLOURS)), ("kind", len(synthetic.KINDS)), ("size", 2))


def cell_labels(cell):
    """A cell -> its probe labels (empty 0 / shape 1, colour, kind, size); -1 where an empty cell has none."""
    if cell is None:
        return 0, -1, -1, -1
    colour, kind, large = cell
    return 1, list(synthetic.COLOURS).index(colour), synthetic.KINDS.index(kind), int(large)


@torch.no_grad()
def token_features(tower, proc, grids, model_config, batch=500):  # -> (n * 9, C s^2)
    patch = model_config.vision.patch_size
    out = []
    for s in range(0, len(grids), batch):
        px = pixels_of(proc, grids[s:s + batch], model_config.vision.image_size)
        mask = torch.ones(px.shape[0], px.shape[2] // patch, px.shape[3] // patch, dtype=torch.bool)
        out.append(pixel_shuffle(tower(px, mask), model_config.scale_factor).flatten(0, 1))
    return torch.cat(out)


def probe(tower, proc, model_config, train_grids, eval_grids, steps=300):
    """A linear classifier per attribute (empty, colour, kind, size) on the tower's tokens, trained on
    train_grids' cells (standardised features, full-batch Adam), scored on eval_grids' -> accuracy per
    attribute (on the cells that have it) and "cell": every attribute of the cell right."""
    x_tr, x_ev = (token_features(tower, proc, g, model_config) for g in (train_grids, eval_grids))
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_ev = (x_tr - mean) / std, (x_ev - mean) / std
    y_tr, y_ev = (torch.tensor([cell_labels(c) for g in grids for c in cells(g)])
                  for grids in (train_grids, eval_grids))
    out, guesses = {}, []
    for j, (name, classes) in enumerate(ATTRIBUTES):
        head = nn.Linear(x_tr.shape[1], classes)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        has = y_tr[:, j] >= 0
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.cross_entropy(head(x_tr[has]), y_tr[has, j])
                opt.zero_grad()
                loss.backward()
                opt.step()
        guess = head(x_ev).argmax(1)
        has = y_ev[:, j] >= 0
        out[name] = float((guess[has] == y_ev[has, j]).float().mean())
        guesses.append(guess)
    guess = torch.stack(guesses, 1)
    empty_right = guess[:, 0] == y_ev[:, 0]
    rest_right = (y_ev[:, 0] == 0) | (guess[:, 1:] == y_ev[:, 1:]).all(1)
    out["cell"] = float((empty_right & rest_right).float().mean())
    return out
