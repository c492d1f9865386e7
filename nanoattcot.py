"""
nanoattcot: the Att-CoT objective, the training loop and the command line.

    python nanoattcot.py                      # the synthetic experiment, end to end on CPU
    python nanoattcot.py --compare            # sft and attcot side by side (--compare sft,attcot,avar: any list)
    python nanoattcot.py --text-only --objective sft --out out/prior   # DRIFT's reasoning prior (no pixels)
    python nanoattcot.py --objective sft --drift-prior out/prior/model     # sft with DRIFT's gradient bias
    python nanoattcot.py train --init DIR --data train.jsonl --eval-data eval.jsonl ...
    torchrun --nproc_per_node N nanoattcot.py train ...
    python generate.py --model DIR --image PATH --prompt "What is in the image?"   # (generate.py)
    python nanoattcot.py grpo --init out/model [--reward-avar] [--reward-region]   # the RL stage (grpo.py)

DIR is a SmolVLM / Idefics3 folder as published (config.json, model.safetensors, tokenizer and
processor files), e.g. HuggingFaceTB/SmolVLM-256M-Instruct downloaded with any tool.
"""
import argparse
import contextlib
import ctypes
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

import data
import draw
import eval as eval_mod
import kernels
import related
import synthetic
from data import Processor
from checkpoint import find_checkpoint, restore, save_checkpoint
from model import VLM, CheckpointError, device_problem, pick_device


# -----------------------------------------------------------------------------
# the Att-CoT objective (this project's formulation; the paper's exact loss is not public)
#   spans: P prompt text, V image tokens, R rationale, A answer (data.py tags every token)
#   m_i(G): attention mass of query row i on key group G, mean over the chosen layers and all heads
#   L = CE(reply) + lambda_vis * mean_{i in R} -log(min(m_i(V), t) + eps) + lambda_ans * mean_{i in A} -log(m_i(R u V) + eps)
#   the floor t (--vis-target, default 0.5) stops pushing a step that already looks at the image enough:
#   without it the rationale put 95% of its attention on the image and lost the question and its own steps


def mass_inputs(spans):
    """spans (B, T) -> query rows (the R and A tokens: data.reply_rows) and key groups for
    attention_mass: rows, q_pos, row_span, key_groups (B, T) uint8 with bit 0 = V and bit 1 = R u V."""
    rows, q_pos, row_span = data.reply_rows(spans)
    key_groups = ((spans == data.V).int() | (((spans == data.V) | (spans == data.R)).int() << 1)).to(torch.uint8)
    return rows, q_pos, row_span, key_groups


def loss_terms(model, batch, cfg, layers):
    """-> dict of summed terms and their counts (so that micro-batches and ranks can be averaged
    exactly): ce_sum / n_label, vis_sum & vas_sum / r_count, ans_sum / a_count; for avar, img_sum /
    img_count and sys_sum / sys_count (related.avar_terms)."""
    avar = cfg.objective == "avar"
    need_mass = cfg.objective == "attcot" or cfg.measure_vas or avar
    mass_fn = None
    if need_mass:
        rows, q_pos, row_span, key_groups = (related.avar_inputs if avar else mass_inputs)(batch["spans"])

        def mass_fn(layer, q, k):  # q (B, Hq, T, d) -> the R/A rows only
            return kernels.attention_mass(data.take_rows(q, rows), k, q_pos, key_groups, num_groups=2, impl=cfg.mass_impl)
    out = model(batch["input_ids"], batch.get("pixel_values"), batch.get("pixel_attention_mask"),
                batch["attention_mask"], mass_layers=layers if need_mass else (), mass_fn=mass_fn)
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    terms = {"ce_sum": ce, "n_label": (labels != -100).sum()}
    if avar:
        terms.update(related.avar_terms(out.masses, layers, row_span, batch["spans"], cfg.eps))
    elif need_mass:
        m = torch.stack([out.masses[layer] for layer in layers]).mean(0).mean(1)  # (B, Nq, 2)
        in_r, in_a = row_span == data.R, row_span == data.A
        m_vis = m[..., 0] if cfg.vis_target is None else m[..., 0].clamp(max=cfg.vis_target)  # floor: push only below t
        below = (m[..., 0].detach() < (cfg.vis_target or 1.0)) & in_r  # the steps L_vis pushes
        terms.update(vis_sum=-(torch.log(m_vis + cfg.eps) * in_r).sum(), r_count=in_r.sum(),
                     ans_sum=-(torch.log(m[..., 1] + cfg.eps) * in_a).sum(), a_count=in_a.sum(),
                     vas_sum=(m[..., 0].detach() * in_r).sum(), below_count=below.sum(),
                     below_mass_sum=(m[..., 0].detach() * below).sum())
    return terms


