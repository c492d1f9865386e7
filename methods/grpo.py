"""
The RL stage: the smallest correct GRPO, with the papers' visual rewards taken from the kernel.

    python -m methods.grpo --init out/model              # on the synthetic set
    python -m methods.grpo --init DIR --data train.jsonl --eval-data eval.jsonl --reward-avar --reward-region

Per step: G completions per prompt sampled with the KV cache; rewards (accuracy, format, AVAR's
image / system mass counted only when right, SAYO's region-over-image attention on the
high-entropy tokens); advantages A = (r - group mean) / (group std + 1e-4); the clipped policy
loss per completion token, plus beta * k3 KL to the frozen starting model. The masses come from one
teacher-forced forward with mass_kernel.attention_mass (key groups: image, system, the record's
evidence region), never an attention matrix. docs/methods.md has the formulas.
"""
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import torch

import answers
import config
import data
import eval as eval_mod
import masses
from analysis import draw
from analysis import report
from checkpoint import find_checkpoint, restore, run_steps
from config import arg
from device import device_problem, pick_device
from model import VLM
from records import read_records
from setting import synthetic


@dataclass
class GRPOConfig:
    init: str = arg("", "the checkpoint GRPO starts from (out/model of an SFT run, say); required")
    out: str = arg("out/grpo", "output folder: checkpoint, model, metrics, report")
    data: str = arg("", "training prompts (records with gold answers); empty: the synthetic set")
    eval_data: str = arg("", "evaluation records; empty with the synthetic set: its eval split")
    n_train: int = arg(20000,
                       "the synthetic set's training records (the SFT run's seed and sizes: the same set)")
    n_eval: int = arg(150, "the synthetic set's eval items, each with its twin")
    prompts_per_step: int = arg(4, "prompts per step")
    num_generations: int = arg(8, "G: completions sampled per prompt")
    max_new_tokens: int = arg(96, "longest completion; a longer one is truncated (and left out of the loss)")
    temperature: float = arg(1.0, "sampling temperature (the log-probs are scored at it too)")
    top_p: float = arg(1.0, "nucleus sampling's mass")
    max_steps: int = arg(200, "steps (with lr 1e-5 the default model's sample accuracy moves in ~3 minutes)")
    inner_steps: int = arg(1,
                           "policy updates per batch of rollouts (1: the ratio is 1, plain policy gradient)")
    lr: float = arg(1e-5, "learning rate (the long-CoT paper's 1e-6, for a 2B model, does nothing visible "
                    "on the small one)")
    grad_clip: float = arg(1.0, "the gradient's norm is clipped to this")
    eps_low: float = arg(0.2, "the ratio's clip below 1")
    eps_high: float = arg(0.28, "the ratio's clip above 1 (DAPO's clip-higher)")
    beta: float = arg(0.0, "weight of the k3 KL to the starting model (SAYO uses 0.001); logged every step, "
                      "or every --kl-every steps at 0")
    kl_every: int = arg(10, "at beta 0 the KL is only logged: measured every this many steps (the starting "
                        "model's forward costs as much as the policy's scoring)")
    loss_agg: str = arg("token", "token: all completion tokens / their count; seq: each sequence's mean",
                        choices=("token", "seq"))
    no_std_scale: bool = arg(False, "Dr. GRPO: A = r - mean, not divided by the group's std")
    keep_truncated: bool = arg(False, "keep completions cut at --max-new-tokens in the loss")
    reward_format: float = arg(0.1, "weight of the format reward: a rationale, then the answer marker")
    reward_avar: float = arg(0.0,
                             "weight of AVAR's reward, image mass / system mass when the answer is right "
                             "(the flag alone: 0.3)", nargs="?", const=0.3)
    reward_region: float = arg(0.0, "weight of SAYO's region reward, tanh(log(region / image attention per "
                               "key)) (the flag alone: 1.0)", nargs="?", const=1.0)
    avar_layers: str = arg("all", f"the layers AVAR's reward reads: {config.LAYER_GRAMMAR}")
    region_layers: str = arg("last", "the layers SAYO's reward reads (same grammar)")
    region_top: float = arg(0.3, "the share of highest-entropy completion tokens SAYO scores")
    eps: float = arg(1e-6, "added to the rewards' denominators and logs")
    micro_batch: int = arg(16, "completions per forward in scoring and in the update")
    eval_limit: int = arg(0, "evaluate on at most this many records (0: all)")
    prompt: str = arg("bare", "how eval's CoT prompt asks: bare (the question as written) or cot (+ 'Think "
                      "step by step.', for models of the base: their training prompts already say it)",
                      choices=("bare", "cot"))
    save_every: int = arg(50, "write a checkpoint every this many steps (0: at the end only)")
    log_every: int = arg(1, "print a line every this many steps")
    seed: int = arg(0, "seed of the synthetic set, the samples and the prompt order")
    device: str = arg("auto", "auto (the GPU if there is one), cpu, cuda or cuda:N")
    resume: bool = arg(False, "continue from OUT/checkpoint")


