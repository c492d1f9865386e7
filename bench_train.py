"""
Training-step cost of the Att-CoT objective next to CoT-SFT: a SmolVLM-256M-shaped model (random
init), bf16 autocast, sequence 2048 with 1088 image tokens (17 tiles of 64), batch 8. Tokens/s and
peak memory for sft, attcot with the CUDA kernel, attcot with the PyTorch reference path, and
attcot with the stock SDPA route (V = the group bits). Each objective runs in its own process, so
one's allocator state never inflates the next one's peak.

    python bench_train.py               # GPU
    python bench_train.py --activation-checkpointing --batch 8
    python bench_train.py --cpu --steps 30          # the default run's model and batches, on the CPU
    python bench_train.py --shape tiny              # a quick check of the script on CPU
    python bench_train.py --cpu --shape 256m --batch 1 --steps 1   # the activation memory ratio, no GPU
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

import data
import nanoattcot
import synthetic
from model import VLM, TextConfig, VisionConfig, VLMConfig, peak_flops
from records import read_records


def make_batch(cfg, B, T, n_tiles, device):
    n_img = n_tiles * cfg.image_seq_len
    ids = torch.randint(100, cfg.text.vocab_size - 100, (B, T), device=device)
    ids[:, 4:4 + n_img] = cfg.image_token_id
    spans = torch.full((B, T), data.P, device=device)
    spans[:, 4:4 + n_img] = data.V
    r0 = 4 + n_img + 32  # the question, then the reply: rationale and a short answer
    spans[:, r0:T - 16], spans[:, T - 16:] = data.R, data.A
    side = cfg.vision.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "spans": spans,
            "labels": torch.where(spans >= data.R, ids, -100),
            "pixel_values": torch.randn(B, n_tiles, 3, side, side, device=device),
            "pixel_attention_mask": torch.ones(B, n_tiles, side, side, dtype=torch.long, device=device)}


def default_run_batch(B):
    """The default run's model config and a batch of B of its records, encoded as it encodes them
    (the synthetic set, its tokenizer trained on 1,000 records: the real lengths and spans)."""
    with tempfile.TemporaryDirectory() as d:
        synthetic.make_synthetic(d, 1000, 2, seed=0)
        recs = read_records(synthetic.paths(d)[0])
        proc = data.new_processor([r["question"] + " " + r["reply"] for r in recs], tile=96, image_seq_len=9,
                                  vocab_size=600)
        batch = data.collate(data.encode_all(proc, recs[:B]), proc.pad_token_id)
    return synthetic.small_config(proc.tokenizer.get_vocab_size(), proc.image_token_id), batch


def saved_for_backward(model, fn):
    """Runs fn() (a forward) and returns its result and the bytes autograd keeps for the backward,
    each storage once and parameters left out: the activation memory, measurable on any device."""
    params, storages = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


RUNS = {"sft": ("sft", "auto"), "attcot (kernel)": ("attcot", "cuda"),
        "attcot (reference)": ("attcot", "reference"), "attcot (sdpa)": ("attcot", "sdpa")}


def parser():
    p = argparse.ArgumentParser(prog="bench_train.py", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--shape", choices=("256m", "default-run", "tiny"), help="the model and batch: "
                   "SmolVLM-256M (2048 tokens, 17 tiles), the default run's small model on its synthetic "
                   "records, or a toy for a smoke run (default: 256m on a GPU, default-run with --cpu)")
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps after the warm-up (default: %(default)s)")
    p.add_argument("--batch", type=int, help="records per step (default: 8 for 256m, the default run's 16)")
    p.add_argument("--cpu", action="store_true",
                   help="on the CPU (256m there is slow: --shape 256m --batch 1 --steps 1)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in the backward")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated, from: " + ", ".join(RUNS)
                   + " (default: all)")
    # internal: run this one objective and print its row as JSON
    p.add_argument("--one", help=argparse.SUPPRESS)
    return p


def main():
    args = parser().parse_args()
    args.shape = args.shape or ("default-run" if args.cpu else "256m")
    on_gpu = torch.cuda.is_available() and not (args.shape == "tiny" or args.cpu)
    device = torch.device("cuda" if on_gpu else "cpu")
    batch = None
    if args.shape == "tiny":
        cfg = VLMConfig(VisionConfig(64, 128, 1, 2, 16, 64), TextConfig(1000, 128, 256, 2, 2, 1, 64), 2, 999)
        B, T, tiles = 2, 128, 4
    elif args.shape == "default-run":
        cfg, batch = default_run_batch(args.batch or 16)
        (B, T), tiles = batch["input_ids"].shape, 1
        batch = {k: v.to(device) for k, v in batch.items()}
    else:  # SmolVLM-256M's shapes (the config defaults)
        cfg, B, T, tiles = VLMConfig(VisionConfig(), TextConfig(), 4, 49190), args.batch or 8, 2048, 17
    layers = list(range(cfg.text.num_hidden_layers))
    if args.one is None:  # each objective in a fresh process
        rows = []
        for name in args.runs.split(","):
            if device.type != "cuda" and name == "attcot (kernel)":
                continue  # the kernel needs a GPU
            run = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", name],
                                 capture_output=True, text=True)
            sys.stdout.write(run.stdout.split("ROW ")[0])
            rows.append(json.loads(run.stdout.split("ROW ")[1]) if "ROW " in run.stdout else
                        [name, *[float("nan")] * 5])
            if run.returncode:
                print(f"  {name}: failed\n{run.stderr[-1500:]}")
        return print_table(rows, device, B, T, tiles, cfg, layers, args)
    batch = make_batch(cfg, B, T, tiles, device) if batch is None else batch
    flops_peak = peak_flops(device)  # MFU counts the model's matmuls (sft's), not the masses
    name = args.one
    objective, impl = RUNS[name]
    torch.manual_seed(0)
    model = VLM(cfg).to(device).checkpoint_activations(args.activation_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tcfg = nanoattcot.TrainConfig(objective=objective, mass_impl=impl)
    counts = nanoattcot.step_counts([batch])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)

    def step(measure=False):  # measure: count what is saved for the backward (only in the warm-up)
        terms = lambda: nanoattcot.loss_terms(model, batch, tcfg, layers)
        forward = lambda: nanoattcot.total_loss(terms(), counts, tcfg)
        with autocast:
            loss, saved = saved_for_backward(model, forward) if measure else (forward(), None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return saved
    try:
        saved = step(measure=True) / 2**30  # warm-up (and the extension build)
    except torch.OutOfMemoryError:
        print(f"  {name}: out of memory")
        print("ROW " + json.dumps([name, *[float("nan")] * 5]))
        return
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    mfu = model.train_flops(batch["input_ids"], batch["attention_mask"]) / dt / (flops_peak or float("nan"))
    print(f"  {name}: {dt:.3f} s/step, peak {peak:.2f} GiB, saved for backward {saved:.2f} GiB", flush=True)
    print("ROW " + json.dumps([name, B * T / dt, dt, peak, saved, 100 * mfu]))


def print_table(rows, device, B, T, tiles, cfg, layers, args):
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\ntraining step, {args.shape} shape, {dev}, batch {B} x {T} tokens "
          f"({tiles * cfg.image_seq_len} image), all {len(layers)} layers, mean of {args.steps} steps"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}; each objective in its "
          "own process")
    print("peak: the device's peak allocation (GPU only); saved: what autograd keeps for the backward")
    print(f"{'objective':20s} {'tokens/s':>10s} {'s/step':>8s} {'x time':>7s} {'peak GiB':>9s} "
          f"{'x peak':>7s} {'saved GiB':>10s} {'x saved':>8s} {'MFU %':>6s}")
    for name, tps, dt, peak, saved, mfu in rows:
        print(f"{name:20s} {tps:10.0f} {dt:8.3f} {dt / rows[0][2]:7.3f} {peak:9.2f} "
              f"{peak / rows[0][3]:7.3f} {saved:10.3f} {saved / rows[0][4]:8.3f} {mfu:6.1f}")


if __name__ == "__main__":
    main()