def step_counts(batches):
    """The counts the loss terms are divided by, over all micro-batches of a step (float tensors)."""
    return {"n_label": sum((b["labels"][:, 1:] != -100).sum() for b in batches).float(),
            "r_count": sum((b["spans"] == data.R).sum() for b in batches).float(),
            "a_count": sum((b["spans"] == data.A).sum() for b in batches).float(), **related.avar_counts(batches)}


def total_loss(terms, counts, cfg):
    """The loss to backpropagate for one micro-batch, each term divided by its count over the whole
    step (all micro-batches, all ranks), so that the summed gradients equal the full-batch mean."""
    loss = terms["ce_sum"] / counts["n_label"]
    if cfg.objective == "attcot":
        loss = loss + cfg.lambda_vis * terms["vis_sum"] / counts["r_count"] + cfg.lambda_ans * terms["ans_sum"] / counts["a_count"]
    if cfg.objective == "avar":
        loss = loss + cfg.avar_img * terms["img_sum"] / counts["img_count"] + cfg.avar_sys * terms["sys_sum"] / counts["sys_count"]
    return loss


# -----------------------------------------------------------------------------
# training


class ConfigError(ValueError):
    """A flag value out of its range or choices: the command line prints the message alone."""


OBJECTIVES, MASS_IMPLS = ("sft", "attcot", "avar"), ("auto", "cuda", "reference", "sdpa")
# fine-tuning a pretrained SmolVLM (--init): nanoVLM trains its backbones at 5e-5 and a new projector much
# faster; here the connector is pretrained too, so 1e-5 for both towers, 10x that for the connector, and
# nanoVLM's 3% warmup. From scratch (the small model) every part starts at 3e-3 with 30 warmup steps.
FINETUNE_LR, FINETUNE_LR_CONNECTOR, SCRATCH_LR, SCRATCH_WARMUP = 1e-5, 1e-4, 3e-3, 30