def check(cfg):
    """Every flag, before any work (the layer sets' range once the model is loaded)."""
    config.check(cfg, [
        ("init", bool(cfg.init) and os.path.isdir(cfg.init),
         "an existing checkpoint folder (the model GRPO starts from)"),
        ("loss_agg", cfg.loss_agg in ("token", "seq"), "token or seq"),
        ("prompt", cfg.prompt in ("bare", "cot"), "bare or cot"),
        ("eval_data", bool(cfg.eval_data or not cfg.data), "given with --data"),
        ("region_top", 0 < cfg.region_top <= 1, "in (0, 1]"),
        ("temperature", cfg.temperature > 0,
         "> 0 (at 0 the G completions of a prompt are one, every advantage is 0 and nothing trains)"),
        ("top_p", 0 < cfg.top_p <= 1, "in (0, 1]"),
        *config.at_least(cfg, 1, ("prompts_per_step", "num_generations", "max_new_tokens", "inner_steps",
                                  "micro_batch", "kl_every")),
        *config.at_least(cfg, 0, ("beta", "eps_low", "eps_high", "max_steps", "reward_format", "reward_avar",
                                  "reward_region"))])
    for name in ("avar_layers", "region_layers"):
        config.layer_set(getattr(cfg, name), flag=config.flag_name(name))
    if device_problem(cfg.device):
        raise config.ConfigError(device_problem(cfg.device))


# -----------------------------------------------------------------------------
# the algorithm's pieces


def completion_mask(ids, eos_ids):
    """ids (B, L) sampled -> mask (B, L) of the completion tokens, the first eos included and nothing
    after it (pad and eos may be the same id: a mask built as ids != pad would drop the eos), and
    truncated (B,): no eos within L."""
    is_eos = torch.isin(ids, torch.as_tensor(eos_ids, device=ids.device))
    ended = is_eos.any(1)
    first = torch.where(ended, is_eos.int().argmax(1), ids.shape[1])
    return torch.arange(ids.shape[1], device=ids.device)[None] <= first[:, None], ~ended


def advantages(rewards, std_scale=True):
    """rewards (P, G) -> A (P, G) = (r - group mean) / (group std + 1e-4), or r - mean (Dr. GRPO);
    a group whose rewards are all equal gets 0."""
    centred = rewards - rewards.mean(1, keepdim=True)
    return centred / (rewards.std(1, keepdim=True) + 1e-4) if std_scale else centred


def policy_loss(logp, logp_old, logp_ref, adv, mask, cfg):
    """Per-token clipped surrogate + beta * k3, aggregated over the masked tokens. logp* (B, L), adv (B,),
    mask (B, L) float -> (sum over this micro-batch's tokens, (kl sum, clipped count))."""
    ratio = torch.exp(logp - logp_old)
    a = adv[:, None]
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    per = -torch.minimum(ratio * a, clipped * a)
    k3 = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1  # >= 0, unbiased for KL(policy || ref)
    per = per + cfg.beta * k3
    was_clipped = ((ratio * a) > (clipped * a)) & (mask > 0)  # the min took the clipped term
    return per * mask, ((k3 * mask).sum().detach(), was_clipped.sum())


