"""
Answer a prompt about images with a SmolVLM checkpoint, streaming the reply (the sampler is
model.VLM.generate: KV cache, greedy or nucleus sampling).

    python generate.py --model DIR --image PATH --prompt "What is in the image?"
    python generate.py --model DIR --image PATH --prompt "..." --visual-attn-scale 2 --visual-attn-layers 0:8

--visual-attn-scale f is the test-time intervention AVAR reports: the image keys' attention
probabilities times f (then renormalised) in the layers given.
"""
import argparse
import sys
import time

import torch

import config
import data
import lora
from device import pick_device


@torch.no_grad()
def generate_answers(model, proc, records, batch_size=64, max_new_tokens=160, replies=None, log=None,
                     temperature=0.0, generator=None):
    """Greedy (or sampled, temperature > 0) generation for each record -> list of generated texts.
    replies: a text per record that the reply is forced to start with (a cut rationale and the answer
    marker, say). log(line): progress."""
    model.eval()
    device = next(model.parameters()).device
    texts, t0 = [], time.time()
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        prompts = [data.record_prompt(proc, r) + (replies[s + i] if replies else "")
                   for i, r in enumerate(chunk)]
        images = [[data.load_image(p, r["source"]) for p in r["images"]] for r in chunk]
        batch = proc(prompts, images if any(images) else None, padding_side="left")
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=proc.eos_token_id,
                             temperature=temperature, generator=generator)
        texts += [proc.decode(row) for row in out]
        if log:
            rate = len(texts) / (time.time() - t0)
            log(f"{len(texts)}/{len(records)} items, {rate:.1f} items/s, ETA "
                f"{(len(records) - len(texts)) / rate:.0f}s")
    return texts


def generate(args):
    device = pick_device(args.device)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    if dtype is None:  # bf16 where it is fast, fp32 on CPU
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = lora.load(args.model, args.adapter, dtype=dtype, device=device).eval()
    if not args.visual_attn_scale > 0:
        raise config.ConfigError(f"--visual-attn-scale {args.visual_attn_scale}: must be > 0")
    model.boost_image_attention(args.visual_attn_scale,
                                config.layer_set(args.visual_attn_layers, len(model.layers),
                                                 "--visual-attn-layers"))
    proc = data.Processor.from_pretrained(args.model)
    text = data.chat_prompt(proc, args.prompt, len(args.image))  # the prompt format training and eval use
    batch = {k: v.to(device) for k, v in proc(text, [args.image] if args.image else None).items()}

    new_ids, printed = [], ""

    def stream(tok):  # decode everything so far and print what is new (BPE pieces join up)
        nonlocal printed
        new_ids.append(int(tok[0]))
        now = proc.decode(new_ids)
        sys.stdout.write(now[len(printed):])
        sys.stdout.flush()
        printed = now

    t0 = time.time()
    model.generate(**batch, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p,
                   eos_token_id=proc.eos_token_id, on_token=stream)
    print(f"\n[{len(new_ids)} tokens in {time.time() - t0:.1f}s, prompt {batch['input_ids'].shape[1]} "
          "tokens]", file=sys.stderr)


def parser():
    g = argparse.ArgumentParser(prog="generate.py", description="answer a prompt about images")
    g.add_argument("--model", required=True,
                   help="folder with config.json, model.safetensors, tokenizer.json")
    g.add_argument("--adapter", default="", help="a LoRA adapter folder (this project's or PEFT's) to fold "
                   "into --model (default: none)")
    g.add_argument("--image", action="append", default=[],
                   help="image file (repeat for several; default: none)")
    g.add_argument("--prompt", required=True, help="the question, as a user would type it")
    g.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's mass (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda or cuda:N "
                   "(default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU, float32 on CPU (default: %(default)s)")
    g.add_argument("--visual-attn-scale", type=float, default=1.0,
                   help="the image keys' attention times this "
                   "(1: off; default: %(default)s)")
    g.add_argument("--visual-attn-layers", default="all", help=f"the layers of the intervention: "
                   f"{config.LAYER_GRAMMAR} (default: %(default)s)")
    return g


def main(argv=None):
    args = parser().parse_args(argv)
    with config.one_line_errors():  # a bad file or flag: one line, no traceback
        generate(args)


if __name__ == "__main__":
    main()
