"""
LoRA adapters (Hu et al. 2021) on the model's linear layers, saved and read in PEFT's format, so that
an adapter trained here loads with `PeftModel.from_pretrained` onto transformers' SmolVLM, and one
PEFT wrote loads here.

A frozen linear W (out, in) gets a trainable low-rank update: y = x W^T + b + s * dropout(x) A^T B^T,
A (r, in) drawn as PEFT draws it (Kaiming uniform), B (out, r) zeros (so training starts at the base
model), s = alpha / r. Optimizer state and gradients shrink to the adapters': about 2 r (in + out)
numbers per adapted layer instead of in * out.

    add_lora(model, r=16, alpha=32)                     # every decoder linear by default; the rest frozen
    save_adapter(model, "out/adapter", base="SmolVLM-256M-Instruct")   # adapter_config.json + weights
    load_adapter(model, "out/adapter")                  # ours or PEFT's
    merge(model)                                        # W += s B A, plain linears again

PEFT's names are transformers' module paths under "base_model.model.", with ".lora_A.weight" and
".lora_B.weight" (model.key_map gives the paths); its adapter_config.json names the targets as a
regex over those paths.
"""
import json
import math
import os
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from files import atomic_write
from model import VLM, CheckpointError, _load_file, key_map

# the decoder's linears, by the name each has in a TextBlock
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus B A. Keeps the linear's weight (and bias) under their own names, so the
    model's state_dict names for them, and so its HF key map, do not change."""
    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        like = {"device": base.weight.device, "dtype": base.weight.dtype}  # (training keeps the model fp32)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init of A (nn.Linear's own)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        update = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def merged(self):  # -> nn.Linear with W + s B A
        out = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scaling * (self.lora_B @ self.lora_A).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def hf_paths(model: VLM):
    """Our module paths -> transformers' (from model.key_map: "layers.0.gate_proj" ->
    "model.text_model.layers.0.mlp.gate_proj")."""
    return {ours[:-len(".weight")]: theirs[:-len(".weight")]
            for ours, theirs in key_map(model.config).items() if ours.endswith(".weight")}


def targets_regex(paths):
    """PEFT's target_modules as a regex that full-matches exactly these transformers module paths."""
    return "(" + "|".join(p.replace(".", r"\.") for p in sorted(paths)) + ")"


def adapted(model):  # -> {our module path: LoRALinear}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace(model, path, module):
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_lora(model: VLM, r, alpha, dropout=0.0, targets=TARGETS, paths=None):
    """Freezes the whole model and puts a fresh adapter on each decoder linear named in targets (or on
    exactly `paths`, our module paths, as load_adapter does) -> the adapted paths."""
    if r < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {r}")
    model.requires_grad_(False)
    if paths is None:
        attention = ("q_proj", "k_proj", "v_proj", "o_proj")  # (the MLP's linears sit in the block itself)
        paths = [f"layers.{i}.{'self_attn.' if t in attention else ''}{t}"
                 for i in range(len(model.layers)) for t in targets]
    for path in paths:
        base = model.get_submodule(path)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRA target {path} is a {type(base).__name__}, not a linear layer")
        _replace(model, path, LoRALinear(base, r, alpha, dropout).train(model.training))  # (its dropout)
    return list(paths)


def save_adapter(model: VLM, path, base=""):
    """adapter_config.json + adapter_model.safetensors in PEFT's format, each written atomically."""
    from safetensors.torch import save_file
    layers = adapted(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    first = next(iter(layers.values()))
    to_hf = hf_paths(model)
    tensors = {}
    for ours, m in layers.items():
        tensors[f"{PREFIX}{to_hf[ours]}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{to_hf[ours]}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "r": first.r,
              "lora_alpha": first.alpha, "lora_dropout": first.dropout.p, "bias": "none",
              "target_modules": targets_regex(to_hf[p] for p in layers), "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
              "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}}
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, WEIGHTS), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(os.path.join(path, CONFIG),
                 lambda tmp: pathlib.Path(tmp).write_text(json.dumps(config, indent=2)))


def read_config(path):
    file = os.path.join(path, CONFIG)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: not found (an adapter folder holds {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads(pathlib.Path(file).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    unsupported = [f"{k} {config.get(k)!r}" for k, ok in (
        ("peft_type", config.get("peft_type") == "LORA"), ("use_dora", not config.get("use_dora")),
        ("use_rslora", not config.get("use_rslora")), ("fan_in_fan_out", not config.get("fan_in_fan_out")),
        ("rank_pattern", not config.get("rank_pattern")), ("alpha_pattern", not config.get("alpha_pattern")),
        ("modules_to_save", not config.get("modules_to_save"))) if not ok]
    if unsupported:
        raise CheckpointError(f"{file}: only plain LoRA adapters load here ({', '.join(unsupported)})")
    return config


def load_adapter(model: VLM, path, trainable=False):
    """Puts the adapter in path (ours or one PEFT wrote) on the model: each lora_A / lora_B tensor goes to
    the module transformers names it for; a tensor for a module the model lacks, or of the wrong shape,
    is an error naming it -> the adapted paths. trainable: the adapters train (a resumed run)."""
    config = read_config(path)
    tensors = _load_file(os.path.join(path, WEIGHTS))
    from_hf = {theirs: ours for ours, theirs in hf_paths(model).items()}
    found = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        for part in ("lora_A", "lora_B"):
            module = name.removesuffix(f".{part}.weight").removesuffix(f".{part}.default.weight")
            if module != name:
                break
        else:
            raise CheckpointError(f"{path}/{WEIGHTS}: unexpected tensor {key}")
        if module not in from_hf:
            raise CheckpointError(f"{path}/{WEIGHTS}: {key} is for {module}, which the model does not have")
        found.setdefault(from_hf[module], {})[part] = value
    incomplete = [p for p, v in found.items() if len(v) != 2]
    if incomplete or not found:
        raise CheckpointError(f"{path}/{WEIGHTS}: " + (f"lora_A or lora_B missing for {incomplete[0]}"
                                                         if incomplete else "no LoRA tensors"))
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    paths = add_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                     paths=list(found))
    for ours, m in adapted(model).items():
        for part, value in found[ours].items():
            target = getattr(m, part)
            if value.shape != target.shape:
                raise CheckpointError(f"{path}/{WEIGHTS}: {part} of {ours} is {tuple(value.shape)}, "
                                      f"the model wants {tuple(target.shape)} (r = {config['r']})")
            with torch.no_grad():
                target.copy_(value)
            target.requires_grad_(trainable)
    if not trainable:  # a loaded adapter for inference leaves the rest as it was
        for n, p in model.named_parameters():
            p.requires_grad_(frozen.get(n, False))
    return paths


def merge(model: VLM):
    """Folds every adapter into its linear (W + s B A): a plain model again, saved as any other."""
    for path, m in adapted(model).items():
        _replace(model, path, m.merged())
    return model


def load(model_dir, adapter=None, dtype=None, device=None):
    """The model in model_dir with the adapter in `adapter` (if any) folded in: what eval.py and
    generate.py run."""
    model = VLM.from_pretrained(model_dir, dtype=dtype, device=device)
    if adapter:
        load_adapter(model, adapter)
        merge(model)
    return model