def aggregate(per_token, mask, n_tokens, n_seqs, how):
    """The step's loss share of one micro-batch: token-level (all tokens / the step's token count) or
    per sequence (each sequence's mean, / the step's sequence count)."""
    if how == "token":
        return per_token.sum() / n_tokens
    return (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs


def region_tokens(proc, rec, ids, image):
    """For a record with one image (loaded: `image`) and evidence `boxes` (pixel boxes in the original
    image): a (T,) bool over ids, True on the image tokens whose cell overlaps a box (through the
    processor's resize, tiling and pixel shuffle: Processor.image_token_boxes), or None without boxes."""
    if not rec.get("boxes") or len(rec["images"]) != 1:
        return None
    cells = proc.image_token_boxes(image.width, image.height)
    hit = [any(min(x1, b[2]) > max(x0, b[0]) and min(y1, b[3]) > max(y0, b[1]) for b in rec["boxes"])
           for x0, y0, x1, y1 in cells]
    where = torch.zeros(len(ids), dtype=torch.bool)
    slots = (ids == proc.image_token_id).nonzero()[:, 0]
    if len(slots) != len(cells):
        raise data.DataError(f"{rec['source']}: {len(slots)} image tokens, {len(cells)} cells")
    where[slots] = torch.tensor(hit)
    return where


def system_tokens(proc, ids, mask, systems=None):
    """(B, T) left-padded prompt ids -> (B, T) bool: the chat scaffolding (and the system message of
    systems[b], when there is one) before the user's content (data.S; the leading tokens shared with
    the template's head, as data.encode_record tags them)."""
    systems = systems or [None] * ids.shape[0]
    heads = {s: proc.tokenizer.encode(data.chat_head(proc, s)).ids for s in set(systems)}  # once per message
    out = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ids.shape[0]):
        head_ids = heads[systems[b]]
        start = int((mask[b] == 0).sum())
        n = 0
        while n < len(head_ids) and start + n < ids.shape[1] and int(ids[b, start + n]) == head_ids[n]:
            n += 1
        out[b, start:start + n] = True
    return out


def sayo_reward(m_region, m_image, n_region, n_image, entropy, mask, top, eps):
    """SAYO's region reward per completion. m_* (B, L) masses (mean over heads and layers), n_* (B,)
    key counts, entropy (B, L) of the policy's next-token distribution, mask (B, L) bool. For each
    token r = tanh(log((a + eps) / (v + eps))) with a, v the attention per key on the region and on
    the whole image; the mean over the top `top` share of the completion's tokens by entropy
    (padding never chosen)."""
    a = m_region / n_region.clamp(min=1)[:, None]
    v = m_image / n_image.clamp(min=1)[:, None]
    r = torch.tanh(torch.log((a + eps) / (v + eps)))
    k = torch.ceil(top * mask.sum(1).float()).clamp(min=1).long()                 # (B,)
    order = entropy.masked_fill(~mask, float("-inf")).argsort(1, descending=True)  # padding last
    chosen = torch.arange(mask.shape[1], device=mask.device)[None] < k[:, None]
    picked = torch.zeros_like(mask).scatter(1, order, chosen) & mask
    return (r * picked).sum(1) / picked.sum(1).clamp(min=1)


# -----------------------------------------------------------------------------
# rollouts and scoring

SCORED_GROUPS = ("image", "system")  # bits 0 and 1; bit 2 is the record's evidence region (no span tags it)


