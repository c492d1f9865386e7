"""
AVAR's attention objective (arXiv 2603.03825), beside Att-CoT: L = L_LM + a_img L_img + a_sys L_sys
with, per layer and head, L_img = -log(mean over (query, image key) pairs of the attention + 1e-6)
and L_sys = +log(mean over (query, system key) pairs + 1e-6), averaged over heads and layers; the
queries are the user's turn. From mass_kernel.attention_mass (pair mean = mass mean / key count), not
from the T x T matrix the released code materialises in every layer. docs/methods.md has the
formulas of every method.
"""
import torch

import data

# AVAR: query rows = the user's turn (its text and image tokens, data.P and data.V); key groups: the
# image, and the "system" tokens. SmolVLM has no system prompt, so "system" is the chat scaffolding
# before the user's content ("<|im_start|>User: ", data.S), which data.py tags.

AVAR_ROWS, AVAR_GROUPS = (data.P, data.V), ("image", "system")


def avar_terms(masses, layers, row_span, spans, eps=1e-6):
    """masses {layer: (B, Hq, Nq, 2)} on AVAR_ROWS over AVAR_GROUPS -> the summed per-sample terms,
    img_sum and sys_sum (samples without such keys left out); over avar_counts' counts of the step
    they are L_img and L_sys. Missing masses are an error: the released code falls back to plain LM
    loss without a word."""
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
    return {"img_sum": -(logs[:, 0] * has[:, 0]).sum(), "sys_sum": (logs[:, 1] * has[:, 1]).sum()}


def avar_counts(batches):
    """The samples with image keys and with system keys over all micro-batches of a step."""
    return {"img_count": sum(((b["spans"] == data.V).any(1)).sum() for b in batches).float(),
            "sys_count": sum(((b["spans"] == data.S).any(1)).sum() for b in batches).float()}
