"""
Attention mass over masked key groups, without materialising the attention matrix.

    mass = attention_mass(q, k, q_pos, key_groups, num_groups=1, scale=None)
    q          (B, Hq, Nq, D)  post-RoPE query rows (only the rows you need)
    k          (B, Hkv, Tk, D) post-RoPE keys, Hq a multiple of Hkv (GQA)
    q_pos      (B, Nq) int     each row's position in the key sequence: keys j <= q_pos are visible
    key_groups (B, Tk) uint8   bit g set = key j is in group g (up to 8 groups)
    mass       (B, Hq, Nq, num_groups) float32 = sum over visible keys of group g of softmax_j(scale q.k_j)

Differentiable in q and k. The four routes, and when "auto" takes each (resolve decides, the one
place that does):
  "cuda"       kernels.cu (built on first use with torch.utils.cpp_extension): auto's on a GPU of
               sm_80+, head dim 64 or 128, fp32/bf16/fp16, once it has passed its self-check;
  "sdpa"       the stock route a user could take instead: the mass is attention with V = the one-hot
               group bits, so one scaled_dot_product_attention call gives it: auto's on a GPU where
               the kernel cannot run (no build, another head dim or dtype, a failed check);
  "fused"      the same V = bits trick inside the model's own attention call (masses.mass_fn, whose
               bits ride as extra value columns, model.decode): auto's on the CPU, where
               python -m bench.train measured it fastest; a bare attention_mass call has no model
               attention to ride in, and there the reference stands in;
  "reference"  the chunked PyTorch version below, the same math as the kernel (forward with the row
               log-sum-exp, backward recomputing p), always in fp32 (autocast does not reach it): the
               oracle of the tests and of the self-check. python -m bench.kernels times them.

    python mass_kernel.py --build    build the extension (no GPU needed; CI does this)
    python mass_kernel.py --check    the CUDA op against the reference on random inputs (GPU)
    python -m bench.kernels          timing and memory table (GPU)
"""
import math
import os
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_HEAD_DIMS = (64, 128)
_ext, _ext_error, _warned = None, None, set()


