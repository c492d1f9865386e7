"""
Prefill and decode speed of our generate next to transformers' on the same checkpoint, inputs
and dtype. A random SmolVLM-256M-shaped checkpoint is made with transformers (no download).

    python -m bench.generate                  # CPU: fp32; GPU: bf16
    python -m bench.generate --size tiny      # a quick check of the script itself
"""
import argparse
import tempfile
import time

import torch

from model import VLM

SIZES = {  # SmolVLM-256M's architecture numbers (model.py's config defaults), and a toy for smoke runs
    "256m": dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, patch_size=16, image_size=512),
                 text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64), scale_factor=4),
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, patch_size=16, image_size=64),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16), scale_factor=2),
}


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats + 1):  # the first run is warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def parser():
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--size", default="256m", choices=list(SIZES),
                   help="the model's shape (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="prompts per batch (default: %(default)s)")
    p.add_argument("--prompt-text-tokens", type=int, default=64,
                   help="text tokens per prompt besides the image's (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs, the median reported (default: %(default)s)")
    return p


def main():
    args = parser().parse_args()
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = SIZES[args.size]
    cfg = SmolVLMConfig(vision_config=s["vision"], scale_factor=s["scale_factor"], image_token_id=1000,
                        text_config=dict(model_type="llama", vocab_size=49280, rope_theta=100000.0,
                                         rms_norm_eps=1e-5, max_position_embeddings=8192, **s["text"]))
    torch.manual_seed(0)
    hf = SmolVLMForConditionalGeneration(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = VLM.from_pretrained(d, dtype=dtype, device=device).eval()
    hf = hf.to(device=device, dtype=dtype)

    # one image (one tile, no splitting) at the start of a text prompt, same batch for both
    n_img = ours.config.image_seq_len
    B, T = args.batch, n_img + args.prompt_text_tokens
    ids = torch.randint(2000, 40000, (B, T), device=device)
    ids[:, 1:1 + n_img] = 1000
    side = s["vision"]["image_size"]
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values=torch.randn(B, 1, 3, side, side, device=device, dtype=dtype),
                  pixel_attention_mask=torch.ones(B, 1, side, side, dtype=torch.long, device=device))

    def ours_gen(n):
        return lambda: ours.generate(**inputs, max_new_tokens=n)

    def hf_gen(n):
        return lambda: hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    rows = []
    with torch.no_grad():
        for name, gen in (("nanoattcot", ours_gen), ("transformers", hf_gen)):
            prefill = timed(gen(1), device, args.repeats)  # prompt forward + one token
            full = timed(gen(args.new_tokens), device, args.repeats)
            rows.append((name, B * T / prefill, B * (args.new_tokens - 1) / (full - prefill)))
    print(f"\ngenerate, {args.size} config, {device.type} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), {dtype}, batch {B}, "
          f"prompt {T} tokens ({n_img} image), {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'':14s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for name, pre, dec in rows:
        print(f"{name:14s} {pre:14.0f} {dec:13.1f}")
    print(f"{'ratio ours/hf':14s} {rows[0][1] / rows[1][1]:14.2f} {rows[0][2] / rows[1][2]:13.2f}")


if __name__ == "__main__":
    main()
