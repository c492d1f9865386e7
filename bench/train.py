"""
Training-step cost of the Att-CoT objective next to CoT-SFT: a SmolVLM-256M-shaped model (random
init), bf16 autocast, sequence 2048 with 1088 image tokens (17 tiles of 64), batch 8. Tokens/s and
peak memory for sft, attcot with the CUDA kernel, attcot with the PyTorch reference path, and
attcot with the stock SDPA route (V = the group bits). On a GPU each objective runs in its own
process, so one's allocator state never inflates the next one's peak; on the CPU (no peak to
measure) they run in one process, a step of each in turn, and the table gives each one's median
step, so that a noisy machine slows all of them alike.

    python -m bench.train               # GPU
    python -m bench.train --activation-checkpointing --batch 8
    python -m bench.train --cpu --steps 30          # the default run's model and batches, on the CPU
    python -m bench.train --shape tiny              # a quick check of the script on CPU
    python -m bench.train --cpu --shape 256m --batch 1 --steps 1   # the activation memory ratio, no GPU
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import data
import objective
from device import peak_flops
from methods import commit
from model import VLM, TextConfig, VisionConfig, VLMConfig, small_config
from records import read_records
from setting import synthetic
from train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # -m bench.* runs from there


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
    # the early-commitment term's cut copies of a quarter of the records, as training draws them
    batch["commit"] = commit.commit_batch(batch, proc.tokenizer.encode(" Answer:").ids, 0.25,
                                             torch.Generator().manual_seed(0), proc.pad_token_id,
                                             commit.answer_tokens(proc.tokenizer, recs))
    return small_config(proc.tokenizer.get_vocab_size(), proc.image_token_id), batch


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


# name -> objective, mass route, weight of the early-commitment term (its cut copies: default-run shape only)
RUNS = {"sft": ("sft", "auto", 0.0), "attcot (kernel)": ("attcot", "cuda", 0.0),
        "attcot (fused)": ("attcot", "fused", 0.0), "attcot (reference)": ("attcot", "reference", 0.0),
        "attcot (sdpa)": ("attcot", "sdpa", 0.0), "attcot + commit": ("attcot", "auto", 0.1)}


def chosen_runs(args, batch, device):
    """The --runs that can run here: the kernel needs a GPU, the commit term real records' cut copies."""
    return [n for n in args.runs.split(",") if (n != "attcot (kernel)" or device.type == "cuda")
            and (not RUNS[n][2] or (batch or {}).get("commit"))]


def parser():
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.strip().split("\n\n")[0])
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
        batch = data.to_device(batch, device)
    else:  # SmolVLM-256M's shapes (the config defaults)
        cfg, B, T, tiles = VLMConfig(VisionConfig(), TextConfig(), 4, 49190), args.batch or 8, 2048, 17
    layers = list(range(cfg.text.num_hidden_layers))
    if device.type == "cpu":  # no peak memory to keep apart: all objectives in this process, interleaved
        batch = make_batch(cfg, B, T, tiles, device) if batch is None else batch
        return print_table(interleaved(args, cfg, batch, layers), device, B, T, tiles, cfg, layers, args)
    if args.one is None:  # on a GPU each objective in a fresh process, so peaks do not mix
        rows = []
        for name in chosen_runs(args, batch, device):
            run = subprocess.run([sys.executable, "-m", "bench.train", *sys.argv[1:], "--one", name],
                                 capture_output=True, text=True, cwd=ROOT)
            sys.stdout.write(run.stdout.split("ROW ")[0])
            rows.append(json.loads(run.stdout.split("ROW ")[1]) if "ROW " in run.stdout else
                        [name, *[float("nan")] * 5])
            if run.returncode:
                print(f"  {name}: failed\n{run.stderr[-1500:]}")
        return print_table(rows, device, B, T, tiles, cfg, layers, args)
    batch = make_batch(cfg, B, T, tiles, device) if batch is None else batch
    name = args.one
    try:
        step, saved, model = make_step(name, cfg, batch, layers, device, args)
    except torch.OutOfMemoryError:
        print(f"  {name}: out of memory")
        print("ROW " + json.dumps([name, *[float("nan")] * 5]))
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"  {name}: {dt:.3f} s/step, peak {peak:.2f} GiB, saved for backward {saved:.2f} GiB", flush=True)
    print("ROW " + json.dumps([name, B * T / dt, dt, peak, saved, mfu(model, batch, dt, device)]))


