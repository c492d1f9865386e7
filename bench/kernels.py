"""
Benchmark of attention_mass: this kernel against the ways one can get the same numbers.

  (a) ours        mass_kernel.attention_mass (CUDA extension; the PyTorch reference on CPU)
  (b) eager       materialised softmax, then a masked sum (what output_attentions=True gives)
  (c) flex        FlexAttention with return_lse, once over all keys and once per group:
                  m = exp(lse_group - lse_all), compiled
  (d) sdpa_bits   the stock route a user who knows the trick takes: the mass is attention with
                  V = the one-hot group bits, so one SDPA call (attention_mass(impl="sdpa"))
  (e) flex_bits   the same with FlexAttention (V = bits, a block mask from q_pos), compiled
  (f) sdpa        the yardstick: SDPA attention forward(+backward) on the same q, k, v shapes

Forward and forward+backward times (median after warm-up; CUDA events on a GPU), peak memory
above the inputs (GPU), ratios to (f) and to (d), TFLOP/s (nominal: mass 2*vis*D forward and 4x
that with the backward; attention 4*vis*D and 3.5x that; vis = visible (query, key) pairs).
Writes a JSON file. On CPU (no GPU, or --cpu) it runs the same methods, slowly, to check them.

    python -m bench.kernels [--quick] [--json bench_kernels.json]
    python -m bench.kernels --cpu --quick --methods ours,eager,sdpa_bits,flex_bits,sdpa
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

import mass_kernel
from torch.nn.attention.bias import causal_lower_right


def median_ms(fn, repeats, device):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cpu":
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_mb(fn, device):
    if device.type == "cpu":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def eager_mass(q, k, q_pos, groups, G):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    visible = torch.arange(k.shape[2], device=q.device) <= q_pos[:, None, :, None]
    p = torch.softmax(s.masked_fill(~visible, -math.inf), -1)
    bits = ((groups.long()[..., None] >> torch.arange(G, device=q.device)) & 1).to(q.dtype)
    return (p @ bits[:, None]).float()


def make_flex(q_pos, groups, G, B, H, Nq, Tk):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)

    def mask_for(g):
        def mask_mod(b, h, qi, kj):
            vis = kj <= q_pos[b, qi]
            return vis if g is None else vis & ((groups[b, kj] >> g) & 1).bool()
        return create_block_mask(mask_mod, B, None, Nq, Tk, device=q_pos.device)
    masks = [mask_for(None)] + [mask_for(g) for g in range(G)]

    def run(q, k, v):
        lse = [flex(q, k, v, block_mask=m, return_lse=True, enable_gqa=True)[1] for m in masks]
        return torch.stack([torch.exp(l - lse[0]) for l in lse[1:]], -1)
    return run


def make_flex_bits(q_pos, groups, G, B, Nq, Tk, D, Hkv, dtype):
    """FlexAttention with V = the group bits padded to the head dim: out[..., :G] is the mass."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    block_mask = create_block_mask(lambda b, h, qi, kj: kj <= q_pos[b, qi], B, None, Nq, Tk,
                                   device=q_pos.device)
    v = mass_kernel.bits_as_values(groups, G, D, Hkv, dtype).contiguous()
    return lambda q, k: flex(q, k, v, block_mask=block_mask, enable_gqa=True)[..., :G].float()


def parser():
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one shape, few repeats")
    p.add_argument("--repeats", type=int, default=20,
                   help="timed runs per method and shape (default: %(default)s)")
    p.add_argument("--json", default="bench_kernels.json",
                   help="where the table is written (default: %(default)s)")
    p.add_argument("--shapes", default="8x1024,4x2048,2x4096,1x8192", help="comma-separated B x T "
                   "(default: %(default)s)")
    p.add_argument("--methods", default="ours,eager,flex,sdpa_bits,flex_bits,sdpa",
                   help="comma-separated methods (default: %(default)s)")
    p.add_argument("--cpu", action="store_true",
                   help="run on CPU (slow; a check of the methods, not a timing)")
    return p


