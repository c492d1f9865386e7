"""
nanoattcot: the command line.

    python nanoattcot.py generate --model DIR --image PATH --prompt "What is in the image?"

DIR is a SmolVLM / Idefics3 folder as published (config.json, model.safetensors, tokenizer and
processor files), e.g. HuggingFaceTB/SmolVLM-256M-Instruct downloaded with any tool.
"""
import argparse
import sys
import time

import torch

from data import Processor
from model import VLM


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_generate(args):
    device = pick_device(args.device)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if dtype is None:  # bf16 where it is fast, fp32 on CPU
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = VLM.from_pretrained(args.model, dtype=dtype, device=device).eval()
    proc = Processor.from_pretrained(args.model)
    content = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": args.prompt}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
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
    model.generate(**batch, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   eos_token_id=proc.eos_token_id, on_token=stream)
    print(f"\n[{len(new_ids)} tokens in {time.time() - t0:.1f}s, prompt {batch['input_ids'].shape[1]} tokens]",
          file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="answer a prompt about images with a SmolVLM checkpoint")
    g.add_argument("--model", required=True, help="folder with config.json, model.safetensors, tokenizer.json")
    g.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    {"generate": cmd_generate}[args.cmd](args)


if __name__ == "__main__":
    main()
