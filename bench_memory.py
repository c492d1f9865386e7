"""
The memory plan: what fine-tuning each SmolVLM size holds on a GPU, full and with LoRA, computed from
the model configs, and the activation part checked on the CPU.

What this trainer holds (nanoattcot.py train: weights kept in fp32, the forward under bf16 autocast):
  full fine-tune: weights 4 B + gradients 4 B + AdamW's two moments 8 B per parameter (16 B);
  LoRA:           the frozen weights 4 B per parameter, and 16 B per adapter parameter.
  activations:    what autograd keeps for the backward, per 1,000 tokens of text (decoder) and per
                  image tile (vision tower and connector), with and without --activation-checkpointing.

The activations are measured, not guessed: saved_for_backward (the bytes autograd keeps, each storage
once) on models of the real widths but 1 and 2 layers deep, on the CPU under bf16 autocast; a layer
costs the difference, the rest (embeddings, logits) the remainder. A third, 3-layer model checks the
sum (the "check" column: measured over predicted). The table then adds it up at the README's
sequence (2,048 tokens of which 17 tiles of 64 image tokens, batch 1) and says which card it fits.
Computed, not measured on a GPU: the allocator's overhead and fragmentation come on top.

    python bench_memory.py               # the table (about a minute on 2 cores)
    python bench_memory.py --rank 64     # with another LoRA rank
"""
import argparse
import dataclasses
import subprocess
import sys

import torch

import lora
from bench_train import saved_for_backward
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
TOKENS, TILES, CARDS = 2048, 17, (24, 40, 80)


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


def activations(cfg, text_layers, vision_layers, tokens, tiles, recompute):
    """Bytes autograd keeps for one training forward (loss on every token) of a shallow copy of cfg."""
    torch.manual_seed(0)
    model = VLM(shallow(cfg, text_layers, vision_layers)).checkpoint_activations(recompute).train()
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


def per_part(cfg, recompute, tokens=512, tiles=1):
    """-> bytes per decoder layer per token, fixed decoder bytes per token, bytes per tile (the whole
    tower and connector), and the 3-deep check (measured / predicted)."""
    text = [activations(cfg, d, 1, tokens, 0, recompute) for d in (1, 2, 3)]
    layer, fixed = text[1] - text[0], text[0] - (text[1] - text[0])
    check = text[2] / (fixed + 3 * layer)
    vision = [activations(cfg, 1, d, tiles * cfg.image_seq_len + 8, tiles, recompute) for d in (1, 2)]
    no_image = activations(cfg, 1, 1, tiles * cfg.image_seq_len + 8, 0, recompute)
    tile_layer = (vision[1] - vision[0]) / tiles
    tile_fixed = (vision[0] - no_image) / tiles - tile_layer
    return layer / tokens, fixed / tokens, tile_fixed + tile_layer * cfg.vision.num_hidden_layers, check


def parser():
    p = argparse.ArgumentParser(prog="bench_memory.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--rank", type=int, default=16, help="LoRA's rank (default: %(default)s)")
    p.add_argument("--shape", choices=SHAPES, help="one size only (default: each, in a process of its own, "
                   "so that one's freed memory never crowds the next)")
    return p


def main():
    args = parser().parse_args()
    if args.shape is None:
        print(f"fine-tuning memory, batch 1, {TOKENS} tokens with {TILES} image tiles; GiB; LoRA rank "
              f"{args.rank} on the decoder's linears; activations measured on CPU (bf16 autocast); fits: the "
              f"smallest of {', '.join(map(str, CARDS))} GB cards whose 90% holds the run with checkpointing",
              flush=True)
        print(f"{'model':6} {'params':>7} {'adapters':>9} | {'full: w+g+opt':>13} {'LoRA: w+opt':>11} | "
              f"{'act/1k tok':>10} {'ckpt':>6} {'act/tile':>8} {'ckpt':>6} {'check':>5} | "
              f"{'full':>6} {'+ckpt':>6} {'LoRA':>6} {'+ckpt':>6} | fits: full / LoRA", flush=True)
        for name in SHAPES:
            subprocess.run([sys.executable, __file__, "--rank", str(args.rank), "--shape", name], check=True)
        return
    name, cfg = args.shape, SHAPES[args.shape]
    n, adapters = counts(cfg, args.rank)
    states = {"full": 16 * n, "LoRA": 4 * n + 16 * adapters}
    act = {}
    for recompute in (False, True):
        layer, fixed, tile, check = per_part(cfg, recompute)
        act[recompute] = (1000 * (fixed + layer * cfg.text.num_hidden_layers), tile, check)
    total = {(kind, r): states[kind] + act[r][0] * TOKENS / 1000 + act[r][1] * TILES
             for kind in states for r in (False, True)}
    fits = lambda kind: next((f"{c}" for c in CARDS if total[kind, True] < c * 1e9 * 0.9), "none")
    print(f"{name:6} {n / 1e9:6.2f}B {adapters / 1e6:8.1f}M | {states['full'] / GiB:13.1f} "
          f"{states['LoRA'] / GiB:11.1f} | {act[False][0] / GiB:10.2f} {act[True][0] / GiB:6.2f} "
          f"{act[False][1] / GiB:8.3f} {act[True][1] / GiB:6.3f} {act[False][2]:5.2f} | "
          + " ".join(f"{total[k, r] / GiB:6.1f}" for k in ("full", "LoRA") for r in (False, True))
          + f" | {fits('full')} / {fits('LoRA')}")


if __name__ == "__main__":
    main()
