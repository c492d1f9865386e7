"""
The trainer: one plain loop (nanoGPT's), from the data and the starting model to a checkpointed,
evaluated run. The objectives it backpropagates are in objective.py, the run's settings (every flag,
its default and its check) in train_config.py.

    python nanoattcot.py train --init DIR --data train.jsonl --eval-data eval.jsonl [--lora 16] ...
    torchrun --nproc_per_node N nanoattcot.py train ...

    train(cfg)               one run -> its model, processor and metrics
    run(cfg, compare)        each objective trained, evaluated, one table and report

DIR is a SmolVLM / Idefics3 folder as published (config.json, model.safetensors, tokenizer and
processor files), e.g. HuggingFaceTB/SmolVLM-256M-Instruct downloaded with any tool.
"""
import contextlib
import ctypes
import json
import math
import os
import random
import time
from dataclasses import asdict

import torch

import config
import data
import eval as eval_mod
import lora
import objective
from analysis import draw, report
from checkpoint import find_checkpoint, restore, run_steps
from config import ConfigError
from data import Processor
from device import peak_flops, pick_device
from methods import commit, difficulty
from methods.drift import Drift
from model import VLM, small_config
from records import read_records
from setting import synthetic
from train_config import OBJECTIVES, TrainConfig, numbers


# -----------------------------------------------------------------------------
# training, in the order a run does it


def start_processes(cfg):
    """-> rank, world size and this process's device; under torchrun, the process group joined."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return rank, world, device


def keep_freed_memory():
    """glibc hands freed blocks over 128 KB back to the OS, and every CPU step then page-faults its
    activations in again; keeping up to 1 GB of them makes a CPU step ~7% faster (measured here)."""
    with contextlib.suppress(OSError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 25)  # M_MMAP_THRESHOLD: 32 MB, glibc's largest
        ctypes.CDLL("libc.so.6").mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def synthetic_dir(cfg):  # one folder per family, so that a run of one never reads the other's
    return os.path.join(cfg.out, "data" if cfg.family == "grid" else f"data_{cfg.family}")


def load_data(cfg, rank, world, log):
    """-> the training file, its records, the eval records and the Skips that count bad records. No
    --data: the synthetic set, made once by rank 0 in OUT/data. Bad eval data fails now, not after
    training."""
    train_path, eval_path = cfg.data, cfg.eval_data
    if not train_path:
        data_dir = synthetic_dir(cfg)
        if rank == 0:
            synthetic.make_once(data_dir, cfg.n_train, cfg.n_eval, seed=cfg.seed, family=cfg.family)
        if world > 1:
            torch.distributed.barrier()
        train_path, synthetic_eval = synthetic.paths(data_dir, cfg.text_only)
        eval_path = eval_path or synthetic_eval
    skips = data.Skips(cfg.strict)
    train_records = read_records(train_path, skips)
    return train_path, train_records, read_eval_records(eval_path, cfg, log), skips


def build_model(cfg, device, train_records, train_path, resume_from, log):
    """-> processor, model (on device), DRIFT's bias (None without --drift-prior) and the training
    records the difficulty filter keeps. The starting model is --init, or the small config from
    scratch with a tokenizer trained on the records (with a DRIFT prior, the prior's tokenizer: the
    same token ids). DRIFT's Delta and the filter measure the starting model, so it is built even on
    --resume (resume_from: the checkpoint folder), whose weights then replace it."""
    drift = None
    if not resume_from or cfg.drift_prior or cfg.difficulty:
        if cfg.init:
            proc = Processor.from_pretrained(cfg.init)
            model = lora.load(cfg.init, cfg.adapter, dtype=torch.float32)
        else:  # with the same seed, the same initial weights as the prior's run
            texts = [r["question"] + " " + r["reply"] for r in train_records]
            proc = Processor.from_pretrained(cfg.drift_prior) if cfg.drift_prior else \
                data.new_processor(texts, tile=96, image_seq_len=9, vocab_size=600)
            model = VLM(small_config(proc.tokenizer.get_vocab_size(), proc.image_token_id))
        drift, train_records = methods_on_the_start(cfg, model.to(device), proc, train_records, train_path,
                                                    log)
    if resume_from:
        proc = Processor.from_pretrained(resume_from)
        model = VLM.from_pretrained(resume_from, dtype=torch.float32)
        if os.path.exists(os.path.join(resume_from, lora.CONFIG)):  # the adapters as they were saved
            lora.load_adapter(model, resume_from, trainable=True)
    elif cfg.lora:  # fresh adapters; everything else frozen
        lora.add_lora(model, cfg.lora, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets.split(","))
    return proc, model.to(device).checkpoint_activations(cfg.activation_checkpointing), drift, train_records


def methods_on_the_start(cfg, model, proc, records, train_path, log=print):
    """What two related methods measure on the run's starting model: DRIFT's Delta (None without
    --drift-prior) and the training records the difficulty filter keeps (all without --difficulty)."""
    drift = Drift(model, cfg.drift_prior, cfg.drift_mode, cfg.drift_alpha, not cfg.drift_no_rescale, log) \
        if cfg.drift_prior else None
    if cfg.difficulty:
        lo, hi = (float(x) for x in cfg.difficulty.split(":"))
        records = difficulty.difficulty_filter(model, proc, records, (lo, hi), cfg.difficulty_samples,
                                               os.path.dirname(os.path.abspath(train_path)), seed=cfg.seed,
                                               log=log)
        model.train()
        if not records:
            raise data.DataError(f"--difficulty {cfg.difficulty}: no training record has a success rate in "
                                 "that band")
    return drift, records


def make_optimizer(model, cfg):
    """AdamW with a learning rate each for the vision tower, the connector and the language model
    -> the optimizer and those base rates (lr_at scales them each step)."""
    if cfg.freeze_vision:
        model.vision.requires_grad_(False)
    groups = {"vision": [], "connector": [], "language": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = "vision" if name.startswith("vision.") else "connector" if name.startswith("connector.") \
                else "language"
            groups[part].append(p)
    base_lr = {"vision": cfg.lr_vision, "connector": cfg.lr_connector, "language": cfg.lr}
    opt = torch.optim.AdamW([{"params": ps, "lr": base_lr[k], "name": k} for k, ps in groups.items() if ps],
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    return opt, base_lr


def lr_at(step, cfg):  # linear warmup, cosine to 10%
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.max_steps - cfg.warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def batches_for_step(examples, pad_id, step, cfg, rank=0, world=1, commit_ids=((), None)):
    """The micro-batches of one optimizer step for this rank, in a fixed order per epoch
    (data.record_at), so a resumed run sees exactly the batches an uninterrupted one would; with the
    early-commitment term each carries its early-cut copies ("commit"), drawn from the step's seed;
    commit_ids: the answer marker's tokens and the answers' first tokens (methods/commit.py)."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    out = []
    for micro in range(cfg.grad_accum):
        first = step * per_step + (micro * world + rank) * cfg.batch_size
        idx = [data.record_at(cfg.seed, first + j, len(examples)) for j in range(cfg.batch_size)]
        out.append(data.collate([examples[i] for i in idx], pad_id))
        if cfg.lambda_commit:
            cuts = torch.Generator().manual_seed(cfg.seed * 1_000_003 + first)
            marker_ids, answer_set = commit_ids
            out[-1]["commit"] = commit.commit_batch(out[-1], marker_ids, cfg.commit_share, cuts, pad_id,
                                                    answer_set)
    return out