def main():
    args = parser().parse_args()
    # one compile per shape and grad mode, never the eager fallback
    torch._dynamo.config.recompile_limit = 1000
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cuda":
        assert mass_kernel.load_extension() is not None, mass_kernel._ext_error
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    heads = [(9, 3), (15, 5)]
    if args.quick:
        shapes, heads, args.repeats = [(2, 4096) if device.type == "cuda" else (1, 512)], [(9, 3)], 5
    D, G, dtype = 64, 2, torch.bfloat16 if device.type == "cuda" else torch.float32
    methods_wanted = args.methods.split(",")
    results = []
    for (B, T) in shapes:
        for (Hq, Hkv) in heads:
            for rows in ("all", "last half"):
                Nq = T if rows == "all" else T // 2
                g = torch.Generator(device=device).manual_seed(0)
                q = torch.randn(B, Hq, Nq, D, device=device, dtype=dtype, generator=g, requires_grad=True)
                k = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=g, requires_grad=True)
                v = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=g, requires_grad=True)
                q_pos = torch.arange(T - Nq, T, device=device).expand(B, Nq).contiguous()
                groups = torch.randint(0, 4, (B, T), device=device, generator=g).to(torch.uint8)
                upstream = torch.randn(B, Hq, Nq, G, device=device)
                vis = B * Hq * sum(range(T - Nq + 1, T + 1))  # visible (query, key) pairs
                torch._dynamo.reset()
                flex = make_flex(q_pos, groups, G, B, Hq, Nq, T) if "flex" in methods_wanted else None
                flex_bits = (make_flex_bits(q_pos, groups, G, B, Nq, T, D, Hkv, dtype)
                             if "flex_bits" in methods_wanted else None)
                causal = causal_lower_right(Nq, T)
                methods = {
                    "ours": lambda: mass_kernel.attention_mass(q, k, q_pos, groups, G),
                    "eager": lambda: eager_mass(q, k, q_pos, groups, G),
                    "flex": lambda: flex(q, k, v),
                    "sdpa_bits": lambda: mass_kernel.attention_mass(q, k, q_pos, groups, G, impl="sdpa"),
                    "flex_bits": lambda: flex_bits(q, k),
                    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal,
                                                                   enable_gqa=True),
                }
                row = {"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "rows": rows}
                want = mass_kernel.attention_mass(q.detach().float(), k.detach().float(), q_pos, groups, G,
                                                  impl="reference")
                for name, fwd in methods.items():
                    if name not in methods_wanted:
                        continue
                    def fwd_bwd():
                        out = fwd()
                        grad = upstream if name != "sdpa" else torch.ones_like(out)
                        out.backward(grad.to(out.dtype))
                        q.grad = k.grad = v.grad = None
                    try:
                        with torch.no_grad():
                            err = 0.0 if name == "sdpa" else ((fwd() - want).norm() / want.norm()).item()
                            t_f = median_ms(fwd, args.repeats, device)
                            m_f = peak_mb(fwd, device)
                        t_fb, m_fb = median_ms(fwd_bwd, args.repeats, device), peak_mb(fwd_bwd, device)
                    except Exception as e:  # e.g. out of memory, or no FlexAttention in this torch
                        print(f"  {name} {B}x{T} {Hq}/{Hkv} {rows}: failed ({type(e).__name__}: "
                              f"{str(e)[:120]})")
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    flops = 4 * vis * D if name == "sdpa" else 2 * vis * D
                    mult = 3.5 if name == "sdpa" else 4.0
                    row[name] = {"fwd_ms": t_f, "fwd_bwd_ms": t_fb, "fwd_mb": m_f, "fwd_bwd_mb": m_fb,
                                 "rel_err": err,
                                 "fwd_tflops": flops / t_f / 1e9,
                                 "fwd_bwd_tflops": mult * flops / t_fb / 1e9}
                    print(f"  {B}x{T} {Hq}/{Hkv} {rows:9s} {name:9s} fwd {t_f:8.3f} ms  fwd+bwd "
                          f"{t_fb:8.3f} ms  mem {m_f:7.0f} / {m_fb:7.0f} MB  rel. error {err:.1e}",
                          flush=True)
                results.append(row)
                del flex, flex_bits
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    name_of = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\nattention_mass benchmark, {name_of}, torch {torch.__version__}, {str(dtype)[6:]}, D={D}, {G} "
          "groups; times in ms (median), memory in MB above inputs; x sdpa = time / attention time, "
          "x bits = time / sdpa_bits time (the stock route to the same masses)")
    print(f"{'B x T':>9s} {'H':>5s} {'rows':>9s} {'method':>9s} {'fwd':>8s} {'fwd+bwd':>8s} {'x sdpa':>7s} "
          f"{'x bits':>7s} {'TFLOP/s':>8s} {'mem fwd':>8s} {'mem f+b':>8s} {'rel err':>8s}")
    for r in results:
        ref, bits = r.get("sdpa"), r.get("sdpa_bits")
        for name in methods_wanted:
            if name not in r:
                print(f"{r['B']:>3d} x{r['T']:>5d} {r['Hq']:>2d}/{r['Hkv']:<2d} {r['rows']:>9s} "
                      f"{name:>9s}  failed")
                continue
            m = r[name]
            x_sdpa = m["fwd_bwd_ms"] / ref["fwd_bwd_ms"] if ref else float("nan")
            x_bits = m["fwd_bwd_ms"] / bits["fwd_bwd_ms"] if bits else float("nan")
            print(f"{r['B']:>3d} x{r['T']:>5d} {r['Hq']:>2d}/{r['Hkv']:<2d} {r['rows']:>9s} {name:>9s} "
                  f"{m['fwd_ms']:8.3f} {m['fwd_bwd_ms']:8.3f} {x_sdpa:7.2f} {x_bits:7.2f} "
                  f"{m['fwd_bwd_tflops']:8.1f} {m['fwd_mb']:8.0f} {m['fwd_bwd_mb']:8.0f} "
                  f"{m['rel_err']:8.1e}")
    with open(args.json, "w") as f:
        json.dump({"device": name_of, "torch": torch.__version__, "results": results}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
