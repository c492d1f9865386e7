"""
The SmolVLM / Idefics3 vision-language model in plain PyTorch, and its checkpoint I/O.

    image tiles -> SigLIP vision tower (siglip.py) -> pixel shuffle + linear (connector) -> features
    text ids    -> embeddings, with the features written over the <image> positions
                -> Llama decoder -> lm_head -> logits

Loads the open SmolVLM weights (HF safetensors, explicit key mapping) with logits that match
HF transformers, saves checkpoints transformers loads back, generates with a KV cache, and can
return per-layer attention masses over key groups (through mass_kernel.attention_mass) from the same
forward pass that computes the logits.
"""
import json
import math
import os
import pathlib
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from files import atomic_write, read_json
from siglip import VisionConfig, VisionTower, run_block


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded (a missing or corrupt file, a missing key, an
    unsupported config): the message names the file and the key."""


# -----------------------------------------------------------------------------
# config


@dataclass
class TextConfig:
    vocab_size: int = 49280
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    scale_factor: int = 4
    image_token_id: int = 49190
    tie_word_embeddings: bool = False
    model_type: str = "idefics3"  # or "smolvlm": same network, different HF class names

    @property
    def image_seq_len(self):  # <image> tokens per tile
        return (self.vision.image_size // self.vision.patch_size) ** 2 // self.scale_factor**2

    @classmethod
    def from_hf(cls, d: dict, source="config.json"):
        if not isinstance(d, dict) or d.get("model_type") not in ("idefics3", "smolvlm"):
            got = d.get("model_type") if isinstance(d, dict) else d
            raise CheckpointError(f"{source}: model_type {got!r} is not 'idefics3' or 'smolvlm'")
        v, t = d.get("vision_config", {}), d.get("text_config")
        if not isinstance(t, dict):
            raise CheckpointError(f"{source}: no text_config (the language model's settings)")
        need = lambda key: t[key] if key in t else _missing(source, "text_config", key)
        if v.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh" \
                or t.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: only gelu_pytorch_tanh (vision) and silu (text) activations "
                                  "are implemented")
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise CheckpointError(f"{source}: rope type {rope.get('rope_type')!r} is not implemented (only "
                                  "'default')")
        heads = t.get("num_attention_heads", 32)  # the Llama default; SmolVLM2-2.2B leaves it out
        text = TextConfig(
            vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"), num_attention_heads=heads,
            num_key_value_heads=t.get("num_key_value_heads") or heads,
            head_dim=t.get("head_dim") or need("hidden_size") // heads,
            rope_theta=t.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            max_position_embeddings=t.get("max_position_embeddings", 2048))
        vision = VisionConfig(**{f.name: v[f.name] for f in fields(VisionConfig) if f.name in v})
        # transformers ties on the top-level flag; older configs only set it inside text_config
        tie = d["tie_word_embeddings"] if "tie_word_embeddings" in d else t.get("tie_word_embeddings", False)
        return cls(vision=vision, text=text, scale_factor=d.get("scale_factor", 2),
                   image_token_id=d.get("image_token_id", t.get("image_token_id", 49190)),
                   tie_word_embeddings=bool(tie), model_type=d["model_type"])

    def to_hf(self) -> dict:
        cls = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[self.model_type]
        return {
            "model_type": self.model_type, "architectures": [f"{cls}ForConditionalGeneration"],
            "scale_factor": self.scale_factor, "image_token_id": self.image_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": {**self.vision.__dict__, "model_type": f"{self.model_type}_vision",
                              "hidden_act": "gelu_pytorch_tanh"},
            "text_config": {**self.text.__dict__, "model_type": "llama", "hidden_act": "silu",
                            "rope_parameters": {"rope_type": "default", "rope_theta": self.text.rope_theta},
                            "tie_word_embeddings": self.tie_word_embeddings},
        }


def pixel_shuffle(x, s):  # (n, S, D) -> (n, S/s^2, D*s^2): each s x s block of patches becomes one token
    n, S, D = x.shape
    h = w = math.isqrt(S)
    x = x.view(n, h, w // s, D * s).permute(0, 2, 1, 3)
    x = x.reshape(n, w // s, h // s, D * s * s).permute(0, 2, 1, 3)
    return x.reshape(n, S // (s * s), D * s * s)


# -----------------------------------------------------------------------------
# Llama decoder


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32, scale in the input dtype (as transformers)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(position_ids, head_dim, theta, dtype):  # (B, T) -> cos, sin (B, T, head_dim)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = position_ids[:, :, None].float() * inv_freq  # angles in fp32
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, H, T, d); half-split rotation, not interleaved
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


def fused_width(head_dim, num_groups):
    """The fused route's attention width: the head dim and the group bits, rounded up to a multiple of 8."""
    return -(-(head_dim + num_groups) // 8) * 8


class TextAttention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, extra_values=None):
        """x (B, T, C); mask (B, 1, T, Tk) bool, "causal" or None; cache: dict holding this layer's
        past k, v; extra_values (B, 1, Tk, G) or None: G more value columns, the same for every head.
        Returns the output, the post-RoPE q (B, Hq, T, d), k (B, Hkv, Tk, d) for attention masses, and
        the attention's output over the extra columns (B, Hq, T, G) (None without them)."""
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        causal = isinstance(mask, str)  # "causal": no padding, queries and keys aligned at the end
        if causal and T != k.shape[2]:  # a chunk after a cache: causal from the bottom-right
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            causal = False
        q_, k_ = q, k
        if extra_values is not None:  # V = [v, bits, zeros], q and k zero-padded to its width: the
            # same scores, one width (flash and memory-efficient kernels want q, k, v alike), a multiple
            # of 8 (the memory-efficient kernel's rule in 16 bits; else SDPA falls to its T x T math)
            G = extra_values.shape[-1]
            width = fused_width(self.hd, G)
            bits = extra_values.to(v.dtype).expand(-1, self.n_kv, -1, -1)
            v = F.pad(torch.cat([v, bits], -1), (0, width - self.hd - G))
            q_, k_ = F.pad(q, (0, width - self.hd)), F.pad(k, (0, width - self.hd))
        y = F.scaled_dot_product_attention(q_, k_, v, attn_mask=None if causal else mask, is_causal=causal,
                                           scale=self.hd ** -0.5, enable_gqa=self.n_kv != self.n_head)
        extra = None if extra_values is None else y[..., self.hd:self.hd + extra_values.shape[-1]]
        return self.o_proj(y[..., :self.hd].transpose(1, 2).reshape(B, T, -1)), q, k, extra


