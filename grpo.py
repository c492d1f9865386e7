"""
The RL stage: the smallest correct GRPO, with the papers' visual rewards taken from the kernel.

    python nanoattcot.py grpo --init out/model                       # on the synthetic set
    python nanoattcot.py grpo --init DIR --data train.jsonl --eval-data eval.jsonl --reward-avar --reward-region

Per step: G completions per prompt sampled with the KV cache; rewards (accuracy, format, AVAR's
image / system mass counted only when right, SAYO's region-over-image attention on the
high-entropy tokens); advantages A = (r - group mean) / (group std + 1e-4); the clipped policy
loss per completion token, plus beta * k3 KL to the frozen starting model. The masses come from one
teacher-forced forward with kernels.attention_mass (key groups: image, system, the record's
evidence region), never an attention matrix. REFERENCE.md section 3 has the formulas.
"""
import argparse
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, fields

import torch

import data
import draw
import answers
import checkpoint
import eval as eval_mod
import kernels
import synthetic
from model import VLM, CheckpointError, device_problem, pick_device


@dataclass
class GRPOConfig:
    init: str = ""                  # the starting checkpoint (e.g. out/model of the SFT run)
    out: str = "out/grpo"
    data: str = ""                  # training prompts (records with gold answers); empty: the synthetic set
    eval_data: str = ""
    n_train: int = 20000            # the synthetic set's sizes (the same seed and sizes as the SFT run: the same set)
    n_eval: int = 150               # eval items, each with its twin: 300 records
    prompts_per_step: int = 4
    num_generations: int = 8        # G completions per prompt
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    max_steps: int = 200            # with lr 1e-5: the default model's sample accuracy moves in ~3 minutes
    inner_steps: int = 1            # policy updates per batch of rollouts (1: the ratio is 1, plain policy gradient)
    lr: float = 1e-5                # the long-CoT paper's 1e-6 (a 2B model) does nothing visible on the small one
    grad_clip: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0               # k3 KL weight (SAYO uses 0.001); the KL is logged either way
    loss_agg: str = "token"         # "token": sum over all completion tokens / their count; "seq": mean per sequence
    no_std_scale: bool = False      # Dr. GRPO: A = r - mean
    keep_truncated: bool = False    # completions cut at max_new_tokens stay in the loss
    reward_format: float = 0.1      # the reply has a rationale and an answer marker
    reward_avar: float = 0.0        # AVAR: image mass / system mass of the completion, when the answer is right (0.3)
    reward_region: float = 0.0      # SAYO: tanh(log(region attention per key / image attention per key)) (1.0)
    avar_layers: str = "all"        # "all" or comma-separated layers
    region_layers: str = "last"     # "last", "all" or comma-separated layers
    region_top: float = 0.3         # the share of highest-entropy completion tokens SAYO scores
    eps: float = 1e-6
    micro_batch: int = 16           # completions per forward in scoring and in the update
    eval_limit: int = 0
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    device: str = "auto"
    resume: bool = False


class ConfigError(ValueError):
    pass


def check(cfg):
    if not cfg.init or not os.path.isdir(cfg.init):
        raise ConfigError(f"--init {cfg.init!r}: must be an existing checkpoint folder (the model GRPO starts from)")
    for name, ok, want in [("loss_agg", cfg.loss_agg in ("token", "seq"), "token or seq"),
                           ("eval_data", bool(cfg.eval_data or not cfg.data), "given with --data"),
                           ("region_top", 0 < cfg.region_top <= 1, "in (0, 1]"),
                           ("temperature", cfg.temperature > 0, "> 0 (at 0 the G completions of a prompt are one, "
                                                                "every advantage is 0 and nothing trains)"),
                           ("top_p", 0 < cfg.top_p <= 1, "in (0, 1]"),
                           *[(k, getattr(cfg, k) >= 1, ">= 1") for k in ("prompts_per_step", "num_generations",
                                                                         "max_new_tokens", "inner_steps", "micro_batch")],
                           *[(k, getattr(cfg, k) >= 0, ">= 0") for k in ("beta", "eps_low", "eps_high", "max_steps",
                                                                         "reward_format", "reward_avar", "reward_region")]]:
        if not ok:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: must be {want}")
    for name in ("avar_layers", "region_layers"):  # the grammar now; the range once the model is loaded
        spec = getattr(cfg, name)
        if spec not in ("all", "last") and not all(x.strip().isdigit() for x in spec.split(",")):
            raise ConfigError(f"--{name.replace('_', '-')} {spec!r}: must be all, last or comma-separated "
                              "layer indices")
    if device_problem(cfg.device):
        raise ConfigError(device_problem(cfg.device))


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


