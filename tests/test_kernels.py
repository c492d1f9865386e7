"""attention_mass: the reference against brute force on CPU; the CUDA op against the reference on GPU."""
import ctypes
import math
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

import mass_kernel


def brute_force(q, k, q_pos, key_groups, num_groups, scale=None):
    """Materialised float64 softmax, then a masked sum per group: what eager attention gives."""
    q, k = q.double(), k.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = scale * q @ k.transpose(-1, -2)
    visible = torch.arange(k.shape[2]) <= q_pos[:, None, :, None]
    p = torch.softmax(scores.masked_fill(~visible, -math.inf), -1).nan_to_num(0.0)
    bits = ((key_groups.long()[..., None] >> torch.arange(num_groups)) & 1).double()
    return p @ bits[:, None]


def random_inputs(B, Hq, Hkv, Nq, Tk, D, G, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(device, dtype)
    q_pos = torch.randint(0, Tk, (B, Nq), generator=g)
    q_pos[:, -1] = Tk - 1  # the last row sees every key
    key_groups = torch.randint(0, 2**G, (B, Tk), generator=g).to(torch.uint8)
    key_groups[0, :] &= 0xFE  # group 0 empty in sample 0: those rows must give 0 and finite grads
    return q, k, q_pos.to(device), key_groups.to(device)


SHAPES = [(1, 2, 2, 5, 7, 8, 1), (2, 6, 2, 33, 70, 16, 3), (2, 9, 3, 17, 129, 64, 8),
          (1, 4, 1, 300, 301, 8, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_brute_force(shape):
    B, Hq, Hkv, Nq, Tk, D, G = shape
    q, k, q_pos, groups = random_inputs(*shape)
    got = mass_kernel.attention_mass(q, k, q_pos, groups, G, impl="reference")
    want = brute_force(q, k, q_pos, groups, G)
    assert got.dtype == torch.float32 and got.shape == (B, Hq, Nq, G)
    assert (got.double() - want).abs().max() < 1e-5
    assert (got[0, :, :, 0] == 0).all()  # the empty group
    scaled = mass_kernel.attention_mass(q, k, q_pos, groups, G, scale=0.3, impl="reference")
    assert (scaled.double() - brute_force(q, k, q_pos, groups, G, 0.3)).abs().max() < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_gradients_match_brute_force(shape):
    B, Hq, Hkv, Nq, Tk, D, G = shape
    q, k, q_pos, groups = random_inputs(*shape, dtype=torch.float64)
    upstream = torch.randn(B, Hq, Nq, G, dtype=torch.float64)
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    (mass_kernel.attention_mass(q1, k1, q_pos, groups, G, impl="reference") * upstream).sum().backward()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    (brute_force(q2, k2, q_pos, groups, G) * upstream).sum().backward()
    assert torch.isfinite(q1.grad).all() and torch.isfinite(k1.grad).all()
    assert torch.allclose(q1.grad, q2.grad, atol=1e-5) and torch.allclose(k1.grad, k2.grad, atol=1e-5)


def test_row_with_no_visible_key_is_zero_with_finite_grad():
    q, k, q_pos, groups = random_inputs(1, 2, 1, 4, 6, 8, 2, dtype=torch.float64)
    q_pos[0, 1] = -1  # sees nothing
    q = q.requires_grad_()
    m = mass_kernel.attention_mass(q, k, q_pos, groups, 2, impl="reference")
    assert (m[0, :, 1] == 0).all()
    m.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[0, :, 1] == 0).all()


def test_gradcheck_and_opcheck():
    q, k, q_pos, groups = random_inputs(1, 4, 2, 9, 11, 8, 3, dtype=torch.float64)
    q, k = q.requires_grad_(), k.requires_grad_()
    assert torch.autograd.gradcheck(lambda a,
                                    b: mass_kernel.attention_mass(a, b, q_pos, groups, 3, impl="reference"),
                                    (q, k))
    torch.library.opcheck(torch.ops.nanoattcot.mass_fwd.default, (q, k, q_pos, groups, 3, 0.35, False))
    mass, lse = torch.ops.nanoattcot.mass_fwd(q, k, q_pos, groups, 3, 0.35, False)
    torch.library.opcheck(torch.ops.nanoattcot.mass_bwd.default,
                          (torch.randn_like(mass), q.detach(), k.detach(), q_pos, groups, mass.detach(),
                           lse.detach(), 0.35, False))


def test_fakes_give_the_real_outputs_strides():
    """torch.compile plans with the fakes: dK must be contiguous as both backends return it, also when
    k is a transposed view, as the model's k is (B, T, Hkv, d) -> (B, Hkv, T, d)."""
    q, k, q_pos, groups = random_inputs(1, 4, 2, 9, 11, 8, 3, dtype=torch.float64)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    mass, lse = torch.ops.nanoattcot.mass_fwd(q, k, q_pos, groups, 3, 0.35, False)
    torch.library.opcheck(torch.ops.nanoattcot.mass_fwd.default, (q, k, q_pos, groups, 3, 0.35, False))
    torch.library.opcheck(torch.ops.nanoattcot.mass_bwd.default,
                          (torch.randn_like(mass), q, k, q_pos, groups, mass, lse, 0.35, False))


def test_reference_computes_in_fp32_under_autocast():
    """bf16 autocast (as training on a GPU runs) must not reach the reference's body: the masses and
    gradients are those of fp32 arithmetic on the same inputs, not bf16 matmuls (error ~1e-2)."""
    q, k, q_pos, groups = random_inputs(2, 6, 2, 33, 70, 64, 2)
    upstream = torch.randn(2, 6, 33, 2)
    outs = []
    for on in (False, True):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
            m = mass_kernel.attention_mass(qq, kk, q_pos, groups, 2, impl="reference")
            (m * upstream).sum().backward()
        outs.append((m, qq.grad, kk.grad))
    for plain, cast in zip(*outs):
        assert cast.dtype == torch.float32 and torch.allclose(plain, cast, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_route_matches_brute_force(shape):
    """impl="sdpa" (attention with V = the group bits): masses and gradients, rows that see nothing."""
    B, Hq, Hkv, Nq, Tk, D, G = shape
    q, k, q_pos, groups = random_inputs(*shape, dtype=torch.float64)
    q_pos[0, 0] = -1
    upstream = torch.randn(B, Hq, Nq, G, dtype=torch.float64)
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    got = mass_kernel.attention_mass(q1, k1, q_pos, groups, G, impl="sdpa")
    (got * upstream).sum().backward()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    want = brute_force(q2, k2, q_pos, groups, G)
    (want * upstream).sum().backward()
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() < 1e-5
    assert (got[0, :, 0] == 0).all()
    assert torch.allclose(q1.grad, q2.grad, atol=1e-5) and torch.allclose(k1.grad, k2.grad, atol=1e-5)
    assert (q1.grad[0, :, 0] == 0).all()


def test_bad_shapes_are_named():
    q, k, q_pos, groups = random_inputs(1, 3, 2, 4, 6, 8, 1)
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        mass_kernel.attention_mass(q, k, q_pos, groups)
    q, k, q_pos, groups = random_inputs(1, 4, 2, 4, 6, 8, 1)
    with pytest.raises(ValueError, match="uint8"):
        mass_kernel.attention_mass(q, k, q_pos, groups.long())
    with pytest.raises(ValueError,
                       match=r"q_pos must be integer \(B, Nq\) = \(1, 4\); got torch.int64 \(1, 1\)"):
        mass_kernel.attention_mass(q, k, q_pos[:, :1], groups)  # would read past q_pos for rows >= 1
    q2, k2, q_pos2, groups2 = random_inputs(2, 4, 2, 4, 6, 8, 1)
    with pytest.raises(ValueError, match=r"q_pos must be integer \(B, Nq\) = \(2, 4\)"):
        mass_kernel.attention_mass(q2, k2, q_pos2[:1], groups2)  # (1, Nq) for B = 2
    with pytest.raises(ValueError, match="Hq a multiple of Hkv >= 1"):
        mass_kernel.attention_mass(q, k[:, :0], q_pos, groups)  # Hkv = 0


# --- kernels.cu itself on the CPU (tests/emulate_kernels.cpp runs its threads and warp instructions)

EMULATOR = pathlib.Path(__file__).with_name("emulate_kernels.cpp")


def compile_emulator(out, *flags):
    cuda_home = mass_kernel._find_cuda_home()
    if cuda_home is None or shutil.which("g++") is None:
        why = "the kernel emulator needs g++ and the CUDA headers (cuda_bf16.h)"
        if os.environ.get("CI") == "true":  # CI must check kernels.cu, never skip it
            pytest.fail(why)
        pytest.skip(why)
    build = subprocess.run(["g++", "-std=c++20", "-pthread", f"-I{cuda_home}/include", *flags,
                            str(EMULATOR), "-o", str(out)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    so = tmp_path_factory.mktemp("emulator") / "emulate_kernels.so"
    return ctypes.CDLL(str(compile_emulator(so, "-O2", "-shared", "-fPIC")))


def emulate(lib, q, k, q_pos, groups, G, upstream, scale):
    """kernels.cu's forward and backward on CPU tensors; outputs start as NaN so unwritten ones show."""
    B, Hq, Nq, D = q.shape
    Hkv, Tk = k.shape[1:3]
    code = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[q.dtype]
    q_pos = q_pos.int().contiguous()
    mass, lse = torch.full((B, Hq, Nq, G), math.nan), torch.full((B, Hq, Nq), math.nan)
    dq_acc, dk = torch.zeros(q.shape), torch.full_like(k, math.nan)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())
    sizes = [ctypes.c_int(n) for n in (B, Hq, Hkv, Nq, Tk, D, G)] + [ctypes.c_float(scale)]
    assert lib.emulate_forward(code, ptr(q), ptr(k), ptr(q_pos), ptr(groups), ptr(mass), ptr(lse), *sizes)
    assert lib.emulate_backward(code, ptr(q), ptr(k), ptr(q_pos), ptr(groups), ptr(mass), ptr(lse),
                                ptr(upstream),
                                ptr(dq_acc), ptr(dk), *sizes)
    return mass, lse, dq_acc, dk


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 150, 64, 2), (1, 3, 1, 40, 45, 128, 5)])
def test_emulated_cuda_kernels_match_reference(emulator, shape, dtype, tol):
    """Tiles at both ends, GQA, rows that see nothing or everything, an empty group, 2 and 8 group bits,
    head dims 64 and 128; the reference runs in float64 on the same (rounded) inputs."""
    B, Hq, Hkv, Nq, Tk, D, G = shape
    q, k, q_pos, groups = random_inputs(*shape, dtype=dtype, seed=4)
    q_pos[0, 3], q_pos[-1, 5] = -1, Tk + 7
    upstream = torch.randn(B, Hq, Nq, G, generator=torch.Generator().manual_seed(5))
    scale = D ** -0.5
    mass, lse, dq, dk = emulate(emulator, q, k, q_pos, groups, G, upstream, scale)
    want_mass, want_lse = mass_kernel.reference_forward(q.double(), k.double(), q_pos, groups, G, scale)
    want_dq, want_dk = mass_kernel.reference_backward(upstream.double(), q.double(), k.double(), q_pos,
                                                      groups, want_mass, want_lse, scale)
    assert (lse.isinf() == want_lse.isinf()).all() and lse.isinf().sum() == Hq  # the row that sees nothing
    seen = ~want_lse.isinf()
    assert rel_err(lse[seen], want_lse[seen]) < tol and rel_err(mass, want_mass) < tol
    assert (mass[0, :, :, 0] == 0).all() and (mass[0, :, 3] == 0).all()  # empty group, empty row
    for got, want in ((dq, want_dq), (dk.float(), want_dk)):
        assert torch.isfinite(got).all() and rel_err(got, want) < tol
    assert (dq[0, :, 3] == 0).all()



@pytest.mark.parametrize("sanitizer", ["thread", "address,undefined"])
def test_emulated_cuda_kernels_under_sanitizers(tmp_path, sanitizer):
    """ThreadSanitizer: a missing __syncthreads or __syncwarp in kernels.cu is a data race between the
    emulated threads (removing the one before dQ is caught). AddressSanitizer: an out-of-bounds access."""
    exe = compile_emulator(tmp_path / "emulate", "-O1", "-g", f"-fsanitize={sanitizer}",
                           "-fno-sanitize-recover=all",
                           "-DSANITIZER_MAIN")
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ran", run.stderr[-3000:]


# --- GPU: the CUDA op against the reference (skipped without one)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
GPU_SHAPES = [(2, 9, 3, 200, 333, 64, 2), (1, 15, 5, 1024, 1024, 64, 3), (2, 4, 2, 77, 130, 128, 8),
              (1, 9, 3, 8192, 8192, 64, 2)]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_cuda_matches_reference(shape, dtype, tol):
    B, Hq, Hkv, Nq, Tk, D, G = shape
    if Tk > 4096 and dtype != torch.bfloat16:
        pytest.skip("the long case runs once, in bf16")
    q, k, q_pos, groups = random_inputs(*shape, dtype=dtype, device="cuda", seed=1)
    upstream = torch.randn(B, Hq, Nq, G, device="cuda")
    outs = {}
    for impl in ("cuda", "reference"):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        m = mass_kernel.attention_mass(qq, kk, q_pos, groups, G, impl=impl)
        (m * upstream).sum().backward()
        outs[impl] = (m, qq.grad, kk.grad)
    for got, want in zip(outs["cuda"], outs["reference"]):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < tol


@cuda
def test_cuda_float64_falls_back_to_sdpa():
    q, k, q_pos, groups = random_inputs(1, 4, 2, 30, 40, 64, 2, dtype=torch.float64, device="cuda", seed=6)
    with pytest.warns(UserWarning, match="float64 has no CUDA kernel; using the SDPA route"):
        got = mass_kernel.attention_mass(q, k, q_pos, groups, 2)
    assert torch.equal(got, mass_kernel.attention_mass(q, k, q_pos, groups, 2, impl="sdpa"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_runs_on_the_inputs_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernel must launch on cuda:1."""
    q, k, q_pos, groups = random_inputs(1, 4, 2, 70, 90, 64, 2, dtype=torch.bfloat16, device="cuda:1",
                                        seed=7)
    got = mass_kernel.attention_mass(q, k, q_pos, groups, 2, impl="cuda")
    want = mass_kernel.attention_mass(q, k, q_pos, groups, 2, impl="reference")
    assert got.device == q.device and rel_err(got, want) < 1e-2


@cuda
def test_cuda_writes_every_output():
    """Outputs are made with torch.empty: run twice after filling the cache with NaN garbage."""
    q, k, q_pos, groups = random_inputs(1, 4, 2, 70, 90, 64, 2, device="cuda", seed=2)
    torch.full((1 << 24,), float("nan"), device="cuda")  # poison freed memory the allocator may hand back
    torch.cuda.empty_cache()
    junk = torch.full((1 << 22,), float("nan"), device="cuda")
    del junk
    mass, lse = torch.ops.nanoattcot.mass_fwd(q, k, q_pos, groups, 2, 0.125, True)
    assert torch.isfinite(mass).all() and torch.isfinite(lse).all()


@cuda
def test_cuda_under_torch_compile():
    q, k, q_pos, groups = random_inputs(2, 6, 2, 64, 100, 64, 2, dtype=torch.bfloat16, device="cuda", seed=3)
    q = q.requires_grad_()
    f = torch.compile(lambda a, b: mass_kernel.attention_mass(a, b, q_pos, groups, 2).square().sum(),
                      fullgraph=True)
    loss = f(q, k)
    loss.backward()
    want = mass_kernel.attention_mass(q, k, q_pos, groups, 2, impl="reference").square().sum()
    assert abs(loss.item() - want.item()) / abs(want.item()) < 1e-2 and torch.isfinite(q.grad).all()


# --- impl="auto" trusts the kernel only after its self-check (run here with the kernel replaced)

class FakeExtension:
    """Stands in for the built kernels.cu: the reference's numbers, times `error` on the masses."""
    def __init__(self, error=1.0):
        self.error, self.calls = error, 0

    def forward(self, q, k, q_pos, key_groups, num_groups, scale):
        self.calls += 1
        mass, lse = mass_kernel.reference_forward(q, k, q_pos.long(), key_groups, num_groups, scale)
        return mass * self.error, lse

    def backward(self, dmass, q, k, q_pos, key_groups, mass, lse, scale):
        return mass_kernel.reference_backward(dmass, q, k, q_pos.long(), key_groups, mass, lse, scale)


@pytest.fixture
def fake_kernel(monkeypatch):
    def install(error):
        ext = FakeExtension(error)
        monkeypatch.setattr(mass_kernel, "_use_cuda", lambda q: True)
        monkeypatch.setattr(mass_kernel, "load_extension", lambda verbose=False: ext)
        monkeypatch.setattr(mass_kernel, "_verdicts", {})
        monkeypatch.setattr(mass_kernel, "_warned", set())
        return ext
    return install


def test_auto_falls_back_once_from_a_kernel_that_fails_its_self_check(fake_kernel):
    ext = fake_kernel(error=1.05)  # masses 5% off
    q, k, q_pos, groups = random_inputs(2, 6, 2, 33, 70, 64, 2, seed=4)
    said = r"failed its self-check \((mass|dq|dk) off by .* float32, q \(2, 6, 70, 64\)"
    with pytest.warns(UserWarning, match=said) as caught:
        with torch.no_grad():  # as eval calls it: the check still runs its backward
            first = mass_kernel.attention_mass(q, k, q_pos, groups, 2)
        second = mass_kernel.attention_mass(q, k, q_pos, groups, 2)
    assert len([w for w in caught if "self-check" in str(w.message)]) == 1
    assert ext.calls == 1  # the check only
    want = mass_kernel.attention_mass(q, k, q_pos, groups, 2, impl="sdpa")
    assert torch.equal(first, want) and torch.equal(second, want)
    assert mass_kernel.resolve("auto", q.device, q) == "sdpa"
    with pytest.raises(RuntimeError, match="the CUDA kernel failed its self-check: (mass|dq|dk) off by"):
        mass_kernel.attention_mass(q, k, q_pos, groups, 2, impl="cuda")


def test_auto_keeps_a_kernel_that_passes_its_self_check(fake_kernel, recwarn):
    ext = fake_kernel(error=1.0)
    q, k, q_pos, groups = random_inputs(2, 6, 2, 33, 70, 64, 2, seed=5)
    got = mass_kernel.attention_mass(q, k, q_pos, groups, 2)
    mass_kernel.attention_mass(q, k, q_pos, groups, 2)
    assert ext.calls == 3
    assert not [w for w in recwarn if "self-check" in str(w.message)]  # check, then two calls
    assert torch.allclose(got, mass_kernel.attention_mass(q, k, q_pos, groups, 2, impl="reference"))
    assert mass_kernel._verdicts == {("cpu", torch.float32, 64): None}
    assert mass_kernel.resolve("auto", q.device, q) == "cuda"


def test_resolve_decides_auto_in_one_place():
    """Every route asked for runs as asked; auto is fused on the CPU (a bare call computes it by the
    reference) and, on a GPU before any q exists, stays auto, to be decided at each call on its q."""
    for route in mass_kernel.ROUTES:
        assert mass_kernel.resolve(route, "cpu") == route == mass_kernel.resolve(route, "cuda")
    assert mass_kernel.resolve("auto", "cpu") == "fused"
    assert mass_kernel.resolve("auto", "cuda") == "auto"
    q, k, q_pos, groups = random_inputs(1, 2, 1, 4, 6, 8, 2, seed=6)
    assert mass_kernel.resolve("auto", q.device, q) == "fused"
    assert torch.equal(mass_kernel.attention_mass(q, k, q_pos, groups, 2),
                       mass_kernel.attention_mass(q, k, q_pos, groups, 2, impl="reference"))
    with pytest.raises(ValueError, match="mass route 'flash': one of auto, cuda"):
        mass_kernel.resolve("flash", "cpu")
