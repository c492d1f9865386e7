"""
The memory plan: what fine-tuning each SmolVLM size holds on a GPU, full and with LoRA, computed from
the model configs, and the activation part checked on the CPU.

What this trainer holds (train.py: weights kept in fp32, the forward under bf16 autocast):
  full fine-tune: weights 4 B + gradients 4 B + AdamW's two moments 8 B per parameter (16 B);
  LoRA:           the frozen weights 4 B per parameter, and 16 B per adapter parameter.
  activations:    what autograd keeps for the backward, per 1,000 tokens of text (decoder) and per
                  image tile (vision tower and connector), with and without --activation-checkpointing.

The activations are measured, not guessed: saved_for_backward (the bytes autograd keeps, each storage
once) on models of the real widths but 1 and 2 layers deep at two lengths, on the CPU under bf16
autocast, fitted per layer and per token (fit); a 3-layer model at another length checks the fit (the
"check" column: measured over predicted). The table adds it up at the README's sequence (2,048 tokens
of which 17 image tiles, batch 1) and says which card it fits. Computed, not measured on a GPU: the
allocator's overhead and fragmentation come on top.

    python -m bench.memory               # the table (about 10 minutes on 2 cores)
    python -m bench.memory --rank 64     # with another LoRA rank
"""
import argparse
import dataclasses
import multiprocessing
import os
import subprocess
import sys

import torch

import lora
from bench.train import saved_for_backward
from model import VLM, TextConfig, VisionConfig, VLMConfig

GiB = 2 ** 30
# the three released sizes, from their config.json files (vocabulary 49,280; untied LM heads)
SHAPES = {
    "256M": VLMConfig(VisionConfig(), TextConfig(), 4),
    "500M": VLMConfig(VisionConfig(), TextConfig(hidden_size=960, intermediate_size=2560,
                                                 num_hidden_layers=32, num_attention_heads=15,
                                                 num_key_value_heads=5), 4),
    "2.2B": VLMConfig(VisionConfig(1152, 4304, 27, 16, 14, 384),
                      TextConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                 num_attention_heads=32, num_key_value_heads=32), 3),
}
TOKENS, TILES, CARDS = 2048, 17, (24, 40, 80)  # (cards in GiB: 24 GB cards hold 24 GiB)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # -m bench.* runs from there


def shallow(cfg, text_layers, vision_layers):
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=text_layers),
                               vision=dataclasses.replace(cfg.vision, num_hidden_layers=vision_layers))


def counts(cfg, rank):
    """-> (parameters, LoRA's adapter parameters at this rank on every decoder linear), on the meta device."""
    with torch.device("meta"):
        model = VLM(cfg)
        n = sum(p.numel() for p in model.parameters())
        lora.add_lora(model, rank, rank)
        return n, sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)