def region_tokens(proc, rec, ids):
    """For a record with one image and evidence `boxes` (pixel boxes in the original image): a (T,) bool
    over ids, True on the image tokens whose cell overlaps a box (through the processor's resize,
    tiling and pixel shuffle: Processor.image_token_boxes), or None without boxes."""
    if not rec.get("boxes") or len(rec["images"]) != 1:
        return None
    im = data.load_image(rec["images"][0], rec["source"])
    cells = proc.image_token_boxes(im.width, im.height)
    hit = [any(min(x1, b[2]) > max(x0, b[0]) and min(y1, b[3]) > max(y0, b[1]) for b in rec["boxes"])
           for x0, y0, x1, y1 in cells]
    where = torch.zeros(len(ids), dtype=torch.bool)
    slots = (ids == proc.image_token_id).nonzero()[:, 0]
    if len(slots) != len(cells):
        raise data.DataError(f"{rec['source']}: {len(slots)} image tokens, {len(cells)} cells")
    where[slots] = torch.tensor(hit)
    return where


def system_tokens(proc, ids, mask):
    """(B, T) left-padded prompt ids -> (B, T) bool: the chat scaffolding before the user's content
    (data.S; the leading tokens shared with the template's head, as data.encode_record tags them)."""
    head_ids = proc.tokenizer.encode(data.chat_head(proc)).ids
    out = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ids.shape[0]):
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


def layer_list(spec, n):
    if spec == "all":
        return list(range(n))
    if spec == "last":
        return [n - 1]
    layers = [int(x) for x in spec.split(",")]
    if not all(0 <= i < n for i in layers):
        raise ConfigError(f"layers {spec}: the model has {n} layers")
    return layers


