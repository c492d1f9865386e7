"""
The wiring between data.py's spans and mass_kernel.attention_mass: which query rows, which key groups,
and the hook the model calls with each chosen layer's q and k. Every attention statistic in the
project (Att-CoT, AVAR, eval's profiles, GRPO's rewards) is built here, so a group's name means
the same tokens everywhere.

    rows, q_pos, row_span = query_rows(spans, (data.R, data.A))       # the reply's tokens
    groups = key_groups(spans, ("image", "rationale+image"))          # bit 0, bit 1
    hook = mass_fn(rows, q_pos, groups, 2)                            # its route: hook.route
    out = model(..., mass_layers=layers, mass_fn=hook, mass_values=hook.values)
    out.masses[layer]                                                # (B, Hq, Nq, 2)
"""
import torch

import data
import mass_kernel

# a key group's name -> the spans whose tokens it holds
GROUPS = {
    "image": (data.V,),
    "rationale": (data.R,),
    "rationale+image": (data.R, data.V),
    "user+rationale": (data.P, data.V, data.R),  # everything the user gave, and the rationale
    "system": (data.S,),             # the chat scaffolding before the user's content (AVAR's "system")
}


def key_groups(spans, names, extra=()):
    """spans (B, T) -> (B, T) uint8 key groups for mass_kernel.attention_mass: bit j set on the tokens of
    GROUPS[names[j]], then one more bit per (B, T) bool mask in extra (a group no span tags, such as
    SAYO's evidence region)."""
    out = torch.zeros(spans.shape, dtype=torch.uint8, device=spans.device)
    bits = [torch.isin(spans, torch.tensor(GROUPS[name], device=spans.device)) for name in names]
    for j, bit in enumerate(bits + list(extra)):
        out |= bit.to(torch.uint8) << j
    return out


def query_rows(spans, kinds=(data.R, data.A)):
    """spans (B, T) -> the query rows masses are taken for: the tokens of the spans in kinds (the
    reply by default), in order. rows (B, Nq) token indices; q_pos (B, Nq) their positions, -1 on
    padding rows (they see no key); row_span (B, Nq) the span of each row, 0 on padding."""
    is_row = torch.isin(spans, torch.tensor(kinds, device=spans.device))
    Nq = max(int(is_row.sum(1).max()), 1)
    rows = torch.sort((~is_row).int(), dim=1, stable=True).indices[:, :Nq]  # row tokens first, in order
    valid = torch.gather(is_row, 1, rows)
    return rows, torch.where(valid, rows, -1), torch.where(valid, torch.gather(spans, 1, rows), 0)


def take_rows(q, rows):
    """q (B, H, T, d) -> (B, H, Nq, d): the query rows that query_rows picked."""
    return torch.gather(q, 2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))


def mass_fn(rows, q_pos, groups, num_groups, impl="auto", boost=None):
    """The model's mass hook: (layer, q (B, Hq, T, d), k (B, Hkv, T, d)) -> the attention masses of
    the query rows `rows` (positions q_pos, as query_rows gives them) over the key groups,
    (B, Hq, Nq, num_groups). impl: a route of mass_kernel's or "auto", resolved there (hook.route
    shows which; on a GPU "auto" is decided at each call, on its q). On the fused route the group
    bits ride along as extra value columns in the model's own attention call: pass hook.values to
    the model as mass_values, and the attention's output over them is every row's masses, at almost
    no cost, those of the attention the model ran (its padding mask and any boost included).
    boost(layer) -> f: the masses as the test-time intervention (model.boost_image_attention) makes
    them, its factor f on group 0, which must then be the image (mass_kernel.boosted)."""
    def hook(layer, q, k, out=None):
        if out is not None:  # fused: (B, Hq, T, G) masses of every row, the boost already in them
            return take_rows(out, rows).to(mass_kernel.acc_dtype(out)) * (q_pos >= 0)[:, None, :, None]
        m = mass_kernel.attention_mass(take_rows(q, rows), k, q_pos, groups, num_groups=num_groups, impl=impl)
        return m if boost is None else mass_kernel.boosted(m, boost(layer))
    hook.route = mass_kernel.resolve(impl, groups.device)  # a GPU's "auto" is decided per call, on q
    hook.values = mass_kernel.group_bits(groups, num_groups, torch.float32) if hook.route == "fused" else None
    return hook