def _find_cuda_home():
    """torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper script elsewhere: look
    for a folder that holds the headers instead (CUDA_HOME wins when set)."""
    import shutil
    nvcc = shutil.which("nvcc")
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda",
                 nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))):
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def load_extension(verbose=False):
    """Build (once, cached by torch in ~/.cache/torch_extensions) and import kernels.cu."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            cuda_home = _find_cuda_home()
            if cuda_home:
                os.environ["CUDA_HOME"] = cuda_home  # read when cpp_extension is first imported
            from torch.utils.cpp_extension import load
            if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # no GPU to ask: build for Ampere and Hopper
            _ext = load(name="nanoattcot_kernels", sources=[os.path.join(HERE, "kernels.cu")],
                        extra_cuda_cflags=["-O3", "--use_fast_math"], verbose=verbose)
        except Exception as e:  # no nvcc, no CUDA torch, a compile error: say why, once
            _ext_error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
    return _ext


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


ROUTES = ("cuda", "sdpa", "fused", "reference")


def resolve(impl, device, q=None):
    """impl as asked -> the route that runs. "auto": "cuda" where the kernel can run for q and has
    passed its self-check (a failed check warns once and falls back to "sdpa"); else "sdpa" on a
    GPU and "fused" on the CPU (a bare attention_mass call, outside a model's attention, computes
    "fused" by the reference). Without q (a hook made before the model runs): "fused" on the CPU,
    and on a GPU "auto" stays, decided at each call, whose q autocast may have cast. "cuda" asked
    and failing its self-check raises."""
    if impl not in (*ROUTES, "auto"):
        raise ValueError(f"mass route {impl!r}: one of auto, {', '.join(ROUTES)}")
    if impl not in ("auto", "cuda"):
        return impl
    if q is None:
        return "fused" if impl == "auto" and torch.device(device).type != "cuda" else impl
    use_cuda = impl == "cuda" or _use_cuda(q)
    failed = use_cuda and self_check(q.device, q.dtype, q.shape[-1])
    if failed and impl == "cuda":
        raise RuntimeError(f"attention_mass: the CUDA kernel failed its self-check: {failed}")
    if failed:
        _warn_once("self-check", f"attention_mass: the CUDA kernel failed its self-check ({failed}); "
                                 "using the SDPA route (impl='sdpa') from now on")
    if use_cuda and not failed:
        return "cuda"
    return "sdpa" if failed or q.is_cuda else "fused"


def _use_cuda(q):
    if not q.is_cuda:
        return False
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        _warn_once("dtype",
                   f"attention_mass: {q.dtype} has no CUDA kernel (fp32, bf16, fp16); using the SDPA "
                   "route")
        return False
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        _warn_once("dim", f"attention_mass: head dim {q.shape[-1]} has no CUDA kernel "
                          f"(built for {CUDA_HEAD_DIMS}); using the SDPA route")
        return False
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        _warn_once("arch",
                   "attention_mass: the CUDA kernel needs sm_80 or newer; using the SDPA route")
        return False
    if load_extension() is None:
        _warn_once("build",
                   f"attention_mass: CUDA extension unavailable ({_ext_error}); using the SDPA route")
        return False
    return True


# -----------------------------------------------------------------------------
# the reference: chunks of query rows, so at most chunk x Tk scores exist at once


def acc_dtype(x):  # fp32 accumulation; float64 stays float64 (for gradcheck)
    return torch.promote_types(x.dtype, torch.float32)


def group_bits(key_groups, num_groups, dtype):  # (B, Tk) uint8 -> (B, 1, Tk, G) of 0/1
    shifts = torch.arange(num_groups, device=key_groups.device)
    return ((key_groups.long()[..., None] >> shifts) & 1).to(dtype)[:, None]


def _chunk_scores(q, k, q_pos, s, e):
    """scale-free scores for rows s:e (B, Hq, c, Tk) and which keys they see; k is (B, Hq, Tk, D), upcast."""
    visible = torch.arange(k.shape[2], device=q.device) <= q_pos[:, None, s:e, None]
    return q[:, :, s:e].to(k.dtype) @ k.transpose(-1, -2), visible


def _probs(scores, visible, lse):  # p from the row log-sum-exp; 0 on keys a row does not see
    return torch.exp(scores - lse[..., None]).masked_fill(~visible, 0.0)


def reference_forward(q, k, q_pos, key_groups, num_groups, scale, chunk=256):
    B, Hq, Nq, D = q.shape
    kf = k.to(acc_dtype(k)).repeat_interleave(Hq // k.shape[1], dim=1)
    bits = group_bits(key_groups, num_groups, kf.dtype)
    mass, lse = [], []
    for s in range(0, Nq, chunk):
        scores, visible = _chunk_scores(q, kf, q_pos, s, s + chunk)
        scores = scale * scores
        row_lse = torch.logsumexp(scores.masked_fill(~visible, -math.inf), -1)  # -inf: no visible key
        row_lse = torch.where(torch.isfinite(row_lse), row_lse, math.inf)  # then p = 0 everywhere
        lse.append(row_lse)
        mass.append(_probs(scores, visible, row_lse) @ bits)
    return torch.cat(mass, 2), torch.cat(lse, 2)


def reference_backward(dmass, q, k, q_pos, key_groups, mass, lse, scale, chunk=256):
    """dS = p * (dm . bits_j - dm . m), dQ = scale dS K, dK = scale dS^T Q summed over the GQA group."""
    B, Hq, Nq, D = q.shape
    Hkv, G = k.shape[1], mass.shape[-1]
    kf = k.to(acc_dtype(k)).repeat_interleave(Hq // Hkv, dim=1)
    bits = group_bits(key_groups, G, kf.dtype)  # (B, 1, Tk, G)
    dq, dk = torch.zeros(q.shape, device=q.device, dtype=kf.dtype), torch.zeros_like(kf)
    for s in range(0, Nq, chunk):
        e = min(s + chunk, Nq)
        scores, visible = _chunk_scores(q, kf, q_pos, s, e)
        p = _probs(scale * scores, visible, lse[:, :, s:e])
        dm = dmass[:, :, s:e].to(kf.dtype)
        dS = p * (dm @ bits.transpose(-1, -2) - (dm * mass[:, :, s:e]).sum(-1, keepdim=True))
        dq[:, :, s:e] = scale * dS @ kf
        dk += scale * dS.transpose(-1, -2) @ q[:, :, s:e].to(kf.dtype)
    dk = dk.view(B, Hkv, Hq // Hkv, *k.shape[2:]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype)


def bits_as_values(key_groups, num_groups, head_dim, n_kv_heads, dtype):
    """(B, Tk) group bits -> V (B, Hkv, Tk, head_dim): the bits in the first num_groups columns, zeros
    after (attention backends want V as wide as q), so attention with this V gives the masses."""
    bits = group_bits(key_groups, num_groups, dtype)  # (B, 1, Tk, G)
    return torch.nn.functional.pad(bits, (0, max(head_dim - num_groups, 0))).expand(-1, n_kv_heads, -1, -1)


def sdpa_mass(q, k, q_pos, key_groups, num_groups, scale):
    """The stock route: m_i(G) = sum_j p_ij bits_j(G) is attention with V = the group bits, so one
    SDPA call gives the masses, and autograd their gradients. The visibility mask is a dense
    (B, 1, Nq, Tk) bool. A row that sees no key is let see key 0, then zeroed (a fully masked row
    would give NaN)."""
    B, Hq, Nq, D = q.shape
    v = bits_as_values(key_groups, num_groups, D, k.shape[1], q.dtype)
    visible = torch.arange(k.shape[2], device=q.device) <= q_pos.clamp(min=0)[:, None, :, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale,
                                                           enable_gqa=Hq != k.shape[1])
    return out[..., :num_groups].float() * (q_pos >= 0)[:, None, :, None]


# -----------------------------------------------------------------------------
# the op: torch.library custom ops, so autograd and torch.compile see one opaque node


@torch.library.custom_op("nanoattcot::mass_fwd", mutates_args=())
def _mass_fwd(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, key_groups: torch.Tensor,
              num_groups: int, scale: float, use_cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_cuda:
        mass, lse = load_extension().forward(q.contiguous(), k.contiguous(), q_pos.int().contiguous(),
                                             key_groups.contiguous(), num_groups, scale)
        return mass, lse
    with torch.autocast(q.device.type, enabled=False):  # the body would run its matmuls in bf16
        return reference_forward(q, k, q_pos, key_groups, num_groups, scale)


@_mass_fwd.register_fake
def _(q, k, q_pos, key_groups, num_groups, scale, use_cuda):
    B, Hq, Nq, _ = q.shape
    return (q.new_empty(B, Hq, Nq, num_groups, dtype=acc_dtype(q)),
            q.new_empty(B, Hq, Nq, dtype=acc_dtype(q)))


@torch.library.custom_op("nanoattcot::mass_bwd", mutates_args=())
def _mass_bwd(dmass: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor,
              key_groups: torch.Tensor, mass: torch.Tensor, lse: torch.Tensor, scale: float,
              use_cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_cuda:
        dq, dk = load_extension().backward(dmass.contiguous(), q.contiguous(), k.contiguous(),
                                           q_pos.int().contiguous(),
                                           key_groups.contiguous(), mass, lse, scale)
        return dq, dk
    with torch.autocast(q.device.type, enabled=False):
        return reference_backward(dmass, q, k, q_pos, key_groups, mass, lse, scale)


@_mass_bwd.register_fake
def _(dmass, q, k, q_pos, key_groups, mass, lse, scale, use_cuda):
    # contiguous, as both backends return them (k is a transposed view in the model: not empty_like)
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    q, k, q_pos, key_groups, num_groups, scale, use_cuda = inputs
    ctx.save_for_backward(q, k, q_pos, key_groups, *output)
    ctx.scale, ctx.use_cuda = scale, use_cuda


def _backward(ctx, dmass, dlse):
    q, k, q_pos, key_groups, mass, lse = ctx.saved_tensors
    dq, dk = _mass_bwd(dmass, q, k, q_pos, key_groups, mass, lse, ctx.scale, ctx.use_cuda)
    return dq, dk, None, None, None, None, None


_mass_fwd.register_autograd(_backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# the kernel checks itself before it is trusted: a wrong kernel must never train by default

SELF_CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}  # relative L2 error
_verdicts = {}  # (device, dtype, head dim) -> None: the kernel passed; else what failed


def self_check(device, dtype, head_dim):
    """The kernel against the reference on a small problem shaped like a real call: GQA (6 query
    heads on 2), 3 groups, ragged q_pos with padding rows (-1), Nq = 70 and Tk = 150 so that query
    and key tiles are cut at both ends; the masses and both gradients compared by relative L2 error
    within the dtype's tolerance. -> None if it passed, else one line naming the worst error and
    the shape. Run once per (device, dtype, head dim) and process (two small forward + backward
    pairs, one of them the reference's)."""
    key = (str(device), dtype, head_dim)
    if key not in _verdicts:
        B, Hq, Hkv, Nq, Tk, G = 2, 6, 2, 70, 150, 3
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, Hq, Nq, head_dim, generator=g).to(device, dtype)
        k = torch.randn(B, Hkv, Tk, head_dim, generator=g).to(device, dtype)
        q_pos = torch.randint(0, Tk, (B, Nq), generator=g).sort(1).values
        q_pos[1, -9:] = -1  # padding rows see no key
        groups = torch.randint(0, 2**G, (B, Tk), generator=g).to(torch.uint8)
        upstream = torch.randn(B, Hq, Nq, G, generator=g).to(device)
        errs = kernel_errors(q, k, q_pos.to(device), groups.to(device), G, upstream)
        worst = max(errs, key=lambda n: errs[n] if math.isfinite(errs[n]) else math.inf)
        tol = SELF_CHECK_TOL[dtype]
        _verdicts[key] = None if all(math.isfinite(e) and e <= tol for e in errs.values()) else (
            f"{worst} off by {errs[worst]:.2e} (relative L2, tolerance {tol:g}) on {device}, "
            f"{str(dtype)[6:]}, q {(B, Hq, Nq, head_dim)}, k {(B, Hkv, Tk, head_dim)}, {G} groups")
    return _verdicts[key]


