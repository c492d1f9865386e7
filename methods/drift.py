"""
DRIFT's gradient bias (arXiv 2510.15050): Delta = prior - starting weights, once, for the language
model's attention and MLP projections; each gradient is pulled along Delta before clipping.
"""
import torch

from model import VLM, CheckpointError

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