@dataclass
class TrainConfig:
    out: str = "out"
    data: str = ""                  # train JSONL/JSON; empty: generate the synthetic set under out/data
    eval_data: str = ""             # eval JSONL; empty with the synthetic set: its eval split
    init: str = ""                  # a SmolVLM folder to fine-tune; empty: the small from-scratch config
    objective: str = "attcot"       # one of OBJECTIVES
    lambda_vis: float = 0.1
    lambda_ans: float = 0.1
    vis_target: float = 0.5         # floor t: only rationale steps with m(V) < t are pushed (None: all)
    eps: float = 1e-6
    avar_img: float = 0.15          # AVAR's weights (its released code's values)
    avar_sys: float = 0.15
    drift_prior: str = ""           # DRIFT: a checkpoint whose language model has this one's shapes
    drift_mode: str = "adaptive_cosine"  # one of related.DRIFT_MODES
    drift_alpha: float = 1.0
    drift_no_rescale: bool = False
    difficulty: str = ""            # "lo:hi": keep the records the starting model (--init) gets right at a rate in it
    difficulty_samples: int = 4
    visual_attn_scale: str = ""     # test-time intervention in the final eval: comma-separated factors f
    visual_attn_layers: str = ":"   # ... in these layers (a:b)
    text_only: bool = False         # the synthetic set's text version (the grid in words, no image): DRIFT's prior
    layers: str = "all"             # "all" or comma-separated layer indices
    mass_impl: str = "auto"         # one of MASS_IMPLS (kernels.attention_mass)
    measure_vas: bool = False       # compute masses (and log VAS) even for sft
    batch_size: int = 16             # 16 keeps the CPU demo within 8 minutes; the README experiment uses 32
    grad_accum: int = 1
    max_steps: int = 1200
    lr: float = None                # language model; None: 3e-3 from scratch, 1e-5 with --init
    lr_vision: float = None         # None: 3e-3 from scratch, 1e-5 with --init
    lr_connector: float = None      # None: 3e-3 from scratch, 1e-4 with --init
    weight_decay: float = 0.01
    warmup: int = None              # None: 30 steps from scratch, 3% of max_steps with --init
    grad_clip: float = 1.0
    max_len: int = 2048
    freeze_vision: bool = False
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory, ~1/3 more compute
    compile: bool = False
    peak_tflops: float = 0.0        # the accelerator's dense bf16 peak for MFU; 0: looked up from the GPU's name
    eval_every: int = 0             # 0: at the end only
    save_every: int = 250
    n_train: int = 20000            # synthetic set sizes (fewer train images and the small model memorises them)
    n_eval: int = 150               # eval items; each has its counterfactual twin: 300 eval records
    eval_limit: int = 0             # evaluate on at most this many records (0: all)
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    skip_nonfinite: bool = False
    strict: bool = False
    log_every: int = 10

    def __post_init__(self):
        finetune = bool(self.init)
        self.lr = (FINETUNE_LR if finetune else SCRATCH_LR) if self.lr is None else self.lr
        self.lr_vision = (FINETUNE_LR if finetune else SCRATCH_LR) if self.lr_vision is None else self.lr_vision
        self.lr_connector = (FINETUNE_LR_CONNECTOR if finetune else SCRATCH_LR) if self.lr_connector is None else self.lr_connector
        self.warmup = (max(1, round(0.03 * self.max_steps)) if finetune else SCRATCH_WARMUP) if self.warmup is None else self.warmup
        layers_ok = self.layers == "all" or all(x.strip().isdigit() for x in self.layers.split(","))
        band, scales = numbers(self.difficulty, ":"), numbers(self.visual_attn_scale, ",")
        band_ok = band == [] or (band is not None and len(band) == 2 and 0 <= band[0] <= band[1] <= 1)
        scales_ok = scales is not None and all(f > 0 for f in scales)
        checks = [("objective", self.objective in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}"),
                  ("drift_mode", self.drift_mode in related.DRIFT_MODES, f"one of {', '.join(related.DRIFT_MODES)}"),
                  ("drift_prior", not self.drift_prior or os.path.isdir(self.drift_prior), "an existing checkpoint folder"),
                  ("difficulty", band_ok, "lo:hi with 0 <= lo <= hi <= 1"),
                  ("difficulty", not self.difficulty or bool(self.init), "given with --init (the model whose success it measures)"),
                  ("difficulty_samples", self.difficulty_samples >= 1, ">= 1"),
                  ("visual_attn_scale", scales_ok, "comma-separated factors > 0"),
                  ("mass_impl", self.mass_impl in MASS_IMPLS, f"one of {', '.join(MASS_IMPLS)}"),
                  ("vis_target", self.vis_target is None or 0 < self.vis_target <= 1, "in (0, 1] or none"),
                  ("layers", layers_ok, '"all" or comma-separated layer indices'),
                  ("eps", self.eps > 0, "> 0"), ("grad_clip", self.grad_clip > 0, "> 0"),
                  *[(k, getattr(self, k) > 0, "> 0") for k in ("lr", "lr_vision", "lr_connector")],
                  *[(k, getattr(self, k) >= 1, ">= 1") for k in ("batch_size", "grad_accum", "max_len", "log_every",
                                                                   "n_train", "n_eval")],
                  *[(k, getattr(self, k) >= 0, ">= 0") for k in ("lambda_vis", "lambda_ans", "avar_img", "avar_sys",
                                                                   "drift_alpha", "weight_decay", "warmup",
                                                                   "max_steps", "save_every", "eval_every", "eval_limit",
                                                                   "peak_tflops")]]
        checks.append(("eval_data", bool(self.eval_data or not self.data), "given with --data (every run ends in an evaluation)"))
        checks.append(("init", not self.init or os.path.isdir(self.init), "an existing checkpoint folder"))
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: must be {want}")
        if device_problem(self.device):
            raise ConfigError(device_problem(self.device))
        if self.mass_impl == "cuda" and pick_device(self.device).type != "cuda":
            raise ConfigError("--mass-impl cuda: the kernel runs on a CUDA device, and this run's is "
                              f"{pick_device(self.device)}")