def score(model, seq, rows, mass_layers=(), grad=False, temperature=1.0):
    """One teacher-forced forward over the sequences `rows` (prompt then completion, right-padded) ->
    logp (b, L) of the sampled tokens, entropy (b, L) of the policy's next-token distribution (both of
    the distribution sampled from: logits / temperature, as TRL scores them; top-p is not undone), and
    masses {layer: (b, H, L, 3)} of the completion tokens over the key groups (bit 0 image, 1
    system, 2 region) for the layers asked."""
    ids, mask, comp = seq["input_ids"][rows], seq["attention_mask"][rows], seq["completion"][rows]
    at = (seq["start"][rows, None] + torch.arange(comp.shape[1], device=ids.device)[None]).clamp(max=ids.shape[1] - 1)
    q_pos = torch.where(seq["cmask"][rows], at, -1)                 # (b, L): a completion token sees up to itself

    def mass_fn(layer, q, k):
        return kernels.attention_mass(data.take_rows(q, at), k, q_pos, seq["groups"][rows], num_groups=3)
    with contextlib.nullcontext() if grad else torch.no_grad():
        out = model(ids, seq["pixel_values"][rows] if "pixel_values" in seq else None,
                    seq["pixel_attention_mask"][rows] if "pixel_values" in seq else None, mask,
                    mass_layers=mass_layers, mass_fn=mass_fn)
        logits = out.logits.gather(1, (at - 1)[..., None].expand(-1, -1, out.logits.shape[-1])).float() / temperature
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, comp[..., None])[..., 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    return logp, entropy, out.masses


def rollouts(model, proc, recs, cfg, step, device):
    """G completions per record, sampled with the KV cache -> the sequences to score, right-padded
    (the kernel masks keys by position only, so no padding may precede a real token): seq with
    input_ids, attention_mask, pixels, start (where each completion begins), completion, cmask
    and the key groups; truncated (B,), the decoded texts, has_region (B,)."""
    G = cfg.num_generations
    prompts = [data.record_prompt(proc, r) for r in recs for _ in range(G)]
    images = [[data.load_image(p, r["source"]) for p in r["images"]] for r in recs for _ in range(G)]
    batch = {k: v.to(device) for k, v in proc(prompts, images if any(images) else None, padding_side="left").items()}
    gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)  # the same samples after a resume
    model.eval()
    comp = model.generate(**batch, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          eos_token_id=proc.eos_token_id, generator=gen)
    model.train()
    sampled_image = comp == proc.image_token_id  # an <image> token with no image behind it: cut there, left out
    comp = torch.where(sampled_image.cumsum(1) > 0, proc.eos_token_id, comp)
    cmask, truncated = completion_mask(comp, proc.eos_token_id)
    truncated |= sampled_image.any(1)
    texts = [proc.decode(c[m]) for c, m in zip(comp, cmask)]
    ids, pmask = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
    regions = [region_tokens(proc, r, ids[i * G]) for i, r in enumerate(recs)]
    groups = (ids == proc.image_token_id).to(torch.uint8) | system_tokens(proc, ids, pmask).to(torch.uint8) << 1
    has_region = torch.tensor([regions[i // G] is not None for i in range(len(prompts))])
    for i in range(len(prompts)):
        if has_region[i]:
            groups[i] |= regions[i // G].to(torch.uint8) << 2
    # prompt + completion, each row shifted left past its padding
    P, T = ids.shape[1], ids.shape[1] + comp.shape[1]
    pad = (pmask == 0).sum(1)
    shift = (torch.arange(T)[None] + pad[:, None]) % T
    row = lambda x, y: torch.cat([x, y], 1).gather(1, shift)
    seq = {**{k: v for k, v in batch.items() if k.startswith("pixel")}, "completion": comp, "cmask": cmask,
           "input_ids": row(ids, comp.cpu()).to(device), "attention_mask": row(pmask, cmask.long().cpu()).to(device),
           "groups": row(groups, torch.zeros(comp.shape, dtype=torch.uint8)).to(device), "start": (P - pad).to(device)}
    return seq, truncated, texts, has_region.to(device)


def rewards_of(recs, texts, old, seq, has_region, cfg, avar_layers, region_layers, G):
    """-> total reward (B,) and its parts {accuracy, format, avar, region} (B,) each."""
    cmask, groups, device = seq["cmask"], seq["groups"], seq["cmask"].device
    right = torch.tensor([answers.is_right(recs[i // G], t) for i, t in enumerate(texts)], dtype=torch.float,
                         device=device)
    fmt = torch.tensor([float("Answer:" in t and bool(t.split("Answer:")[0].strip())) for t in texts], device=device)
    parts = {"accuracy": right, "format": fmt}
    masses, entropy = old["masses"], old["entropy"]
    if cfg.reward_avar:  # summed image attention / summed system attention, over heads, layers and tokens
        m = torch.stack([masses[l] for l in avar_layers]).double().sum((0, 2))  # (B, L, 3)
        m = (m * cmask[..., None]).sum(1)
        parts["avar"] = m[:, 0] / (m[:, 1] + cfg.eps) * right                   # only when the answer is right
    if cfg.reward_region:
        m = torch.stack([masses[l] for l in region_layers]).double().mean((0, 2))  # (B, L, 3): mean over heads
        n_image, n_region = (groups & 1).sum(1), ((groups >> 2) & 1).sum(1)
        parts["region"] = sayo_reward(m[..., 2], m[..., 0], n_region, n_image, entropy, cmask, cfg.region_top,
                                      cfg.eps) * has_region
    weights = {"accuracy": 1.0, "format": cfg.reward_format, "avar": cfg.reward_avar, "region": cfg.reward_region}
    parts = {k: v.float() for k, v in parts.items()}
    return sum(weights[k] * v for k, v in parts.items()), parts


# -----------------------------------------------------------------------------
# the loop


def train(cfg: GRPOConfig):
    import nanoattcot  # checkpoints, resume and the epoch order are the SFT loop's
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
    records = data.read_records(train_path, data.Skips())
    eval_records = data.read_records(eval_path, data.Skips())[:cfg.eval_limit or None]
    if not records or not eval_records:
        raise data.DataError(f"{train_path if not records else eval_path}: no usable record")
    ckpt = os.path.join(cfg.out, "checkpoint")
    resuming = cfg.resume and checkpoint.find_checkpoint(ckpt)
    proc = data.Processor.from_pretrained(cfg.init)
    start = VLM.from_pretrained(cfg.init, dtype=torch.float32).to(device).eval().requires_grad_(False)
    model = VLM.from_pretrained(ckpt if resuming else cfg.init, dtype=torch.float32).to(device)
    n_layers = len(model.layers)
    avar_layers, region_layers = layer_list(cfg.avar_layers, n_layers), layer_list(cfg.region_layers, n_layers)
    mass_layers = sorted(set(avar_layers * bool(cfg.reward_avar) + region_layers * bool(cfg.reward_region)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step, metrics, metrics_path = 0, [], os.path.join(cfg.out, "metrics.jsonl")
    if resuming:
        step, metrics = checkpoint.restore(ckpt, opt, metrics_path)
        log(f"resumed from {ckpt} at step {step}")
    log(f"grpo: {len(records)} prompts from {train_path}, {cfg.prompts_per_step} x {cfg.num_generations} completions "
        f"a step, rewards: accuracy 1, format {cfg.reward_format}, avar {cfg.reward_avar}, region {cfg.reward_region}")
    G, t0, tokens, first_step = cfg.num_generations, time.time(), 0, step  # the ETA counts the steps run here
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    try:
        while step < cfg.max_steps:
            recs = []
            for j in range(cfg.prompts_per_step):
                epoch, pos = divmod(step * cfg.prompts_per_step + j, len(records))
                recs.append(records[nanoattcot.epoch_order(cfg.seed, epoch, len(records))[pos]])
            seq, truncated, texts, has_region = rollouts(model, proc, recs, cfg, step, device)
            cmask = seq["cmask"]
            B, chunks = len(texts), [torch.arange(s, min(s + cfg.micro_batch, len(texts)), device=device)
                                     for s in range(0, len(texts), cfg.micro_batch)]
            old = {"logp": [], "entropy": [], "ref": [], "masses": {l: [] for l in mass_layers}}
            for rows in chunks:  # the rollouts' log-probs, entropies and masses, in chunks
                with amp():  # the same autocast as SFT
                    logp, entropy, masses = score(model, seq, rows, mass_layers, temperature=cfg.temperature)
                    ref = score(start, seq, rows, temperature=cfg.temperature)[0]
                old["logp"].append(logp)
                old["entropy"].append(entropy)
                old["ref"].append(ref)
                for l in mass_layers:
                    old["masses"][l].append(masses[l])
            old = {k: torch.cat(v) if isinstance(v, list) else {l: torch.cat(m) for l, m in v.items()} for k, v in old.items()}
            reward, parts = rewards_of(recs, texts, old, seq, has_region, cfg, avar_layers, region_layers, G)
            adv = advantages(reward.view(-1, G), not cfg.no_std_scale).flatten()
            loss_mask = (cmask & (~truncated[:, None] | cfg.keep_truncated)).float()
            n_tokens, n_seqs = loss_mask.sum().clamp(min=1), (loss_mask.sum(1) > 0).sum().clamp(min=1)
            for _ in range(cfg.inner_steps):
                loss_sum, kl_sum, n_clipped = 0.0, 0.0, 0
                for rows in chunks:
                    with amp():
                        logp = score(model, seq, rows, grad=True, temperature=cfg.temperature)[0]
                    per, (kl, clipped) = policy_loss(logp, old["logp"][rows], old["ref"][rows], adv[rows], loss_mask[rows], cfg)
                    loss = aggregate(per, loss_mask[rows], n_tokens, n_seqs, cfg.loss_agg)
                    loss.backward()
                    loss_sum, kl_sum, n_clipped = loss_sum + float(loss.detach()), kl_sum + float(kl), n_clipped + int(clipped)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            tokens += int(cmask.sum())
            zero = int((reward.view(-1, G).std(1) == 0).sum())
            row = {"step": step, "reward": float(reward.mean()), **{k: float(v.mean()) for k, v in parts.items()},
                   "completion_tokens": float(cmask.sum(1).float().mean()), "kl": kl_sum / float(n_tokens),
                   "clip_fraction": n_clipped / float(n_tokens), "truncated": int(truncated.sum()),
                   "zero_advantage_groups": zero, "loss": loss_sum}
            metrics.append(row)
            with open(metrics_path, "a" if metrics[:-1] else "w") as f:
                f.write(json.dumps(row) + "\n")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                dt = time.time() - t0
                done = step - first_step
                log(f"step {step:4d}/{cfg.max_steps} reward {row['reward']:.3f} ("
                    + ", ".join(f"{k} {row[k]:.3f}" for k in parts) + f") | acc {row.get('accuracy', float('nan')):.2f} "
                    f"len {row['completion_tokens']:.0f} kl {row['kl']:.4f} clip {row['clip_fraction']:.3f} "
                    f"trunc {row['truncated']} zero-adv {zero} | {tokens / dt:,.0f} tok/s | ETA {dt / done * (cfg.max_steps - step):.0f}s")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                checkpoint.save_checkpoint(ckpt, model, proc, opt, step, len(metrics), cfg)
    except KeyboardInterrupt:
        checkpoint.save_checkpoint(ckpt, model, proc, opt, step, len(metrics), cfg)
        log(f"interrupted: saved {ckpt} at step {step}; --resume continues")
        raise SystemExit(130)
    checkpoint.save_checkpoint(ckpt, model, proc, opt, step, len(metrics), cfg)
    model.save_pretrained(os.path.join(cfg.out, "model"))
    proc.save_pretrained(os.path.join(cfg.out, "model"))
    if metrics:
        draw.curves(metrics, os.path.join(cfg.out, "curves.png"),
                    keys=("reward", "accuracy", "format", "avar", "region", "completion_tokens", "kl", "clip_fraction"))
    return {"model": model, "start": start, "proc": proc, "metrics": metrics, "eval_records": eval_records,
            "train_records": records}


def run(cfg):
    """GRPO, then the eval report: the starting model against the trained one."""
    result = train(cfg)
    layers = list(range(len(result["model"].layers)))
    results = {}
    for name in ("start", "grpo"):
        results[name] = eval_mod.evaluate(result[name if name == "start" else "model"], result["proc"],
                                          result["eval_records"], result["train_records"], layers, log=print)
    print("\n" + eval_mod.table(results))
    meta = {"start": cfg.init, "steps": cfg.max_steps, "seed": cfg.seed, "n": len(result["eval_records"]),
            "rewards": f"accuracy 1, format {cfg.reward_format}, avar {cfg.reward_avar}, region {cfg.reward_region}"}
    report = eval_mod.write_report(results, cfg.out, meta, [("GRPO curves", "curves.png")])
    print(f"(report: {report})")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="nanoattcot.py grpo", description=__doc__.split("\n\n")[0].strip())
    consts = {"reward_avar": 0.3, "reward_region": 1.0}  # the flag alone turns the reward on at the papers' weight
    for f in fields(GRPOConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action="store_true")
        elif f.name in consts:
            p.add_argument(flag, type=float, nargs="?", const=consts[f.name], default=f.default)
        else:
            p.add_argument(flag, type=f.type, default=f.default)
    try:
        run(GRPOConfig(**vars(p.parse_args(argv))))
    except (ConfigError, data.DataError, CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