class TextBlock(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = TextAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, extra_values=None):
        a, q, k, extra = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, extra_values)
        x = x + a
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), q, k, extra


# -----------------------------------------------------------------------------
# the VLM


def small_config(vocab_size, image_token_id):
    """The teaching-size SmolVLM the synthetic set trains: 96 px images, 16 px patches, pixel shuffle 2 -> 9
    image tokens; 4 decoder layers of width 128."""
    return VLMConfig(vision=VisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=2,
                                         num_attention_heads=3, patch_size=16, image_size=96),
                     text=TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=512,
                                     num_hidden_layers=4,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                     rope_theta=10000.0,
                                     max_position_embeddings=2048),
                     scale_factor=2, image_token_id=image_token_id, model_type="smolvlm")


class VLM(nn.Module):
    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = c = config
        self.vision = VisionTower(c.vision)
        self.connector = nn.Linear(c.vision.hidden_size * c.scale_factor**2, c.text.hidden_size, bias=False)
        self.embed_tokens = nn.Embedding(c.text.vocab_size, c.text.hidden_size)
        self.layers = nn.ModuleList(TextBlock(c.text) for _ in range(c.text.num_hidden_layers))
        self.norm = RMSNorm(c.text.hidden_size, c.text.rms_norm_eps)
        self.lm_head = nn.Linear(c.text.hidden_size, c.text.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.recompute = False
        self.image_boost = None  # (f, layers) while boost_image_attention is on
        self.apply(self._init_weights)

    def boost_image_attention(self, f=1.0, layers=None):
        """The test-time intervention AVAR reports (it released no code): log(f) added to the scores of
        the image keys in `layers` (indices; None: all): their probabilities grow by f, then renormalise.
        f = 1 turns it off. (Flags spell layer sets as config.layer_set reads them.)"""
        layers = range(len(self.layers)) if layers is None else list(layers)
        if not f > 0 or not layers or not all(0 <= i < len(self.layers) for i in layers):
            raise ValueError(f"image attention boost {f} in layers {list(layers)}: want f > 0 and some of "
                             f"the model's {len(self.layers)} layers")
        # f = 1: off, SDPA's fused kernels again
        self.image_boost = (f, frozenset(layers)) if f != 1 else None

    def boost_at(self, layer):
        """The factor of the test-time intervention in that layer (1: none)."""
        return self.image_boost[0] if self.image_boost and layer in self.image_boost[1] else 1.0

    def checkpoint_activations(self, on=True):
        """Activation checkpointing for every vision and decoder block: recomputed in the backward.
        Attention masses are taken from the q, k each block returns, so they are unaffected."""
        self.recompute = self.vision.recompute = on
        return self

    @staticmethod
    def _init_weights(m):  # for from-scratch models; loading overwrites everything
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # --- image features and the merged input embeddings

    def image_features(self, pixel_values, pixel_attention_mask=None):
        """(B, N_img, 3, H, W) -> (n_real_images * image_seq_len, C): all-zero padding images dropped."""
        pixels = pixel_values.flatten(0, 1).to(self.connector.weight.dtype)
        real = (pixels != 0).flatten(1).any(1)
        if not real.any():
            real[0] = True  # as transformers: a batch of only padding still runs one image
        pixels = pixels[real]
        if pixel_attention_mask is None:
            pixel_mask = torch.ones_like(pixels[:, 0], dtype=torch.bool)
        else:
            pixel_mask = pixel_attention_mask.flatten(0, 1)[real].bool()
        p = self.config.vision.patch_size
        n, H, W = pixel_mask.shape
        patch_mask = pixel_mask.view(n, H // p, p, W // p, p).any(4).any(2)  # patch valid if any pixel is
        x = pixel_shuffle(self.vision(pixels, patch_mask), self.config.scale_factor)
        return self.connector(x).flatten(0, 1)

    def embed(self, input_ids, pixel_values=None, pixel_attention_mask=None, image_features=None):
        """image_features: what image_features(pixel_values, ...) would give, computed elsewhere (GRPO's
        completions of one prompt share one pass of its images through the vision tower)."""
        x = self.embed_tokens(input_ids)  # (B, T, C)
        if pixel_values is None and image_features is None:
            return x
        feats = self.image_features(pixel_values, pixel_attention_mask) if image_features is None \
            else image_features
        slots = input_ids == self.config.image_token_id
        if int(slots.sum()) != feats.shape[0]:
            raise ValueError(f"input_ids hold {int(slots.sum())} <image> tokens but the images give "
                             f"{feats.shape[0]} features ({feats.shape[0] // self.config.image_seq_len} "
                             f"tiles x {self.config.image_seq_len}); was the prompt expanded by the same "
                             "processor?")
        return x.masked_scatter(slots[..., None], feats.to(x.dtype))  # tiles in order, global image last

    # --- the decoder

    def decode(self, x, position_ids, attention_mask, cache=None, mass_layers=(), mass_fn=None,
               image_keys=None, mass_values=None):
        """x (B, T, C) embeddings; attention_mask (B, Tk) over all keys (past + new), 1 = real token;
        image_keys (B, Tk) bool (for boost_image_attention). mass_fn(layer, q, k) gets post-RoPE q, k
        on mass_layers. mass_values (B, 1, Tk, G), the fused route (masses.mass_fn): appended to V on
        mass_layers, and mass_fn gets the attention's output over them too: mass_fn(layer, q, k, out),
        out (B, Hq, T, G)."""
        if mass_layers and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError("attention masses need right padding: the kernel, reference and SDPA routes "
                             "see keys by position, so a padding key before a real token would count")
        mask = self.attention_bias(attention_mask, x.shape[1], shortcut=not self.image_boost)
        f, boost_layers = self.image_boost or (1.0, ())
        if boost_layers:  # in those layers a float mask: log f on the image keys' scores
            boosted = torch.where(mask, math.log(f) * image_keys[:, None, None, :].to(x.dtype),
                                  float("-inf"))
        cos, sin = rope_cos_sin(position_ids, self.config.text.head_dim, self.config.text.rope_theta,
                                x.dtype)
        masses = {}
        for i, layer in enumerate(self.layers):
            x, q, k, extra = run_block(layer, self.recompute, x, cos, sin,
                                       boosted if i in boost_layers else mask,
                                       None if cache is None else cache[i],
                                       mass_values if i in mass_layers else None)
            if i in mass_layers:
                masses[i] = mass_fn(i, q, k) if extra is None else mass_fn(i, q, k, extra)
        return self.lm_head(self.norm(x)), masses

    @staticmethod
    def attention_bias(attention_mask, T, shortcut=True):
        """(B, Tk) padding mask -> the (B, 1, T, Tk) bool mask for the last T queries, or (shortcut)
        "causal" / None when there is no padding, so that SDPA can take its fused causal kernels."""
        Tk = attention_mask.shape[1]
        if shortcut and bool(attention_mask.all()):
            return "causal" if T > 1 else None  # T == 1: one new token sees every key
        q_pos = torch.arange(Tk - T, Tk, device=attention_mask.device)
        k_pos = torch.arange(Tk, device=attention_mask.device)
        mask = (q_pos[:, None] >= k_pos[None, :])[None] & attention_mask[:, None, :].bool()  # (B, T, Tk)
        # a padding row with no visible key would give NaN: let it see itself (its output is unused)
        mask = mask | (~mask.any(-1, keepdim=True) & (q_pos[:, None] == k_pos[None, :]))
        return mask[:, None]

    def forward(self, input_ids, pixel_values=None, pixel_attention_mask=None, attention_mask=None,
                position_ids=None, mass_layers=(), mass_fn=None, image_features=None, mass_values=None):
        """input_ids (B, T) -> .logits (B, T, vocab), .masses {layer: mass_fn(layer, q, k)}.
        position_ids default to 0..T-1 as transformers' forward does; pass them for left padding.
        image_features: see embed; mass_values: see decode."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids, pixel_values, pixel_attention_mask, image_features)
        logits, masses = self.decode(x, position_ids, attention_mask, None, mass_layers, mass_fn,
                                     input_ids == self.config.image_token_id, mass_values)
        return SimpleNamespace(logits=logits, masses=masses)

    def train_flops(self, input_ids, attention_mask):
        """Matmul FLOPs of one forward + backward on this batch, the numerator of MFU: 6 per weight
        per token (2 forward, 4 backward; 4 for the patch embedding: pixels need no gradient) plus
        12 * layers * width per (query, key) pair of attention (q.k and p.v, the full square as is
        the convention). Real tokens only: padding is waste."""
        v, t = self.config.vision, self.config.text
        weights = lambda *mods: sum(m.weight.numel() for mod in mods for m in mod.modules()
                                    if isinstance(m, (nn.Linear, nn.Conv2d)))  # embedding lookups are free
        lengths = attention_mask.sum(1).double()
        text = 6 * lengths.sum() * weights(self.layers, self.lm_head) \
            + 12 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * (lengths ** 2).sum()
        tiles = int((input_ids == self.config.image_token_id).sum()) // self.config.image_seq_len
        patches = (v.image_size // v.patch_size) ** 2
        patch_embedding = weights(self.vision.embeddings.patch_embedding)
        per_tile = patches * (6 * weights(self.vision) - 2 * patch_embedding) \
            + 12 * v.num_hidden_layers * v.hidden_size * patches**2 \
            + 6 * self.config.image_seq_len * weights(self.connector)
        return float(text) + tiles * per_tile

    # --- generation

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, pixel_attention_mask=None, attention_mask=None,
                 max_new_tokens=64, temperature=0.0, top_p=1.0, eos_token_id=None, use_cache=True,
                 on_token=None, generator=None, num_samples=1):
        """Greedy (temperature 0) or nucleus sampling from a left-padded batch. Returns the new ids
        (B * num_samples, <= max_new_tokens), each prompt's samples together; rows that hit eos are
        filled with eos. on_token(ids) streams. A prompt's samples share one pass of its images through
        the vision tower and, with the cache, one prefill. A row that hits eos leaves the batch (its
        cache too): one long reply does not keep the finished rows computing."""
        n = num_samples
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        eos = torch.tensor([] if eos_token_id is None else eos_token_id, device=input_ids.device).flatten()
        x = self.embed(input_ids, pixel_values, pixel_attention_mask)
        image_keys = input_ids == self.config.image_token_id
        if not use_cache:  # every step runs the whole sequence: the samples' rows from the start
            x, mask, image_keys = (t.repeat_interleave(n, 0) for t in (x, mask, image_keys))
        cache = [{} for _ in self.layers] if use_cache else None
        B = input_ids.shape[0] * n
        out = torch.full((B, max_new_tokens), int(eos[0]) if eos.numel() else 0, dtype=torch.long,
                         device=input_ids.device)
        rows, step = torch.arange(B, device=input_ids.device), -1  # the batch rows still generating
        for step in range(max_new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
            if use_cache and step > 0:
                logits, _ = self.decode(x[:, -1:], pos[:, -1:], mask, cache, image_keys=image_keys)
            else:
                logits, _ = self.decode(x, pos, mask, cache, image_keys=image_keys)
                if use_cache and n > 1:  # after the one prefill, each prompt's samples get its cache
                    logits, x, mask, image_keys = (t.repeat_interleave(n, 0)
                                                   for t in (logits[:, -1:], x, mask, image_keys))
                    for c in cache:
                        c["k"], c["v"] = c["k"].repeat_interleave(n, 0), c["v"].repeat_interleave(n, 0)
            tok = sample(logits[:, -1].float(), temperature, top_p, generator)
            out[rows, step] = tok
            if on_token is not None:
                on_token(out[:, step])
            going = ~torch.isin(tok, eos)
            if not going.any():
                break
            if not going.all():  # drop the finished rows
                rows, x, mask, tok = rows[going], x[going], mask[going], tok[going]
                image_keys = image_keys[going]
                for c in cache or []:
                    c["k"], c["v"] = c["k"][going], c["v"][going]
            x = torch.cat([x, self.embed_tokens(tok[:, None])], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            image_keys = torch.cat([image_keys, torch.zeros_like(image_keys[:, :1])], 1)
        return out[:, :step + 1]

    # --- checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        config = VLMConfig.from_hf(read_json(os.path.join(path, "config.json"), CheckpointError),
                                   os.path.join(path, "config.json"))
        hf = _load_safetensors(path)
        stored_dtype = next(iter(hf.values())).dtype if hf else torch.float32
        with torch.device("meta"):
            model = cls(config)
        names = key_map(config)  # ours -> HF
        ours = model.state_dict()
        expected = set(names.values())
        missing = sorted(expected - hf.keys())
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        unexpected = sorted(hf.keys() - expected - tied)
        shapes = [f"{names[k]}: checkpoint {tuple(hf[names[k]].shape)}, model {tuple(v.shape)}"
                  for k, v in ours.items() if k in names and names[k] in hf
                  and hf[names[k]].shape != v.shape]
        if missing or unexpected or shapes:
            raise CheckpointError(f"checkpoint {path} does not fit its config.json:"
                             + "".join(f"\n  missing: {k}" for k in missing)
                             + "".join(f"\n  unexpected: {k}" for k in unexpected)
                             + "".join(f"\n  shape mismatch: {s}" for s in shapes))
        sd = {k: hf[names[k]] for k in names}
        if config.tie_word_embeddings:
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        model.load_state_dict(sd, assign=True, strict=True)
        if config.tie_word_embeddings:  # assign=True replaced the shared Parameter: share again
            model.lm_head.weight = model.embed_tokens.weight
        return model.to(device=device, dtype=dtype or stored_dtype)

    def save_pretrained(self, path, extra_config=None, without_adapters=False):
        """config.json + model.safetensors in the HF layout, each written to a temp file then renamed.
        A model with LoRA adapters (lora.py) is refused unless without_adapters (a checkpoint, which
        writes them beside): save them with lora.save_adapter, or fold them in with lora.merge."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        names = key_map(self.config)
        adapters = [k for k in self.state_dict() if ".lora_" in k]  # (lora.LoRALinear's lora_A, lora_B)
        if adapters and not without_adapters:
            raise ValueError(f"save_pretrained: the model has LoRA adapters ({adapters[0]}, ...): "
                             "lora.save_adapter writes them, lora.merge folds them in")
        sd = {names[k]: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
              if k in names and not (self.config.tie_word_embeddings and k == "lm_head.weight")}
        atomic_write(os.path.join(path, "model.safetensors"),
                      lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
        cfg = {**self.config.to_hf(), **(extra_config or {}),
               "dtype": str(self.lm_head.weight.dtype).split(".")[1]}
        atomic_write(os.path.join(path, "config.json"),
                      lambda tmp: pathlib.Path(tmp).write_text(json.dumps(cfg, indent=2)))


def key_map(c: VLMConfig) -> dict:
    """Our state_dict names -> the HF checkpoint names, spelled out (no regex)."""
    V, T = "model.vision_model.", "model.text_model."
    m = {
        "vision.embeddings.patch_embedding.weight": V + "embeddings.patch_embedding.weight",
        "vision.embeddings.patch_embedding.bias": V + "embeddings.patch_embedding.bias",
        "vision.embeddings.position_embedding.weight": V + "embeddings.position_embedding.weight",
        "vision.post_layernorm.weight": V + "post_layernorm.weight",
        "vision.post_layernorm.bias": V + "post_layernorm.bias",
        "connector.weight": "model.connector.modality_projection.proj.weight",
        "embed_tokens.weight": T + "embed_tokens.weight",
        "norm.weight": T + "norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    vision_layer = {
        "self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
        "self_attn.v_proj": "self_attn.v_proj", "self_attn.out_proj": "self_attn.out_proj",
        "layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
    }
    for i in range(c.vision.num_hidden_layers):
        for ours, theirs in vision_layer.items():
            for p in ("weight", "bias"):
                m[f"vision.layers.{i}.{ours}.{p}"] = f"{V}encoder.layers.{i}.{theirs}.{p}"
    text_layer = {
        "self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
        "self_attn.v_proj": "self_attn.v_proj", "self_attn.o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
        "input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
    }
    for i in range(c.text.num_hidden_layers):
        for ours, theirs in text_layer.items():
            m[f"layers.{i}.{ours}.weight"] = f"{T}layers.{i}.{theirs}.weight"
    if c.tie_word_embeddings:
        del m["lm_head.weight"]
    return m


def sample(logits, temperature=0.0, top_p=1.0, generator=None):  # (B, V) -> (B,)
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        p, idx = probs.sort(-1, descending=True)
        p[(p.cumsum(-1) - p) >= top_p] = 0
        probs = torch.zeros_like(probs).scatter(-1, idx, p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# -----------------------------------------------------------------------------
# file helpers


def _missing(source, section, key):
    raise CheckpointError(f"{source}: {section} has no {key!r}")


def _load_file(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:  # truncated, corrupt or not safetensors at all
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _load_safetensors(path):
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return _load_file(single)
    if os.path.exists(index):
        weight_map = read_json(index, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            _missing(index, "the index", "weight_map")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_load_file(os.path.join(path, shard)))
        return tensors
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