def numbers(text, sep):  # "0.2:0.8" -> [0.2, 0.8]; "" -> []; None if a part is not a number
    try:
        return [float(x) for x in text.split(sep)] if text else []
    except ValueError:
        return None


def peak_flops(device, tflops=0.0):
    """Dense bf16 tensor-core peak FLOP/s of the GPU (the MFU denominator); None on CPU or if unknown."""
    if tflops or device.type != "cuda":
        return tflops * 1e12 or None
    name = torch.cuda.get_device_name(device)
    table = (("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362), ("L4", 121))
    return next((t * 1e12 for key, t in table if key in name), None)


def lr_at(step, cfg):  # linear warmup, cosine to 10%
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.max_steps - cfg.warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def batches_for_step(examples, pad_id, step, cfg, rank=0, world=1):
    """The micro-batches of one optimizer step for this rank: a fixed permutation per epoch (seeded),
    so a resumed run sees exactly the batches an uninterrupted one would."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    out = []
    for micro in range(cfg.grad_accum):
        idx = []
        for j in range(cfg.batch_size):
            i = step * per_step + (micro * world + rank) * cfg.batch_size + j
            epoch, pos = divmod(i, len(examples))
            idx.append(epoch_order(cfg.seed, epoch, len(examples))[pos])
        out.append(data.collate([examples[i] for i in idx], pad_id))
    return out


def keep_freed_memory():
    """glibc hands freed blocks over 128 KB back to the OS, and every CPU step then page-faults its
    activations in again; keeping up to 1 GB of them makes a CPU step ~7% faster (measured here)."""
    with contextlib.suppress(OSError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 25)  # M_MMAP_THRESHOLD: 32 MB, glibc's largest
        ctypes.CDLL("libc.so.6").mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def train(cfg: TrainConfig):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

    # data
    train_path, eval_path = cfg.data, cfg.eval_data
    if not train_path:
        data_dir = os.path.join(cfg.out, "data")
        if rank == 0:
            synthetic.make_once(data_dir, cfg.n_train, cfg.n_eval, seed=cfg.seed)
        if world > 1:
            torch.distributed.barrier()
        train_path, synthetic_eval = synthetic.paths(data_dir, cfg.text_only)
        eval_path = eval_path or synthetic_eval
    skips = data.Skips(cfg.strict)
    train_records = data.read_records(train_path, skips)
    eval_records = read_eval_records(eval_path, cfg, log)  # bad eval data fails now, not after training
    ckpt = os.path.join(cfg.out, "checkpoint")
    resuming = cfg.resume and find_checkpoint(ckpt)
    if cfg.resume and not resuming:
        log(f"--resume: no checkpoint in {ckpt}; starting at step 0")
    drift = None
    if not resuming or cfg.drift_prior or cfg.difficulty:  # the starting model (DRIFT's Delta and the filter need it)
        if cfg.init:
            proc, model = Processor.from_pretrained(cfg.init), VLM.from_pretrained(cfg.init, dtype=torch.float32)
        else:  # with a DRIFT prior, its tokenizer: the same token ids (and, with the same seed, the same initial weights)
            texts = [r["question"] + " " + r["reply"] for r in train_records]
            proc = Processor.from_pretrained(cfg.drift_prior) if cfg.drift_prior else \
                data.new_processor(texts, tile=96, image_seq_len=9, vocab_size=600)
            model = VLM(synthetic.small_config(proc.tokenizer.get_vocab_size(), proc.image_token_id))
        drift, train_records = related.setup(cfg, model.to(device), proc, train_records, train_path, log)
    if resuming:
        proc, model = Processor.from_pretrained(ckpt), VLM.from_pretrained(ckpt, dtype=torch.float32)
    model.to(device).checkpoint_activations(cfg.activation_checkpointing)
    examples = data.encode_all(proc, train_records, cfg.max_len, skips)
    if not examples:
        raise data.DataError(f"{train_path}: no usable training record ({skips})")
    skipped = skips.total()
    log(f"data: {len(examples)} training records from {train_path}; {skips}")
    n_layers = model.config.text.num_hidden_layers
    layers = list(range(n_layers)) if cfg.layers == "all" else [int(x) for x in cfg.layers.split(",")]
    if not all(0 <= i < n_layers for i in layers):
        raise ConfigError(f"--layers {cfg.layers}: the model has {n_layers} layers (0 to {n_layers - 1})")
    try:  # the final eval's intervention slice fails now, not after training (f = 1 changes nothing)
        model.boost_image_attention(1.0, cfg.visual_attn_layers)
    except ValueError as e:
        raise ConfigError(f"--visual-attn-layers {cfg.visual_attn_layers}: {e}") from None

    # optimizer: separate learning rates for the vision tower, the connector and the language model
    if cfg.freeze_vision:
        model.vision.requires_grad_(False)
    groups = {"vision": [], "connector": [], "language": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["vision" if name.startswith("vision.") else "connector" if name.startswith("connector.") else "language"].append(p)
    base_lr = {"vision": cfg.lr_vision, "connector": cfg.lr_connector, "language": cfg.lr}
    opt = torch.optim.AdamW([{"params": ps, "lr": base_lr[k], "name": k} for k, ps in groups.items() if ps],
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    step, metrics = 0, []
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if resuming:
        step, metrics = restore(ckpt, opt, metrics_path, rewrite=rank == 0)
        log(f"resumed from {ckpt} at step {step}")
    ddp = net = model
    if world > 1:
        ddp = net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(ddp)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    t0, tokens, flops, nonfinite, first_step = time.time(), 0, 0.0, 0, step  # the ETA counts the steps run here
    peak = peak_flops(device, cfg.peak_tflops)
    try:
        while step < cfg.max_steps:
            micro = [{k: v.to(device) for k, v in b.items()} for b in batches_for_step(examples, proc.pad_token_id, step, cfg, rank, world)]
            counts = step_counts(micro)
            if world > 1:
                for v in counts.values():
                    torch.distributed.all_reduce(v)
                counts = {k: v / world for k, v in counts.items()}  # DDP averages gradients over ranks
            counts = {k: v.clamp(min=1) for k, v in counts.items()}
            for g in opt.param_groups:
                g["lr"] = base_lr[g["name"]] * lr_at(step, cfg)
            logged = {}
            for i, b in enumerate(micro):
                sync = contextlib.nullcontext() if world == 1 or i == len(micro) - 1 else ddp.no_sync()
                with sync, autocast:
                    terms = loss_terms(net, b, cfg, layers)
                    loss = total_loss(terms, counts, cfg)
                    loss.backward()
                for k, v in terms.items():
                    logged[k] = logged.get(k, 0.0) + float(v.detach())
                tokens += int(b["attention_mask"].sum())
                flops += model.train_flops(b["input_ids"], b["attention_mask"]) if peak else 0.0
            keys = sorted(logged)
            sums = torch.tensor([logged[k] for k in keys], dtype=torch.float64)
            if world > 1:  # the logged terms are means over the whole global batch
                torch.distributed.all_reduce(sums)
            logged = dict(zip(keys, sums.tolist()))
            n = {k: float(v) * world for k, v in counts.items()}  # global counts
            row = {"step": step + 1, "ce": logged["ce_sum"] / n["n_label"], "lr": opt.param_groups[0]["lr"]}
            if "vis_sum" in logged:
                row.update(vis=logged["vis_sum"] / n["r_count"], ans=logged["ans_sum"] / n["a_count"],
                           vas=logged["vas_sum"] / n["r_count"])
                if cfg.vis_target is not None:  # under the floor L_vis sits at -log t; these say what it pushes
                    row.update(below=logged["below_count"] / n["r_count"],
                               below_vas=logged["below_mass_sum"] / max(logged["below_count"], 1.0))
            if "img_sum" in logged:
                row.update(img=logged["img_sum"] / n["img_count"], sys=logged["sys_sum"] / n["sys_count"])
            row["loss"] = loss_value = float(total_loss(logged, n, cfg))  # the global-batch loss
            if not math.isfinite(loss_value):
                if not cfg.skip_nonfinite:
                    raise FloatingPointError(f"step {step}: loss is {loss_value}; stopping "
                                             "(--skip-nonfinite skips such steps instead)")
                nonfinite += 1
                opt.zero_grad(set_to_none=True)
                step += 1
                continue
            if drift:  # after the gradients are summed over micro-batches and ranks, before clipping
                row["drift_ratio"] = drift.apply(model)  # |alpha bias| / |task gradient|
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            metrics.append(row)
            if rank == 0:
                with open(metrics_path, "a" if metrics[:-1] else "w") as f:
                    f.write(json.dumps(row) + "\n")
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    dt = time.time() - t0
                    shown = ("vis", "ans", "vas", "below", "below_vas", "img", "sys", "drift_ratio")
                    extra = "".join(f" {k} {row[k]:.3f}" for k in shown if k in row)
                    mfu = f" | MFU {100 * flops / dt / peak:.1f}%" if peak else ""
                    log(f"step {step:5d}/{cfg.max_steps} loss {row['loss']:.4f} ce {row['ce']:.4f}{extra} "
                        f"| {tokens / dt:,.0f} tok/s{mfu} | ETA {dt / (step - first_step) * (cfg.max_steps - step):.0f}s")
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                    save_checkpoint(ckpt, model, proc, opt, step, len(metrics), cfg)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps and rank == 0:
                ev = run_eval(model, proc, cfg, eval_records, train_records, layers)
                log(f"eval at step {step}: " + ", ".join(f"{k} {ev[k]:.3f}" for k in ("accuracy_cot", "accuracy_direct",
                    "counterfactual_consistency", "vas_rationale") if ev.get(k) is not None))
    except KeyboardInterrupt:
        if rank == 0:
            save_checkpoint(ckpt, model, proc, opt, step, len(metrics), cfg)
            log(f"interrupted: saved {ckpt} at step {step}; --resume continues")
        raise SystemExit(130)
    if rank == 0:
        save_checkpoint(ckpt, model, proc, opt, step, len(metrics), cfg)
        model.save_pretrained(os.path.join(cfg.out, "model"))
        proc.save_pretrained(os.path.join(cfg.out, "model"))
        if metrics:
            draw.curves(metrics, os.path.join(cfg.out, "curves.png"))
    if world > 1:
        torch.distributed.destroy_process_group()
    return {"model": model, "proc": proc, "metrics": metrics, "nonfinite_skipped": nonfinite,
            "records_skipped": skipped, "eval_records": eval_records, "train_records": train_records, "layers": layers}


def read_eval_records(path, cfg, log=print):
    """The evaluation records (skipped and counted like training ones); none usable is an error."""
    skips = data.Skips(cfg.strict)
    records = data.read_records(path, skips)
    if skips:
        log(f"eval data: {len(records)} records from {path}; {skips}")
    if not records:
        raise data.DataError(f"{path}: no usable evaluation record ({skips})")
    return records[:cfg.eval_limit] if cfg.eval_limit else records


def run_eval(model, proc, cfg, records, train_records, layers):
    result = eval_mod.evaluate(model, proc, records, train_records, layers=layers, log=print)
    model.train()
    return result


def run(cfg, compare=()):
    """Train, evaluate, print the table, write summary.json and the report. compare: objectives to
    run one after the other on the same data, side by side. With --visual-attn-scale each model is
    also evaluated under the test-time intervention (a row per factor)."""
    objectives = list(compare) or [cfg.objective]
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad:
        raise ConfigError(f"--compare {','.join(objectives)}: {bad[0]!r} is not one of {', '.join(OBJECTIVES)}")
    if compare and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("--compare runs on one process: under torchrun, train each objective with --objective")
    if compare and not cfg.data and int(os.environ.get("RANK", 0)) == 0:  # one synthetic set for both
        synthetic.make_synthetic(os.path.join(cfg.out, "data"), cfg.n_train, cfg.n_eval, cfg.seed)
        train_path, eval_path = synthetic.paths(os.path.join(cfg.out, "data"), cfg.text_only)
        cfg = TrainConfig(**{**asdict(cfg), "data": train_path, "eval_data": eval_path})
    summaries = {}
    for objective in objectives:
        c = TrainConfig(**{**asdict(cfg), "objective": objective,
                           "out": os.path.join(cfg.out, objective) if compare else cfg.out})
        t0 = time.time()
        result = train(c)
        if int(os.environ.get("RANK", 0)) != 0:
            continue
        ev = run_eval(result["model"], result["proc"], c, result["eval_records"], result["train_records"], result["layers"])
        summary = {"objective": objective, **{k: v for k, v in ev.items() if k != "examples"},
                   "final_loss": result["metrics"][-1]["loss"] if result["metrics"] else None,
                   "records_skipped": result["records_skipped"], "nonfinite_skipped": result["nonfinite_skipped"],
                   "wall_seconds": round(time.time() - t0, 1), "examples": ev["examples"], "config": asdict(c)}
        with open(os.path.join(c.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        summaries[objective] = summary
        for f in numbers(cfg.visual_attn_scale, ","):  # the slice was checked before training
            result["model"].boost_image_attention(f, cfg.visual_attn_layers)
            ev = run_eval(result["model"], result["proc"], c, result["eval_records"], result["train_records"], result["layers"])
            summaries[f"{objective} img x{f:g}"] = {**ev, "objective": objective}
            result["model"].boost_image_attention(1.0)
    if summaries:
        print("\n" + eval_mod.table(summaries))
        curves = [(f"Training curves ({o})", os.path.join(o, "curves.png") if compare else "curves.png") for o in objectives]
        meta = {"objectives": ", ".join(summaries), "data": cfg.data or "the synthetic set", "seed": cfg.seed,
                "steps": cfg.max_steps, "n": next(iter(summaries.values()))["n"]}
        if cfg.visual_attn_scale:
            meta["intervention"] = f"image keys' attention times f in layers {cfg.visual_attn_layers} (rows 'img x f')"
        report = eval_mod.write_report({o: {k: v for k, v in s.items() if k != "config"} for o, s in summaries.items()},
                                       cfg.out, meta, curves)
        print(f"(eval n = {meta['n']}; report: {report}; outputs under {cfg.out})")
    return summaries


HELP = {"n_train": "synthetic training records (default %(default)s)",
        "n_eval": "synthetic eval ITEMS: each comes with its counterfactual twin, so the eval has twice as many "
                  "records (default %(default)s: 300 records)",
        "eval_limit": "evaluate on at most this many records, twins counted (0: all)"}


def add_config_args(p):
    choices = {"objective": OBJECTIVES, "mass_impl": MASS_IMPLS}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action="store_true", default=f.default)
        else:
            kind = (lambda s: None if s.lower() == "none" else float(s)) if f.name == "vis_target" else f.type
            p.add_argument(flag, type=kind, default=f.default, choices=choices.get(f.name), help=HELP.get(f.name))


# the errors a user can cause (a bad file, flag or checkpoint): one line, no traceback; anything else is a bug
USER_ERRORS = (ConfigError, data.DataError, CheckpointError, FileNotFoundError, FloatingPointError)


def main(argv=None):
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")


def _main(argv):
    if argv[:1] == ["grpo"]:  # the RL stage, in its own file (it uses this one's checkpoints)
        import grpo
        return grpo.main(argv[1:])
    p = argparse.ArgumentParser(description="Att-CoT training. With no arguments: the synthetic experiment end to "
                                "end on CPU (data, tokenizer, small model, training, evaluation, summary.json).")
    add_config_args(p)
    p.add_argument("--compare", nargs="?", const="sft,attcot", default="",
                   help="objectives to run side by side, comma-separated (alone: sft,attcot)")
    args = vars(p.parse_args(argv[1:] if argv[:1] == ["train"] else argv))
    compare = [o for o in args.pop("compare").split(",") if o]
    run(TrainConfig(**args), compare)


if __name__ == "__main__":
    main()
