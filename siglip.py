"""
The SigLIP vision tower of SmolVLM / Idefics3, over a variable-size patch grid: patch embedding,
position embeddings spread over the valid grid as transformers spreads them, bidirectional
attention blocks, a final LayerNorm. model.py puts the connector and the Llama decoder after it
(and maps its weights to the HF names).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    patch_size: int = 16
    image_size: int = 512
    layer_norm_eps: float = 1e-6
    num_channels: int = 3


def run_block(block, recompute, *args):
    """block(*args); with recompute (activation checkpointing) while training, its activations are
    not kept but recomputed in the backward: memory per block drops to its input."""
    if recompute and block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class VisionEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_size, self.side = c.patch_size, c.image_size // c.patch_size  # side: N patches per side
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(self.side**2, c.hidden_size)

    def forward(self, pixels, patch_mask):  # (n, 3, H, W), (n, H/p, W/p) bool
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (n, S, D), patches row-major
        # The valid nb_h x nb_w grid is spread over the N x N position table: coordinate k/nb falls
        # into bucket floor(k/nb * N). Same float32 arithmetic as transformers, so ids are identical.
        nb_h, nb_w = patch_mask[:, :, 0].sum(1), patch_mask[:, 0, :].sum(1)  # (n,)
        boundaries = torch.arange(1 / self.side, 1.0, 1 / self.side, device=pixels.device)
        rows = torch.arange(patch_mask.shape[1], device=pixels.device, dtype=torch.float32)
        cols = torch.arange(patch_mask.shape[2], device=pixels.device, dtype=torch.float32)
        frac_h = (rows[None] * (1.0 / nb_h)[:, None]).clamp(max=1 - 1e-6)
        frac_w = (cols[None] * (1.0 / nb_w)[:, None]).clamp(max=1 - 1e-6)
        ids_h = torch.bucketize(frac_h, boundaries, right=True)
        ids_w = torch.bucketize(frac_w, boundaries, right=True)
        ids = (ids_h[:, :, None] * self.side + ids_w[:, None, :]).flatten(1)
        ids = torch.where(patch_mask.flatten(1), ids, 0)  # padded patches keep id 0
        return x + self.position_embedding(ids)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.n_head = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(c.hidden_size, c.hidden_size) for _ in range(4))

    def forward(self, x, key_mask):  # (n, S, D), (n, 1, 1, S) bool or None
        n, S, D = x.shape
        q, k, v = (p(x).view(n, S, self.n_head, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # bidirectional
        return self.out_proj(y.transpose(1, 2).reshape(n, S, D))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = VisionAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x, key_mask):
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.fc2(F.gelu(self.fc1(self.layer_norm2(x)), approximate="tanh"))


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.layers = nn.ModuleList(VisionBlock(c) for _ in range(c.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.recompute = False  # activation checkpointing (VLM.checkpoint_activations)

    def forward(self, pixels, patch_mask):  # (n, 3, H, W), (n, H/p, W/p) -> (n, S, D)
        x = self.embeddings(pixels, patch_mask)
        key_mask = None if patch_mask.all() else patch_mask.flatten(1)[:, None, None, :]
        for layer in self.layers:
            x = run_block(layer, self.recompute, x, key_mask)
        return self.post_layernorm(x)
