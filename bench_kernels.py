"""
Benchmark of attention_mass on a GPU: this kernel against the ways one can get the same numbers.

  (a) ours        kernels.attention_mass (CUDA extension)
  (b) eager       materialised softmax, then a masked sum (what output_attentions=True gives)
  (c) flex        FlexAttention with return_lse, once over all keys and once per group:
                  m = exp(lse_group - lse_all), compiled
  (d) sdpa        the yardstick: SDPA attention forward(+backward) on the same q, k, v shapes

Forward and forward+backward times (median of CUDA-event timings after warm-up), peak memory
above the inputs, ratios to (d), TFLOP/s (nominal: mass 2*vis*D forward and 4x that with the
backward; sdpa 4*vis*D and 3.5x that; vis = visible (query, key) pairs). Writes a JSON file.

    python bench_kernels.py [--quick] [--json bench_kernels.json]
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F

import kernels
from torch.nn.attention.bias import causal_lower_right


def cuda_time(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_mb(fn):
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
        return create_block_mask(mask_mod, B, None, Nq, Tk, device="cuda")
    masks = [mask_for(None)] + [mask_for(g) for g in range(G)]

    def run(q, k, v):
        lse = [flex(q, k, v, block_mask=m, return_lse=True, enable_gqa=True)[1] for m in masks]
        return torch.stack([torch.exp(l - lse[0]) for l in lse[1:]], -1)
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="one shape, few repeats")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default="bench_kernels.json")
    p.add_argument("--shapes", default="8x1024,4x2048,2x4096,1x8192", help="B x T list")
    p.add_argument("--methods", default="ours,eager,flex,sdpa")
    args = p.parse_args()
    torch._dynamo.config.recompile_limit = 1000  # one compile per shape and grad mode, never the eager fallback
    assert torch.cuda.is_available(), "bench_kernels.py needs a CUDA GPU"
    assert kernels.load_extension() is not None, kernels._ext_error
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    heads = [(9, 3), (15, 5)]
    if args.quick:
        shapes, heads, args.repeats = [(2, 4096)], [(9, 3)], 5
    D, G, dtype = 64, 2, torch.bfloat16
    results = []
    for (B, T) in shapes:
        for (Hq, Hkv) in heads:
            for rows in ("all", "last half"):
                Nq = T if rows == "all" else T // 2
                g = torch.Generator(device="cuda").manual_seed(0)
                q = torch.randn(B, Hq, Nq, D, device="cuda", dtype=dtype, generator=g, requires_grad=True)
                k = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype, generator=g, requires_grad=True)
                v = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype, generator=g, requires_grad=True)
                q_pos = torch.arange(T - Nq, T, device="cuda").expand(B, Nq).contiguous()
                groups = torch.randint(0, 4, (B, T), device="cuda", generator=g).to(torch.uint8)
                upstream = torch.randn(B, Hq, Nq, G, device="cuda")
                vis = B * Hq * sum(range(T - Nq + 1, T + 1))  # visible (query, key) pairs
                torch._dynamo.reset()
                flex = make_flex(q_pos, groups, G, B, Hq, Nq, T) if "flex" in args.methods else None
                causal = causal_lower_right(Nq, T)
                methods = {
                    "ours": lambda: kernels.attention_mass(q, k, q_pos, groups, G),
                    "eager": lambda: eager_mass(q, k, q_pos, groups, G),
                    "flex": lambda: flex(q, k, v),
                    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True),
                }
                row = {"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "rows": rows}
                for name, fwd in methods.items():
                    if name not in args.methods.split(","):
                        continue
                    def fwd_bwd():
                        out = fwd()
                        grad = upstream if name != "sdpa" else torch.ones_like(out)
                        out.backward(grad.to(out.dtype))
                        q.grad = k.grad = v.grad = None
                    try:
                        with torch.no_grad():
                            t_f = cuda_time(fwd, args.repeats)
                            m_f = peak_mb(fwd)
                        t_fb, m_fb = cuda_time(fwd_bwd, args.repeats), peak_mb(fwd_bwd)
                    except Exception as e:  # e.g. out of memory, or no FlexAttention in this torch
                        print(f"  {name} {B}x{T} {Hq}/{Hkv} {rows}: failed ({type(e).__name__}: {str(e)[:120]})")
                        torch.cuda.empty_cache()
                        continue
                    flops = 4 * vis * D if name == "sdpa" else 2 * vis * D
                    mult = 3.5 if name == "sdpa" else 4.0
                    row[name] = {"fwd_ms": t_f, "fwd_bwd_ms": t_fb, "fwd_mb": m_f, "fwd_bwd_mb": m_fb,
                                 "fwd_tflops": flops / t_f / 1e9, "fwd_bwd_tflops": mult * flops / t_fb / 1e9}
                    print(f"  {B}x{T} {Hq}/{Hkv} {rows:9s} {name:5s} fwd {t_f:8.3f} ms  fwd+bwd {t_fb:8.3f} ms  "
                          f"mem {m_f:7.0f} / {m_fb:7.0f} MB", flush=True)
                results.append(row)
                del flex
                torch.cuda.empty_cache()

    print(f"\nattention_mass benchmark, {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, "
          f"D={D}, {G} groups; times in ms (median), memory in MB above inputs, x = time / sdpa time")
    hdr = f"{'B x T':>9s} {'H':>5s} {'rows':>9s} {'method':>6s} {'fwd':>8s} {'x':>6s} {'fwd+bwd':>8s} {'x':>6s} " \
          f"{'TFLOP/s':>8s} {'mem fwd':>8s} {'mem f+b':>8s}"
    print(hdr)
    for r in results:
        ref = r.get("sdpa")
        for name in args.methods.split(","):
            if name not in r:
                print(f"{r['B']:>3d} x{r['T']:>5d} {r['Hq']:>2d}/{r['Hkv']:<2d} {r['rows']:>9s} {name:>6s}  failed")
                continue
            m = r[name]
            xf = m["fwd_ms"] / ref["fwd_ms"] if ref else float("nan")
            xb = m["fwd_bwd_ms"] / ref["fwd_bwd_ms"] if ref else float("nan")
            print(f"{r['B']:>3d} x{r['T']:>5d} {r['Hq']:>2d}/{r['Hkv']:<2d} {r['rows']:>9s} {name:>6s} "
                  f"{m['fwd_ms']:8.3f} {xf:6.2f} {m['fwd_bwd_ms']:8.3f} {xb:6.2f} {m['fwd_bwd_tflops']:8.1f} "
                  f"{m['fwd_mb']:8.0f} {m['fwd_bwd_mb']:8.0f}")
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
