"""
The related methods on the SFT side, next to Att-CoT (docs/methods.md has their formulas):

- AVAR's attention objective (arXiv 2603.03825): L = L_LM + a_img L_img + a_sys L_sys with, per
  layer and head, L_img = -log(mean over (query, image key) pairs of the attention + 1e-6) and
  L_sys = +log(mean over (query, system key) pairs + 1e-6), averaged over heads and layers; the
  queries are the user's turn. From mass_kernel.attention_mass (pair mean = mass mean / key count),
  not from the T x T matrix the released code materialises in every layer.
- DRIFT's gradient bias (arXiv 2510.15050): Delta = prior - starting weights, once, for the language
  model's attention and MLP projections; each gradient is pulled along Delta before clipping.
- The difficulty filter (arXiv 2509.03321, which released no code for it): keep the training records
  whose success rate under the starting model lies in a band (hard, not hopeless).
"""
import collections
import hashlib
import json
import os
import time

import torch

import data
import answers
import eval as eval_mod
from model import VLM, CheckpointError

# -----------------------------------------------------------------------------
# AVAR: query rows = the user's turn (its text and image tokens, data.P and data.V); key groups: the
# image, and the "system" tokens. SmolVLM has no system prompt, so "system" is the chat scaffolding
# before the user's content ("<|im_start|>User: ", data.S), which data.py tags.

AVAR_ROWS, AVAR_GROUPS = (data.P, data.V), ("image", "system")


def avar_terms(masses, layers, row_span, spans, eps=1e-6):
    """masses {layer: (B, Hq, Nq, 2)} on AVAR_ROWS over AVAR_GROUPS -> summed per-sample terms and
    their counts: img_sum / img_count is L_img, sys_sum / sys_count is L_sys (samples without such
    keys left out). Missing masses are an error: the released code falls back to plain LM loss
    without a word."""
    missing = [layer for layer in layers if masses.get(layer) is None]
    if missing:
        raise RuntimeError(f"avar: no attention masses came back for layers {missing}")
    m = torch.stack([masses[layer] for layer in layers])              # (L, B, H, Nq, 2)
    m = m.to(torch.promote_types(m.dtype, torch.float32))             # bf16 masses summed in fp32
    valid = (row_span > 0).float()                                     # (B, Nq)
    n_keys = torch.stack([(spans == data.V).sum(1), (spans == data.S).sum(1)], -1)  # (B, 2)
    pairs = valid.sum(1, keepdim=True) * n_keys                        # (B, 2) (query, key) pairs
    # (L, B, H, 2)
    pair_mean = (m * valid[None, :, None, :, None]).sum(3) / pairs.clamp(min=1)[None, :, None]
    logs = torch.log(pair_mean + eps).mean((0, 2))                     # (B, 2): mean over layers and heads
    has = pairs > 0
    return {"img_sum": -(logs[:, 0] * has[:, 0]).sum(), "img_count": has[:, 0].sum(),
            "sys_sum": (logs[:, 1] * has[:, 1]).sum(), "sys_count": has[:, 1].sum()}


def avar_counts(batches):
    """The samples with image keys and with system keys over all micro-batches of a step."""
    return {"img_count": sum(((b["spans"] == data.V).any(1)).sum() for b in batches).float(),
            "sys_count": sum(((b["spans"] == data.S).any(1)).sum() for b in batches).float()}


# -----------------------------------------------------------------------------
# DRIFT

DRIFT_MODES = ("absolute", "gradnorm", "adaptive_cosine")
DRIFT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def drift_bias(g, delta, mode):
    """What DRIFT subtracts (before alpha) from one tensor's gradient g, for the prior direction delta."""
    if mode == "absolute":
        return delta
    unit = delta / delta.norm().clamp(min=1e-12)
    if mode == "gradnorm":
        return g.norm() * unit
    norms = (g.norm() * delta.norm()).double().clamp(min=1e-12)
    cos = (g.flatten().double() @ delta.flatten().double()) / norms
    return 0.5 * (1 + cos.to(g.dtype)) * g.norm() * unit               # adaptive_cosine