def mfu(model, batch, dt, device):  # in %, of the model's matmuls (sft's), not the masses
    flops = model.train_flops(batch["input_ids"], batch["attention_mask"])
    return 100 * flops / dt / (peak_flops(device) or float("nan"))


def make_step(name, cfg, batch, layers, device, args, model=None):
    """-> (step() for one objective, GiB autograd kept for the backward in the warm-up step, model).
    A fresh model (seed 0) and optimizer unless one is given. The warm-up also builds the extension."""
    goal, impl, lambda_commit = RUNS[name]
    torch.manual_seed(0)
    model = model or VLM(cfg).to(device).checkpoint_activations(args.activation_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tcfg = TrainConfig(objective=goal, mass_impl=impl, lambda_commit=lambda_commit)
    counts = objective.step_counts([batch])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)

    def step(measure=False):  # measure: count what is saved for the backward
        terms = lambda: objective.loss_terms(model, batch, tcfg, layers)
        forward = lambda: objective.total_loss(terms(), counts)
        with autocast:
            loss, saved = saved_for_backward(model, forward) if measure else (forward(), None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return saved
    return step, step(measure=True) / 2**30, model


def interleaved(args, cfg, batch, layers):
    """CPU: every objective in this process on one model, one step each in turn for args.steps
    rounds (the order rotated each round), so that a busy neighbour slows all of them alike. Each
    objective's median step, and its median ratio to sft's step of the same round. -> the table's
    rows."""
    names = chosen_runs(args, batch, torch.device("cpu"))
    model = VLM(cfg).checkpoint_activations(args.activation_checkpointing)
    built = {n: make_step(n, cfg, batch, layers, torch.device("cpu"), args, model) for n in names}
    for n in names:  # two more warm-up steps each (the allocator, the thread pool)
        for _ in range(min(2, args.steps - 1)):
            built[n][0]()
    times = {n: [] for n in names}
    for r in range(args.steps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            built[n][0]()
            times[n].append(time.perf_counter() - t0)
    rows = []
    for n in names:
        dt = statistics.median(times[n])
        ratios = [t / t0 for t, t0 in zip(times[n], times[names[0]])]
        q1, ratio, q3 = statistics.quantiles(ratios, n=4) if args.steps > 1 else (ratios[0],) * 3
        print(f"  {n}: median {dt:.3f} s/step; x {names[0]} of the same round: median {ratio:.3f} "
              f"(quartiles {q1:.3f}, {q3:.3f}); saved for backward {built[n][1]:.3f} GiB", flush=True)
        rows.append([n, batch["input_ids"].numel() / dt, dt, float("nan"), built[n][1],
                     mfu(model, batch, dt, torch.device("cpu")), ratio])
    return rows


def print_table(rows, device, B, T, tiles, cfg, layers, args):
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\ntraining step, {args.shape} shape, {dev}, batch {B} x {T} tokens "
          f"({tiles * cfg.image_seq_len} image), all {len(layers)} layers"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}; "
          + (f"mean of {args.steps} steps, each objective in its own process" if device.type == "cuda" else
             f"median of {args.steps} steps, the objectives in turn in one process; x time: the median "
             "of each round's ratio to sft"))
    print("peak: the device's peak allocation (GPU only); saved: what autograd keeps for the backward")
    print(f"{'objective':20s} {'tokens/s':>10s} {'s/step':>8s} {'x time':>7s} {'peak GiB':>9s} "
          f"{'x peak':>7s} {'saved GiB':>10s} {'x saved':>8s} {'MFU %':>6s}")
    for name, tps, dt, peak, saved, mfu, *paired in rows:  # paired: the CPU's median ratio per round
        print(f"{name:20s} {tps:10.0f} {dt:8.3f} {paired[0] if paired else dt / rows[0][2]:7.3f} "
              f"{peak:9.2f} {peak / rows[0][3]:7.3f} {saved:10.3f} {saved / rows[0][4]:8.3f} {mfu:6.1f}")


if __name__ == "__main__":
    main()