def train_step(micro, step, *, model, net, opt, base_lr, cfg, layers, world=1, ddp=None, drift=None,
               autocast=contextlib.nullcontext()):
    """One optimizer step over its micro-batches -> the logged row (metrics_row), or None for a step
    whose loss is not finite and that --skip-nonfinite skips. model: the module (its parameters);
    net: the model as called (compiled, DDP-wrapped, or the model); ddp: the DDP wrapper under
    torchrun, whose gradient all-reduce waits for the last micro-batch."""
    counts = objective.step_counts(micro)
    if world > 1:
        for v in counts.values():
            torch.distributed.all_reduce(v)
        counts = {k: v / world for k, v in counts.items()}  # DDP averages gradients over ranks
    counts = {k: v.clamp(min=1) for k, v in counts.items()}
    for g in opt.param_groups:
        g["lr"] = base_lr[g["name"]] * lr_at(step, cfg)
    summed, table = {}, {}
    for i, b in enumerate(micro):
        sync = contextlib.nullcontext() if ddp is None or i == len(micro) - 1 else ddp.no_sync()
        with sync, autocast:
            terms = objective.loss_terms(net, b, cfg, layers)
            objective.total_loss(terms, counts).backward()
        for k, term in terms.items():
            summed[k] = summed.get(k, 0.0) + float(term.sum.detach())
            table[k] = term
    row = metrics_row(summed, table, counts, world, step, opt.param_groups[0]["lr"])
    if not math.isfinite(row["loss"]):
        if not cfg.skip_nonfinite:
            raise FloatingPointError(f"step {step}: loss is {row['loss']}; stopping "
                                     "(--skip-nonfinite skips such steps instead)")
        opt.zero_grad(set_to_none=True)
        return None
    if drift:  # after the gradients are summed over micro-batches and ranks, before clipping
        row["drift_ratio"] = drift.apply(model)  # |alpha bias| / |task gradient|
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return row