def score(model, seq, rows, mass_layers=(), grad=False, temperature=1.0):
    """One teacher-forced forward over the sequences `rows` (prompt then completion, right-padded) ->
    logp (b, L) of the sampled tokens, entropy (b, L) of the policy's next-token distribution (both of
    the distribution sampled from: logits / temperature, as TRL scores them; top-p is not undone), and
    masses {layer: (b, H, L, 3)} of the completion tokens over the key groups (bit 0 image, 1
    system, 2 region) for the layers asked."""
    ids, mask, comp = seq["input_ids"][rows], seq["attention_mask"][rows], seq["completion"][rows]
    steps = torch.arange(comp.shape[1], device=ids.device)[None]
    at = (seq["start"][rows, None] + steps).clamp(max=ids.shape[1] - 1)
    # (b, L): a completion token sees up to itself
    q_pos = torch.where(seq["cmask"][rows], at, -1)
    hook = masses.mass_fn(at, q_pos, seq["groups"][rows], 3)
    with contextlib.nullcontext() if grad else torch.no_grad():
        out = model(ids, attention_mask=mask, image_features=shared_image_features(model, seq, rows),
                    mass_layers=mass_layers, mass_fn=hook, mass_values=hook.values)
        logits = out.logits.gather(1, (at - 1)[..., None].expand(-1, -1, out.logits.shape[-1]))
        logits = logits.float() / temperature
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, comp[..., None])[..., 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    return logp, entropy, out.masses


def shared_image_features(model, seq, rows):
    """The image features of the sequences `rows` as model.embed takes them, each prompt's images
    through the vision tower once however many of its completions are there (the gradient reaches
    the tower summed over them, as G separate passes would give it); None without images."""
    if "pixel_values" not in seq:
        return None
    prompts, which = torch.unique(seq["prompt"][rows], return_inverse=True)
    pixels = seq["pixel_values"][prompts]
    tiles = (pixels != 0).flatten(2).any(2).sum(1)  # image_features drops all-zero padding tiles
    if not int(tiles.sum()):
        return pixels.new_zeros(0, model.config.text.hidden_size)
    per_prompt = model.image_features(pixels, seq["pixel_attention_mask"][prompts]).split(
        (tiles * model.config.image_seq_len).tolist())
    return torch.cat([per_prompt[i] for i in which.tolist()])


def rollouts(model, proc, recs, cfg, step, device):
    """G completions per record, sampled with the KV cache -> the sequences to score, right-padded
    (the kernel masks keys by position only, so no padding may precede a real token): seq with
    input_ids, attention_mask, pixels, start (where each completion begins), completion, cmask
    and the key groups; truncated (B,), the decoded texts, has_region (B,)."""
    G = cfg.num_generations
    images = [[data.load_image(p, r["source"]) for p in r["images"]] for r in recs]  # once per prompt
    batch = {k: v.to(device) for k, v in proc([data.record_prompt(proc, r) for r in recs],
                                              images if any(images) else None, padding_side="left").items()}
    gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)  # the same samples after a resume
    model.eval()
    comp = model.generate(**batch, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, eos_token_id=proc.eos_token_id, generator=gen, num_samples=G)
    model.train()
    # an <image> token with no image behind it: cut there, left out
    sampled_image = comp == proc.image_token_id
    comp = torch.where(sampled_image.cumsum(1) > 0, proc.eos_token_id, comp)
    cmask, truncated = completion_mask(comp, proc.eos_token_id)
    truncated |= sampled_image.any(1)
    texts = [proc.decode(c[m]) for c, m in zip(comp, cmask)]
    # each prompt's G rows: completion i is of prompt i // G
    ids, pmask = (batch[k].cpu().repeat_interleave(G, 0) for k in ("input_ids", "attention_mask"))
    spans = torch.where(ids == proc.image_token_id, data.V, 0)
    systems = [r.get("system") for r in recs for _ in range(G)]
    spans = spans.masked_fill(system_tokens(proc, ids, pmask, systems), data.S)
    regions = [region_tokens(proc, r, ids[i * G], im[0] if im else None)
               for i, (r, im) in enumerate(zip(recs, images))]
    has_region = torch.tensor([regions[i // G] is not None for i in range(len(ids))])
    region = torch.stack([regions[i // G] if has_region[i] else torch.zeros(ids.shape[1], dtype=torch.bool)
                          for i in range(len(ids))])
    # prompt + completion, each row shifted left past its padding
    P, T = ids.shape[1], ids.shape[1] + comp.shape[1]
    pad = (pmask == 0).sum(1)
    shift = (torch.arange(T)[None] + pad[:, None]) % T
    row = lambda x, y: torch.cat([x, y], 1).gather(1, shift)
    none = torch.zeros(comp.shape, dtype=torch.long)
    groups = masses.key_groups(row(spans, none), SCORED_GROUPS, extra=[row(region, none.bool())])
    # the pixels once per prompt; seq["prompt"] says whose each row is
    seq = {**{k: v for k, v in batch.items() if k.startswith("pixel")},
           "prompt": torch.arange(len(recs), device=device).repeat_interleave(G),
           "completion": comp, "cmask": cmask,
           "input_ids": row(ids, comp.cpu()).to(device),
           "attention_mask": row(pmask, cmask.long().cpu()).to(device),
           "groups": groups.to(device), "start": (P - pad).to(device)}
    return seq, truncated, texts, has_region.to(device)


def has_format(text):
    """A rationale, then the answer part (data.split_reply's rule)."""
    cut = data.split_reply(text)
    return cut > 0 and bool(text[:cut].strip())


def rewards_of(recs, texts, old, seq, has_region, cfg, avar_layers, region_layers, G):
    """-> total reward (B,) and its parts {accuracy, format, avar, region} (B,) each."""
    cmask, groups, device = seq["cmask"], seq["groups"], seq["cmask"].device
    right = torch.tensor([answers.is_right(recs[i // G], t) for i, t in enumerate(texts)], dtype=torch.float,
                         device=device)
    parts = {"accuracy": right, "format": torch.tensor([float(has_format(t)) for t in texts], device=device)}
    by_layer, entropy = old["masses"], old["entropy"]
    if cfg.reward_avar:  # summed image attention / summed system attention, over heads, layers and tokens
        m = torch.stack([by_layer[l] for l in avar_layers]).double().sum((0, 2))  # (B, L, 3)
        m = (m * cmask[..., None]).sum(1)
        # only when the answer is right
        parts["avar"] = m[:, 0] / (m[:, 1] + cfg.eps) * right
    if cfg.reward_region:
        # (B, L, 3): mean over heads
        m = torch.stack([by_layer[l] for l in region_layers]).double().mean((0, 2))
        n_image, n_region = (groups & 1).sum(1), ((groups >> 2) & 1).sum(1)
        parts["region"] = has_region * sayo_reward(m[..., 2], m[..., 0], n_region, n_image, entropy, cmask,
                                                   cfg.region_top, cfg.eps)
    weights = {"accuracy": 1.0, "format": cfg.reward_format, "avar": cfg.reward_avar,
               "region": cfg.reward_region}
    parts = {k: v.float() for k, v in parts.items()}
    return sum(weights[k] * v for k, v in parts.items()), parts


# -----------------------------------------------------------------------------
# the loop


def grpo_step(model, start, opt, proc, recs, cfg, step, device, layers):
    """One GRPO step on the prompts recs: rollouts, their scores under the policy and the starting
    model, rewards, advantages, inner_steps updates -> the metrics row. layers: {"avar", "region",
    "masses"} layer lists. Forwards not needed are skipped: with one update and no attention reward
    the policy's old log-probs are the update's own (detached; the ratio is 1 either way), and at
    beta 0 the starting model only feeds the logged KL, measured every kl_every steps."""
    G = cfg.num_generations
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    seq, truncated, texts, has_region = rollouts(model, proc, recs, cfg, step, device)
    cmask = seq["cmask"]
    chunks = [torch.arange(s, min(s + cfg.micro_batch, len(texts)), device=device)
              for s in range(0, len(texts), cfg.micro_batch)]
    need_old = cfg.inner_steps > 1 or bool(layers["masses"])
    need_ref = cfg.beta > 0 or step % cfg.kl_every == 0
    with amp():  # the rollouts' log-probs, entropies and masses, in chunks, with the same autocast as SFT
        scored = [score(model, seq, rows, layers["masses"], temperature=cfg.temperature)
                  for rows in chunks] if need_old else []
        ref = [score(start, seq, rows, temperature=cfg.temperature)[0] for rows in chunks] if need_ref else []
    old = {"logp": torch.cat([s[0] for s in scored]) if need_old else None,
           "entropy": torch.cat([s[1] for s in scored]) if need_old else None,
           "masses": {l: torch.cat([s[2][l] for s in scored]) for l in layers["masses"]},
           "ref": torch.cat(ref) if need_ref else None}
    reward, parts = rewards_of(recs, texts, old, seq, has_region, cfg, layers["avar"], layers["region"], G)
    adv = advantages(reward.view(-1, G), not cfg.no_std_scale).flatten()
    loss_mask = (cmask & (~truncated[:, None] | cfg.keep_truncated)).float()
    n_tokens, n_seqs = loss_mask.sum().clamp(min=1), (loss_mask.sum(1) > 0).sum().clamp(min=1)
    for _ in range(cfg.inner_steps):
        loss_sum, kl_sum, n_clipped = 0.0, 0.0, 0
        for rows in chunks:
            with amp():
                logp = score(model, seq, rows, grad=True, temperature=cfg.temperature)[0]
            per, (kl, clipped) = policy_loss(logp, old["logp"][rows] if need_old else logp.detach(),
                                             old["ref"][rows] if need_ref else logp.detach(), adv[rows],
                                             loss_mask[rows], cfg)
            loss = aggregate(per, loss_mask[rows], n_tokens, n_seqs, cfg.loss_agg)
            loss.backward()
            loss_sum, kl_sum = loss_sum + float(loss.detach()), kl_sum + float(kl)
            n_clipped += int(clipped)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"step": step + 1, "reward": float(reward.mean()),
            **{k: float(v.mean()) for k, v in parts.items()},
            "completion_tokens": float(cmask.sum(1).float().mean()),
            **({"kl": kl_sum / float(n_tokens)} if need_ref else {}),
            "clip_fraction": n_clipped / float(n_tokens), "truncated": int(truncated.sum()),
            "zero_advantage_groups": int((reward.view(-1, G).std(1) == 0).sum()), "loss": loss_sum}


def progress_line(row, cfg, done, seconds, tokens):
    parts = [k for k in ("accuracy", "format", "avar", "region") if k in row]
    rewards = ", ".join(f"{k} {row[k]:.3f}" for k in parts)
    kl = f"{row['kl']:.4f}" if "kl" in row else "-"  # not measured this step (beta 0, see kl_every)
    return (f"step {row['step']:4d}/{cfg.max_steps} reward {row['reward']:.3f} ({rewards}) "
            f"| acc {row.get('accuracy', float('nan')):.2f} "
            f"len {row['completion_tokens']:.0f} kl {kl} clip {row['clip_fraction']:.3f} "
            f"trunc {row['truncated']} zero-adv {row['zero_advantage_groups']} "
            f"| {tokens / seconds:,.0f} tok/s | ETA {seconds / done * (cfg.max_steps - row['step']):.0f}s")


def train(cfg: GRPOConfig):
    check(cfg)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    log = lambda *a: print(*a, flush=True)
    train_path, eval_path = cfg.data, cfg.eval_data
    if not train_path:
        data_dir = os.path.join(cfg.out, "data")
        synthetic.make_once(data_dir, cfg.n_train, cfg.n_eval, seed=cfg.seed)
        train_path, eval_path = synthetic.paths(data_dir)
    records = read_records(train_path, data.Skips())
    eval_records = read_records(eval_path, data.Skips())[:cfg.eval_limit or None]
    if not records or not eval_records:
        raise data.DataError(f"{train_path if not records else eval_path}: no usable record")
    ckpt = os.path.join(cfg.out, "checkpoint")
    resuming = cfg.resume and find_checkpoint(ckpt)
    proc = data.Processor.from_pretrained(cfg.init)
    start = VLM.from_pretrained(cfg.init, dtype=torch.float32).to(device).eval().requires_grad_(False)
    model = VLM.from_pretrained(ckpt if resuming else cfg.init, dtype=torch.float32).to(device)
    layers = {"avar": config.layer_set(cfg.avar_layers, len(model.layers), "--avar-layers"),
              "region": config.layer_set(cfg.region_layers, len(model.layers), "--region-layers")}
    layers["masses"] = sorted(set(layers["avar"] * bool(cfg.reward_avar)
                                  + layers["region"] * bool(cfg.reward_region)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step, metrics, metrics_path = 0, [], os.path.join(cfg.out, "metrics.jsonl")
    if resuming:
        step, metrics = restore(ckpt, opt, metrics_path, cfg=cfg)
        log(f"resumed from {ckpt} at step {step}")
    log(f"grpo: {len(records)} prompts from {train_path}, {cfg.prompts_per_step} x {cfg.num_generations} "
        f"completions a step, rewards: accuracy 1, format {cfg.reward_format}, avar {cfg.reward_avar}, "
        f"region {cfg.reward_region}")
    t0, seen, first_step = time.time(), {"tokens": 0}, step  # the ETA counts the steps run here

    def one_step(step):
        recs = [records[data.record_at(cfg.seed, i, len(records))]
                for i in range(step * cfg.prompts_per_step, (step + 1) * cfg.prompts_per_step)]
        row = grpo_step(model, start, opt, proc, recs, cfg, step, device, layers)
        seen["tokens"] += round(row["completion_tokens"] * len(recs) * cfg.num_generations)
        with open(metrics_path, "a" if metrics else "w") as f:
            f.write(json.dumps(row) + "\n")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            log(progress_line(row, cfg, step + 1 - first_step, time.time() - t0, seen["tokens"]))
        metrics.append(row)
        return step + 1

    run_steps(one_step, step, metrics, cfg, model, proc, opt, log=log)
    if metrics:
        draw.curves(metrics, os.path.join(cfg.out, "curves.png"),
                    keys=("reward", "accuracy", "format", "avar", "region", "completion_tokens", "kl",
                          "clip_fraction"))
    return {"model": model, "start": start, "proc": proc, "metrics": metrics, "eval_records": eval_records,
            "train_records": records}


def run(cfg):
    """GRPO, then the eval report: the starting model against the trained one."""
    result = train(cfg)
    layers = list(range(len(result["model"].layers)))
    results = {}
    for name in ("start", "grpo"):
        results[name] = eval_mod.evaluate(result[name if name == "start" else "model"], result["proc"],
                                          result["eval_records"], result["train_records"], layers,
                                          cot=cfg.prompt, log=print)
    print("\n" + report.table(results))
    meta = {"start": cfg.init, "steps": cfg.max_steps, "seed": cfg.seed, "n": len(result["eval_records"]),
            "rewards": f"accuracy 1, format {cfg.reward_format}, avar {cfg.reward_avar}, region "
                       f"{cfg.reward_region}"}
    report_md = report.write_report(results, cfg.out, meta, [("GRPO curves", "curves.png")])
    print(f"(report: {report_md})")
    return results


def parser():
    p = config.new_parser("python -m methods.grpo", __doc__.split("\n\n")[0].strip())
    return config.add_flags(p, GRPOConfig)


def main(argv=None):
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    with config.one_line_errors():
        return run(GRPOConfig(**vars(args)))


if __name__ == "__main__":
    main()