def activations(*args):
    """measure(*args), in a process of its own: a process that built a model does not give all of its
    memory back, and 2.2B's 44 models in one process exhaust 24 GB."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def measure(cfg, text_layers, vision_layers, tokens, tiles, recompute, rank=0):
    """Bytes autograd keeps for one training forward (loss on every token) of a shallow copy of cfg,
    with LoRA adapters of this rank on its decoder (0: a full fine-tune)."""
    torch.manual_seed(0)
    model = VLM(shallow(cfg, text_layers, vision_layers)).checkpoint_activations(recompute).train()
    if rank:
        lora.add_lora(model, rank, rank)  # (the frozen tower then keeps nothing for the backward)
    p = cfg.vision.patch_size  # (2.2B: 384 px tiles of 14 px patches, the 27 x 27 patches read 378 px)
    side, n_img = p * (cfg.vision.image_size // p), tiles * cfg.image_seq_len
    ids = torch.randint(100, 40000, (1, tokens))
    ids[:, 4:4 + n_img] = cfg.image_token_id
    pixels = torch.randn(1, tiles, 3, side, side) if tiles else None
    mask = torch.ones(1, tiles, side, side, dtype=torch.long) if tiles else None

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(ids, pixels, mask, torch.ones_like(ids)).logits.float().logsumexp(-1).sum()
    return saved_for_backward(model, forward)[1]


def fit(cfg, recompute, rank, T=(256, 512)):
    """The activations as a function of the decoder's depth and tokens, and the tower's depth and
    tiles: bytes = a + b * tokens + depth * (c + d * tokens) for the decoder (c: a layer's bf16 weight
    copies under autocast, kept once whatever the length; d: its per-token part), the same form in
    tiles for the tower. Fitted on 1- and 2-layer models at two sizes each -> (decoder(depth, tokens),
    tower(depth, tiles), the check: a 3-layer model at 1,024 tokens, measured over predicted)."""
    a = {(d, t): activations(cfg, d, 1, t, 0, recompute, rank) for d in (1, 2) for t in T}
    d_ = ((a[2, T[1]] - a[1, T[1]]) - (a[2, T[0]] - a[1, T[0]])) / (T[1] - T[0])
    c = a[2, T[0]] - a[1, T[0]] - d_ * T[0]
    b = (a[1, T[1]] - a[1, T[0]]) / (T[1] - T[0]) - d_
    a0 = a[1, T[0]] - b * T[0] - c - d_ * T[0]
    decoder = lambda depth, tokens: a0 + b * tokens + depth * (c + d_ * tokens)
    check = activations(cfg, 3, 1, 1024, 0, recompute, rank) / decoder(3, 1024)
    tokens = lambda n: n * cfg.image_seq_len + 8
    no_image = {n: activations(cfg, 1, 1, tokens(n), 0, recompute, rank) for n in (1, 2)}
    i = {(d, n): activations(cfg, 1, d, tokens(n), n, recompute, rank) - no_image[n]
         for d in (1, 2) for n in (1, 2)}
    t1 = (i[2, 2] - i[1, 2]) - (i[2, 1] - i[1, 1])
    c1 = (i[2, 1] - i[1, 1]) - t1
    t0 = (i[1, 2] - i[1, 1]) - t1
    c0 = i[1, 1] - c1 - t0 - t1
    tower = lambda depth, tiles: c0 + depth * c1 + tiles * (t0 + depth * t1)
    return decoder, tower, check


def parser():
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16, help="LoRA's rank (default: %(default)s)")
    p.add_argument("--shape", choices=SHAPES, help="one size only (default: each, in a process of its own, "
                   "so that one's freed memory never crowds the next)")
    return p


def main():
    args = parser().parse_args()
    if args.shape is None:
        print(f"fine-tuning memory in GiB, batch 1, {TOKENS} tokens of which {TILES} image tiles (64 or 81 "
              f"tokens each); LoRA rank {args.rank} on the decoder's linears; activations measured on CPU "
              f"(bf16 autocast) and fitted; fits: the smallest of {', '.join(map(str, CARDS))} GiB cards "
              "whose 90% holds the run with checkpointing", flush=True)
        print(f"{'model':6} {'params':>7} {'adapters':>9} | states: full / LoRA | decoder per 1k tokens: "
              "full, +ckpt, LoRA, +ckpt | tower, 17 tiles: the same | total: the same | check | fits: "
              "full / LoRA", flush=True)
        for name in SHAPES:
            subprocess.run([sys.executable, "-m", "bench.memory", "--rank", str(args.rank), "--shape", name],
                           check=True, cwd=ROOT)
        return
    name, cfg = args.shape, SHAPES[args.shape]
    n, adapters = counts(cfg, args.rank)
    states = {"full": 16 * n, "LoRA": 4 * n + 16 * adapters}
    total, act, checks = {}, {}, []
    for kind, rank in (("full", 0), ("LoRA", args.rank)):
        for recompute in (False, True):
            decoder, tower, check = fit(cfg, recompute, rank)
            checks.append(check)
            per_1k = decoder(cfg.text.num_hidden_layers, 1000)
            vision = tower(cfg.vision.num_hidden_layers, TILES)
            act[kind, recompute] = per_1k, vision
            total[kind, recompute] = states[kind] + decoder(cfg.text.num_hidden_layers, TOKENS) + vision
    fits = lambda kind: next((f"{c}" for c in CARDS if total[kind, True] < 0.9 * c * GiB), "none")
    print(f"{name:6} {n / 1e9:6.2f}B {adapters / 1e6:8.1f}M | {states['full'] / GiB:6.1f} "
          f"{states['LoRA'] / GiB:6.1f} | "
          + " ".join(f"{act[k, r][0] / GiB:5.2f}" for k in ("full", "LoRA") for r in (False, True)) + " | "
          + " ".join(f"{act[k, r][1] / GiB:5.2f}" for k in ("full", "LoRA") for r in (False, True)) + " | "
          + " ".join(f"{total[k, r] / GiB:6.1f}" for k in ("full", "LoRA") for r in (False, True))
          + f" | {min(checks):.2f}-{max(checks):.2f} | {fits('full')} / {fits('LoRA')}")


if __name__ == "__main__":
    main()