def metrics_row(summed, table, counts, world, step, lr):
    """This rank's summed terms of one step -> the logged row: each term's mean over the global batch
    (objective.means), then the global-batch loss. table: the step's terms (their counts and weights)."""
    keys = sorted(summed)
    sums = torch.tensor([summed[k] for k in keys], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(sums)
    s = dict(zip(keys, sums.tolist()))
    n = {k: float(v) * world for k, v in counts.items()}  # global counts
    mean = objective.means(s, table, n)
    sums_as_terms = {k: objective.Term(s[k], t.count, t.weight) for k, t in table.items()}
    return {"step": step + 1, "ce": mean.pop("ce"), "lr": lr, **mean,
            "loss": float(objective.total_loss(sums_as_terms, n))}


def progress_line(row, cfg, done, seconds, tokens, flops, peak):
    """The line printed every --log-every steps: the row's every term; done: the steps this process
    has run (for the ETA)."""
    extra = "".join(f" {k} {v:.3f}" for k, v in row.items() if k not in ("step", "ce", "lr", "loss"))
    mfu = f" | MFU {100 * flops / seconds / peak:.1f}%" if peak else ""
    return (f"step {row['step']:5d}/{cfg.max_steps} loss {row['loss']:.4f} ce {row['ce']:.4f}{extra} "
            f"| {tokens / seconds:,.0f} tok/s{mfu} | ETA "
            f"{seconds / done * (cfg.max_steps - row['step']):.0f}s")


def train(cfg: TrainConfig):
    rank, world, device = start_processes(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    train_path, train_records, eval_records, skips = load_data(cfg, rank, world, log)
    ckpt = os.path.join(cfg.out, "checkpoint")
    resume_from = ckpt if cfg.resume and find_checkpoint(ckpt) else None
    if cfg.resume and not resume_from:
        log(f"--resume: no checkpoint in {ckpt}; starting at step 0")
    proc, model, drift, train_records = build_model(cfg, device, train_records, train_path, resume_from, log)
    examples = data.encode_all(proc, train_records, cfg.max_len, skips)
    if not examples:
        raise data.DataError(f"{train_path}: no usable training record ({skips})")
    log(f"data: {len(examples)} training records from {train_path}; {skips}")
    layers = config.layer_set(cfg.layers, len(model.layers), "--layers")
    # now, not after training
    config.layer_set(cfg.visual_attn_layers, len(model.layers), "--visual-attn-layers")
    opt, base_lr = make_optimizer(model, cfg)
    step, metrics = 0, []
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if resume_from:
        step, metrics = restore(ckpt, opt, metrics_path, rewrite=rank == 0, cfg=cfg)
        log(f"resumed from {ckpt} at step {step}")
    ddp, net = None, model  # the DDP wrapper under torchrun; the model as called
    if world > 1:
        ddp = net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else contextlib.nullcontext()
    # the ETA counts steps run here
    peak, t0, first_step = peak_flops(device, cfg.peak_tflops), time.time(), step
    seen = {"tokens": 0, "flops": 0.0, "nonfinite": 0}
    # where the commit term forces the answer, and what it normalises the answer among (only if it is on)
    commit_ids = ((proc.tokenizer.encode(" Answer:").ids, commit.answer_tokens(proc.tokenizer, train_records))
                  if cfg.lambda_commit else ((), None))

    def one_step(step):
        micro = [data.to_device(b, device)
                 for b in batches_for_step(examples, proc.pad_token_id, step, cfg, rank, world, commit_ids)]
        row = train_step(micro, step, model=model, net=net, opt=opt, base_lr=base_lr, cfg=cfg, layers=layers,
                         world=world, ddp=ddp, drift=drift, autocast=autocast)
        seen["tokens"] += sum(int(b["attention_mask"].sum()) for b in micro)
        seen["flops"] += sum(model.train_flops(b["input_ids"], b["attention_mask"])
                             for b in micro) if peak else 0.0
        if row is None:
            seen["nonfinite"] += 1
            return step + 1
        if rank == 0:
            with open(metrics_path, "a" if metrics else "w") as f:
                f.write(json.dumps(row) + "\n")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
                log(progress_line(row, cfg, step + 1 - first_step, time.time() - t0, seen["tokens"],
                                  seen["flops"], peak))
        metrics.append(row)
        return step + 1

    def periodic_eval(step):
        if rank == 0 and cfg.eval_every and step % cfg.eval_every == 0:
            ev = run_eval(model, proc, cfg, eval_records, train_records, layers)
            shown = ("accuracy_cot", "accuracy_direct", "counterfactual_consistency", "vas_rationale")
            log(f"eval at step {step}: " + ", ".join(
                f"{k} {ev[k]:.3f}" for k in shown if ev.get(k) is not None))

    run_steps(one_step, step, metrics, cfg, model, proc, opt, writes=rank == 0, log=log, after=periodic_eval)
    if rank == 0 and metrics:
        draw.curves(metrics, os.path.join(cfg.out, "curves.png"))
    if world > 1:
        torch.distributed.destroy_process_group()
    return {"model": model, "proc": proc, "metrics": metrics, "nonfinite_skipped": seen["nonfinite"],
            "records_skipped": skips.total(), "eval_records": eval_records, "train_records": train_records,
            "layers": layers}


def read_eval_records(path, cfg, log=print):
    """The evaluation records (skipped and counted like training ones); none usable is an error."""
    skips = data.Skips(cfg.strict)
    records = read_records(path, skips)
    if skips:
        log(f"eval data: {len(records)} records from {path}; {skips}")
    if not records:
        raise data.DataError(f"{path}: no usable evaluation record ({skips})")
    return records[:cfg.eval_limit] if cfg.eval_limit else records


def run_eval(model, proc, cfg, records, train_records, layers):
    result = eval_mod.evaluate(model, proc, records, train_records, layers=layers, cot=cfg.prompt, log=print)
    model.train()
    return result


def run(cfg, compare=(), before=None):
    """Train, evaluate, print the table, write summary.json and the report. compare: objectives to
    run one after the other on the same data, side by side, each in OUT/objective (so with before:
    rows measured earlier, the base's, shown first). With --visual-attn-scale each model is also
    evaluated under the test-time intervention (a row per factor)."""
    objectives = list(compare) or [cfg.objective]
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad:
        raise ConfigError(f"--compare {','.join(objectives)}: {bad[0]!r} is not one of "
                          f"{', '.join(OBJECTIVES)}")
    if compare and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("--compare runs on one process: under torchrun, train each objective with "
                          "--objective")
    if compare and not cfg.data and int(os.environ.get("RANK", 0)) == 0:  # one synthetic set for both
        synthetic.make_once(synthetic_dir(cfg), cfg.n_train, cfg.n_eval, cfg.seed, family=cfg.family)
        train_path, eval_path = synthetic.paths(synthetic_dir(cfg), cfg.text_only)
        cfg = TrainConfig(**{**asdict(cfg), "data": train_path, "eval_data": eval_path})
    summaries, nest = {}, bool(compare or before)
    for name in objectives:
        c = TrainConfig(**{**asdict(cfg), "objective": name,
                           "out": os.path.join(cfg.out, name) if nest else cfg.out})
        t0 = time.time()
        result = train(c)
        if int(os.environ.get("RANK", 0)) != 0:
            continue
        ev = run_eval(result["model"], result["proc"], c, result["eval_records"], result["train_records"],
                      result["layers"])
        summary = {"objective": name, **{k: v for k, v in ev.items() if k != "examples"},
                   "final_loss": result["metrics"][-1]["loss"] if result["metrics"] else None,
                   "records_skipped": result["records_skipped"],
                   "nonfinite_skipped": result["nonfinite_skipped"],
                   "wall_seconds": round(time.time() - t0, 1), "examples": ev["examples"],
                   "config": asdict(c)}
        with open(os.path.join(c.out, "summary.json"), "w") as f:  # the explorer's weights: report.json
            json.dump({k: v for k, v in summary.items() if k != "explore"}, f, indent=2)
        summaries[name] = summary
        # checked in train
        boost_layers = config.layer_set(cfg.visual_attn_layers, len(result["model"].layers))
        for f in numbers(cfg.visual_attn_scale, ","):
            result["model"].boost_image_attention(f, boost_layers)
            ev = run_eval(result["model"], result["proc"], c, result["eval_records"],
                          result["train_records"], result["layers"])
            summaries[f"{name} img x{f:g}"] = {**ev, "objective": name}
            result["model"].boost_image_attention(1.0)
    if summaries:
        summaries = {**(before or {}), **summaries}
        print("\n" + report.table(summaries))
        curves = [(f"Training curves ({o})", os.path.join(o, "curves.png") if nest else "curves.png")
                  for o in objectives]
        meta = {"objectives": ", ".join(summaries), "data": cfg.data or "the synthetic set",
                "start": cfg.init or "random weights", "CoT prompt": cfg.prompt, "seed": cfg.seed,
                "steps": cfg.max_steps, "n": next(iter(summaries.values()))["n"]}
        if cfg.visual_attn_scale:
            meta["intervention"] = (f"image keys' attention times f in layers {cfg.visual_attn_layers} "
                                    "(rows 'img x f')")
        shown = {o: {k: v for k, v in s.items() if k != "config"} for o, s in summaries.items()}
        report_md = report.write_report(shown, cfg.out, meta, curves)
        print(f"(eval n = {meta['n']}; report: {report_md}; outputs under {cfg.out})")
    return summaries
