"""
The difficulty filter (arXiv 2509.03321, which released no code for it): keep the training records
whose success rate under the starting model lies in a band (hard, not hopeless).
"""
import collections
import hashlib
import json
import os
import time

import torch

import answers
from files import atomic_write
from generate import generate_answers

def success_rates(model, proc, records, k, batch_size=64, max_new_tokens=160, seed=0, log=None):
    """k answers per record sampled at temperature 1 (batched, KV cache) -> the share right per record."""
    repeated = [r for r in records for _ in range(k)]
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    texts = generate_answers(model, proc, repeated, batch_size, max_new_tokens, log=log,
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

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump({"k": k, "seed": seed, "rates": rates}, f)
        atomic_write(cache, write)
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