class Drift:
    """Delta = prior - the starting weights, per language-model projection (vision skipped), computed
    once (static, as DRIFT's code), rescaled to the weight's norm unless rescale=False, kept in the
    parameter's dtype on its device. apply(model) biases the summed gradients: call it after the
    backward of the last micro-batch (DDP has all-reduced them) and before clipping."""

    def __init__(self, model, prior_path, mode="adaptive_cosine", alpha=1.0, rescale=True, log=print):
        if mode not in DRIFT_MODES:
            raise ValueError(f"drift mode {mode!r}: one of {', '.join(DRIFT_MODES)}")
        prior = dict(VLM.from_pretrained(prior_path, dtype=torch.float32).named_parameters())
        self.mode, self.alpha, self.delta = mode, alpha, {}
        for name, p in model.named_parameters():
            if not (name.startswith("layers.") and name.split(".")[-2] in DRIFT_MODULES):
                continue
            if name not in prior or prior[name].shape != p.shape:
                got = tuple(prior[name].shape) if name in prior else "missing"
                raise CheckpointError(f"--drift-prior {prior_path}: {name} is {got}, the model's is "
                                      f"{tuple(p.shape)}")
            delta = prior[name].to(p.device) - p.detach().float()
            if rescale:
                delta = delta * p.detach().float().norm() / delta.norm().clamp(min=1e-12)
            self.delta[name] = delta.to(p.dtype)
        if not self.delta:  # DRIFT's known failure: a name mismatch biases nothing and says nothing
            raise CheckpointError(f"--drift-prior {prior_path}: no language-model projection to bias "
                                  f"(looked for layers.*.{{{','.join(DRIFT_MODULES)}}}.weight)")
        log(f"DRIFT {mode}, alpha {alpha}: biasing the gradients of {len(self.delta)} tensors toward "
            f"{prior_path}")

    @torch.no_grad()
    def apply(self, model):
        """Bias the gradients -> |alpha bias| / |g| over the biased tensors (logged each step: with
        `absolute` at the default rescale the bias is the weights' size, and clipping then leaves the
        task gradient a small share of the step)."""
        bias_sq, grad_sq = 0.0, 0.0
        for name, p in model.named_parameters():
            if name in self.delta and p.grad is not None:
                bias = self.alpha * drift_bias(p.grad, self.delta[name], self.mode)
                bias_sq += float(bias.double().pow(2).sum())
                grad_sq += float(p.grad.double().pow(2).sum())
                p.grad.sub_(bias)
        return (bias_sq / max(grad_sq, 1e-300)) ** 0.5


# -----------------------------------------------------------------------------
# the difficulty filter, and what a training run asks for


def setup(cfg, model, proc, records, train_path, log=print):
    """On the run's starting model: DRIFT's Delta (None without cfg.drift_prior) and the training
    records the difficulty filter keeps (all of them without cfg.difficulty)."""
    drift = Drift(model, cfg.drift_prior, cfg.drift_mode, cfg.drift_alpha, not cfg.drift_no_rescale, log) \
        if cfg.drift_prior else None
    if cfg.difficulty:
        lo, hi = (float(x) for x in cfg.difficulty.split(":"))
        records = difficulty_filter(model, proc, records, (lo, hi), cfg.difficulty_samples,
                                    os.path.dirname(os.path.abspath(train_path)), seed=cfg.seed, log=log)
        model.train()
        if not records:
            raise data.DataError(f"--difficulty {cfg.difficulty}: no training record has a success rate in "
                                 "that band")
    return drift, records


def success_rates(model, proc, records, k, batch_size=64, max_new_tokens=160, seed=0, log=None):
    """k answers per record sampled at temperature 1 (batched, KV cache) -> the share right per record."""
    repeated = [r for r in records for _ in range(k)]
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    texts = eval_mod.generate_answers(model, proc, repeated, batch_size, max_new_tokens, log=log,
                                      temperature=1.0, generator=generator)
    right = [answers.is_right(r, t) for r, t in zip(repeated, texts)]
    return [sum(right[i * k:(i + 1) * k]) / k for i in range(len(records))]


def content_key(model, records, k, seed):
    """A name for what the success rates depend on: the model's weights and the records themselves
    (hashed, so a retrained model in the same folder or an edited data file is a new measurement), k
    and the seed."""
    h = hashlib.sha1(json.dumps([k, seed, [{f: v for f, v in r.items() if f != "source"} for r in records]],
                                sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def difficulty_filter(model, proc, records, band, k, cache_dir, batch_size=64, seed=0, log=print):
    """Keep the records whose success rate (success_rates) lies in band = (lo, hi). The rates are
    cached in cache_dir under content_key, so a resumed run (or another band) does not sample again.
    Under DDP rank 0 samples and writes the cache (atomically) while the others wait for the file,
    then all read it (the cache folder must be shared by the ranks, as the data is). Logs how
    many were kept per band and per question type."""
    lo, hi = band
    cache = os.path.join(cache_dir, f"difficulty-{content_key(model, records, k, seed)}.json")
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not os.path.exists(cache) and (not dist or torch.distributed.get_rank() == 0):
        t0 = time.time()
        rates = success_rates(model, proc, records, k, batch_size, seed=seed,
                              log=lambda line: log(f"  difficulty sampling: {line}"))
        tmp = cache + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"k": k, "seed": seed, "rates": rates}, f)
        os.replace(tmp, cache)
        log(f"difficulty: {len(records)} x {k} samples in {time.time() - t0:.0f}s, rates cached in {cache}")
    # the other ranks wait on the file, not in a collective: sampling may take longer than NCCL's
    # timeout (10 minutes by default)
    while dist and not os.path.exists(cache):
        time.sleep(2)
    rates = json.load(open(cache))["rates"]
    log(f"difficulty: success rates from {cache}")
    bands = collections.Counter("0" if r == 0 else "1" if r == 1 else f"< {lo:g}" if r < lo
                                else f"> {hi:g}" if r > hi
                                else f"{lo:g}-{hi:g}" for r in rates)
    kept = [rec for rec, r in zip(records, rates) if lo <= r <= hi]
    by_type = collections.Counter(rec.get("type") for rec in kept)
    total = collections.Counter(rec.get("type") for rec in records)
    log(f"difficulty: kept {len(kept)} of {len(records)} (rate in [{lo:g}, {hi:g}]); success rate bands: "
        + ", ".join(f"{b} {n}" for b, n in sorted(bands.items()))
        + "; kept per type: " + ", ".join(f"{t} {by_type[t]}/{n}" for t, n in total.items()))
    return kept
