"""
Checkpoints: written whole and swapped in atomically, found again after a kill, restored for
--resume; and the step loop that saves them (run_steps). SFT and GRPO share all of it.
"""
import copy
import json
import os
import random
import shutil
from dataclasses import asdict

import torch

import lora
from model import CheckpointError


def save_checkpoint(path, model, proc, opt, step, metrics_len, cfg):
    """HF-format model + processor + trainer state (tensors and plain values only: it loads with
    weights_only), written whole in path.tmp, then swapped in by two renames. A process killed at any
    point leaves a whole checkpoint at path, or at path.old between the renames (find_checkpoint)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)  # a kill during the last save's clean-up leaves it
    model.save_pretrained(tmp, without_adapters=True)
    if lora.adapted(model):  # beside the (frozen) weights, in PEFT's format: --resume reads them back
        lora.save_adapter(model, tmp)
    proc.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "metrics_len": metrics_len,
                "config": asdict(cfg),
                "rng": {"torch": torch.get_rng_state(), "random": random.getstate()}},
                os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path):
    """True if path holds a whole checkpoint; a save killed between its two renames left it at
    path.old, which is moved back first."""
    state = lambda p: os.path.exists(os.path.join(p, "trainer_state.pt"))
    if not state(path) and state(path + ".old"):
        shutil.rmtree(path, ignore_errors=True)
        os.replace(path + ".old", path)
    return state(path)


def load_trainer_state(path):
    """trainer_state.pt with weights_only=True: a checkpoint from elsewhere cannot run code on load."""
    file = os.path.join(path, "trainer_state.pt")
    try:
        return torch.load(file, weights_only=True)
    # pickle.UnpicklingError for anything but tensors and plain values; a corrupt file
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        raise CheckpointError(f"{file}: refused to load ({reason})") from None


# settings that may change between a run and its --resume: where and how it runs, not what it computes
RESUMABLE = {"resume", "out", "device", "log_every", "save_every", "eval_every", "eval_limit", "compile",
             "activation_checkpointing", "strict", "skip_nonfinite", "peak_tflops", "mass_impl"}


def restore(ckpt, opt, metrics_path, rewrite=True, cfg=None):
    """A checkpoint's optimizer and RNG state -> (step, the metrics rows up to it); rows logged after
    the checkpoint are dropped from metrics_path (they are redone). cfg: this run's config, which
    must be the checkpoint's but for RESUMABLE (a run continued under other settings would be
    neither run): else a CheckpointError naming each setting that differs."""
    state = load_trainer_state(ckpt)
    if cfg is not None:
        now = asdict(cfg)
        differ = [k for k in now if k not in RESUMABLE and state["config"].get(k, now[k]) != now[k]]
        if differ:
            raise CheckpointError(f"--resume: {ckpt} was saved by a run with other settings ("
                                  + ", ".join(f"--{k.replace('_', '-')} {state['config'][k]!r} there, "
                                              f"{now[k]!r} now" for k in differ)
                                  + "): resume with its settings, or start afresh in another --out")
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["random"])
    metrics = [json.loads(l)
               for l in open(metrics_path)][:state["metrics_len"]] if os.path.exists(metrics_path) else []
    if rewrite:
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in metrics)
    return state["step"], metrics


def run_steps(one_step, step, metrics, cfg, model, proc, opt, writes=True, log=print, after=None):
    """The loop both trainers share: step = one_step(step) until cfg.max_steps (one_step appends its
    row to metrics as its last act); a checkpoint in cfg.out/checkpoint every cfg.save_every steps,
    on Ctrl-C (then exit 130: --resume continues from it) and at the end, and the final model (HF
    format) in cfg.out/model; with LoRA adapters, the adapter (PEFT's format) in cfg.out/adapter, and
    the merged model in cfg.out/model only with cfg.merge. after(step): work between steps (a periodic
    eval), run once the step is counted and saved, so a Ctrl-C inside it saves the step it follows.
    writes False (a DDP rank other than 0): the steps only."""
    ckpt = os.path.join(cfg.out, "checkpoint")
    save = lambda at: save_checkpoint(ckpt, model, proc, opt, at, len(metrics), cfg) if writes else None
    try:
        while step < cfg.max_steps:
            step = one_step(step)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                save(step)
            if after and step < cfg.max_steps:
                after(step)
    except KeyboardInterrupt:
        save(step)
        if writes:
            log(f"interrupted: saved {ckpt} at step {step}; --resume continues")
        raise SystemExit(130)
    save(step)
    if writes:
        final = os.path.join(cfg.out, "model")
        if lora.adapted(model):
            lora.save_adapter(model, os.path.join(cfg.out, "adapter"), base=getattr(cfg, "init", ""))
            proc.save_pretrained(os.path.join(cfg.out, "adapter"))
            if getattr(cfg, "merge", False):
                lora.merge(copy.deepcopy(model)).save_pretrained(final)
                proc.save_pretrained(final)
        else:
            model.save_pretrained(final)
            proc.save_pretrained(final)
    return step