def kernel_errors(q, k, q_pos, key_groups, num_groups, upstream):
    """The kernel against the reference on one problem: the relative L2 errors of the masses and of
    both gradients (under the upstream gradient `upstream`), {"mass", "dq", "dk"}."""
    outs = []
    # fp32 and with gradients wherever it is called from (eval runs under no_grad)
    with torch.enable_grad(), torch.autocast(q.device.type, enabled=False):
        for use_cuda in (True, False):
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            mass, _ = _mass_fwd(qq, kk, q_pos, key_groups, num_groups, q.shape[-1] ** -0.5, use_cuda)
            (mass * upstream).sum().backward()
            outs.append((mass.detach(), qq.grad, kk.grad))
    return {name: float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))
            for name, a, b in zip(("mass", "dq", "dk"), *outs)}


def attention_mass(q, k, q_pos, key_groups, num_groups=1, scale=None, impl="auto"):
    """See the module docstring. impl: a route or "auto" (resolve); "fused" is the reference here,
    outside a model's attention."""
    if (q.dim() != 4 or k.dim() != 4 or k.shape[1] == 0 or q.shape[1] % k.shape[1]
            or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]):
        raise ValueError(f"attention_mass: q {tuple(q.shape)} and k {tuple(k.shape)} do not fit "
                         "(B, Hq, Nq, D) and (B, Hkv, Tk, D) with Hq a multiple of Hkv >= 1")
    if tuple(q_pos.shape) != (q.shape[0], q.shape[2]) or q_pos.dtype.is_floating_point:
        raise ValueError(f"attention_mass: q_pos must be integer (B, Nq) = {(q.shape[0], q.shape[2])}; "
                         f"got {q_pos.dtype} {tuple(q_pos.shape)}")
    if len({q.device, k.device, q_pos.device, key_groups.device}) > 1:
        raise ValueError(f"attention_mass: inputs on different devices (q {q.device}, k {k.device}, "
                         f"q_pos {q_pos.device}, key_groups {key_groups.device})")
    if (not 1 <= num_groups <= 8 or key_groups.dtype != torch.uint8
            or key_groups.shape != (k.shape[0], k.shape[2])):
        raise ValueError(f"attention_mass: key_groups must be uint8 (B, Tk) = {(k.shape[0], k.shape[2])} "
                         f"and num_groups 1..8; got {key_groups.dtype} {tuple(key_groups.shape)}, "
                         f"{num_groups}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    route = resolve(impl, q.device, q)
    if route == "sdpa":
        return sdpa_mass(q, k, q_pos, key_groups, num_groups, scale)
    mass, _ = _mass_fwd(q, k, q_pos, key_groups, num_groups, scale, route == "cuda")
    return mass


def boosted(mass, f, group=0):
    """Masses (..., G) -> the masses when log f is added to the scores of one group's keys (the
    test-time intervention of model.boost_image_attention): that group's probabilities times f,
    renormalised, m'(G) = m(G) f^[G is the group] / (1 + (f - 1) m(group)). Every other group must
    be disjoint from it."""
    if f == 1:
        return mass
    scale = torch.ones(mass.shape[-1], dtype=mass.dtype, device=mass.device)
    scale[group] = f
    return mass * scale / (1 + (f - 1) * mass[..., group:group + 1])


def check(shapes=((2, 9, 3, 1000, 1000, 64, 2), (1, 4, 2, 333, 517, 128, 8))):
    """The CUDA op against the reference on random inputs: forward and both gradients, per dtype."""
    print(f"{'shape':>30s} {'dtype':>9s} {'mass':>9s} {'dq':>9s} {'dk':>9s}   (relative L2 error)")
    for B, Hq, Hkv, Nq, Tk, D, G in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(B, Hq, Nq, D, device="cuda", dtype=dtype, generator=g)
            k = torch.randn(B, Hkv, Tk, D, device="cuda", dtype=dtype, generator=g)
            q_pos = torch.randint(0, Tk, (B, Nq), device="cuda", generator=g)
            groups = torch.randint(0, 2**G, (B, Tk), device="cuda", generator=g).to(torch.uint8)
            upstream = torch.randn(B, Hq, Nq, G, device="cuda", generator=g)
            errs = kernel_errors(q, k, q_pos, groups, G, upstream).values()
            errors = " ".join(f"{e:9.2e}" for e in errs)
            print(f"{str((B, Hq, Hkv, Nq, Tk, D, G)):>30s} {str(dtype)[6:]:>9s} {errors}")


if __name__ == "__main__":
    import sys
    if "--build" in sys.argv:
        if load_extension(verbose=True) is None:
            sys.exit(f"kernels.cu did not build: {_ext_error}")
        print("kernels.cu built and imported")
    elif "--check" in sys.argv:
        assert torch.cuda.is_available() and load_extension() is not None, \
            f"needs a GPU and the build ({_ext_error})"
        check()
    else:
        print(__doc__)
