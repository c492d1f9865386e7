// Masked attention-mass reduction, forward and backward, never materialising the (Nq, Tk) matrix.
//
// For query row i (position q_pos[i]) and keys j <= q_pos[i]:
//   s_ij = scale * q_i . k_j,   p_ij = softmax_j(s_ij),   m_i(g) = sum_{j in group g} p_ij
// Forward: one pass over key tiles with an online max m_i; l_i = sum_j exp(s_ij - m_i) and one
//   l_i(g) per group, accumulated from the same exponentials; m_i(g) = l_i(g) / l_i. Saves
//   L_i = m_i + log l_i (the row log-sum-exp).
// Backward: p_ij = exp(s_ij - L_i) recomputed from q, k, L (no V, no dO). With upstream dm_i(g):
//   dS_ij = p_ij * (sum_g dm_i(g) [j in g] - sum_g dm_i(g) m_i(g));  dQ = scale dS K;  dK = scale dS^T Q
//   One block per (key tile, query head) computes dS once per (query tile, key tile) pair: its dK part
//   stays in shared memory (the host sums the query heads that share a kv head, GQA) and dS K is
//   added to an fp32 dQ with atomics.
// Names follow the flash-attention papers: Br x Bc tiles, S the score tile, P the dS tile.
// 16-bit inputs use tensor cores (wmma, fp32 accumulate); fp32 inputs use plain FMAs.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <type_traits>

using namespace nvcuda;

constexpr int Br = 64, Bc = 64, NT = 128;  // rows and columns of a tile; 4 warps, 16 rows each
constexpr int MAXG = 8;                     // groups per pass: the bits of a uint8; kernels take NG = 2 or 8
constexpr float LOG2E = 1.4426950408889634f;

template <typename T> constexpr bool is_f32() { return std::is_same<T, float>::value; }
template <typename T, int D> constexpr int ldq() { return is_f32<T>() ? D + 4 : D + 8; }  // padded, 16-byte rows
template <typename T> constexpr int ldp() { return is_f32<T>() ? Bc + 1 : Bc + 8; }
constexpr int LDS = Bc + 4;
template <int D> constexpr int lda() { return D + 4; }
template <int D> constexpr int lds() { return LDS > lda<D>() ? LDS : lda<D>(); }  // S also holds a P K tile
__host__ __device__ constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }

template <typename T> __device__ __forceinline__ T from_f(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f(float x) { return __float2half(x); }

// Shared memory, carved in 128-byte aligned pieces (wmma pointers must be 32-byte aligned). The
// forward uses the first part only; the backward adds dm, c, the dS tile P and the accumulator.
template <typename T, int D> struct Smem {
  T *Q, *K, *P; float *S, *acc, *row_L, *row_c, *row_g; uint8_t *grp; int *pos, *max_pos;
  static constexpr int bytes(bool backward) {
    const int fwd = 2 * align128(Br * ldq<T, D>() * sizeof(T)) + align128(Br * lds<D>() * 4) + align128(Br * 4)
                  + align128(Bc) + align128(Br * 4) + 128;
    return fwd + (backward ? align128(Br * 4) + align128(Br * MAXG * 4) + align128(Br * ldp<T>() * sizeof(T))
                                 + align128(Br * lda<D>() * 4) : 0);
  }
  __device__ Smem(char* p) {
    Q = (T*)p; p += align128(Br * ldq<T, D>() * sizeof(T));
    K = (T*)p; p += align128(Br * ldq<T, D>() * sizeof(T));
    S = (float*)p; p += align128(Br * lds<D>() * 4);
    row_L = (float*)p; p += align128(Br * 4);
    grp = (uint8_t*)p; p += align128(Bc);
    pos = (int*)p; p += align128(Br * 4);
    max_pos = (int*)p; p += 128;
    row_c = (float*)p; p += align128(Br * 4);  // backward only from here on
    row_g = (float*)p; p += align128(Br * MAXG * 4);
    P = (T*)p; p += align128(Br * ldp<T>() * sizeof(T));
    acc = (float*)p;
  }
};

// dst[r][:] = src[row0 + r][:] for r < Br (zeros past n_rows), in 16-byte vectors. src rows are D
// contiguous elements; both pointers are 16-byte aligned (the host checks).
template <typename T, int D> __device__ void load_tile(T* dst, const T* src, int row0, int n_rows) {
  constexpr int V = 16 / sizeof(T), VPR = D / V;  // elements per vector, vectors per row
  for (int idx = threadIdx.x; idx < Br * VPR; idx += NT) {
    const int r = idx / VPR, v = idx % VPR;
    uint4 x = make_uint4(0, 0, 0, 0);
    if (row0 + r < n_rows) x = *reinterpret_cast<const uint4*>(src + (size_t)(row0 + r) * D + v * V);
    *reinterpret_cast<uint4*>(dst + r * ldq<T, D>() + v * V) = x;
  }
}

// S = Q K^T for this warp's 16 rows (wmma) or this thread's row half (fp32). Only a __syncwarp
// is needed before the row pass, since each warp reads back the rows it computed.
template <typename T, int D> __device__ void scores(const Smem<T, D>& sm) {
  const int warp = threadIdx.x / 32;
  if constexpr (is_f32<T>()) {
    const int r = threadIdx.x / 2;
    for (int c = threadIdx.x % 2; c < Bc; c += 2) {
      float s = 0.f;
      for (int d = 0; d < D; d++) s += sm.Q[r * ldq<T, D>() + d] * sm.K[c * ldq<T, D>() + d];
      sm.S[r * LDS + c] = s;
    }
  } else {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // K^T: column-major view of K
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
    for (int n = 0; n < Bc; n += 16) {
      wmma::fill_fragment(s, 0.f);
      for (int k = 0; k < D; k += 16) {
        wmma::load_matrix_sync(a, sm.Q + warp * 16 * ldq<T, D>() + k, ldq<T, D>());
        wmma::load_matrix_sync(b, sm.K + n * ldq<T, D>() + k, ldq<T, D>());
        wmma::mma_sync(s, a, b, s);
      }
      wmma::store_matrix_sync(sm.S + warp * 16 * LDS + n, s, LDS, wmma::mem_row_major);
    }
  }
  __syncwarp();
}

// out[Br][D] (+)= A[Br][Bc] @ B[Bc][D], A = P (dQ part) or P^T (dK, transpose_a); out has row stride
// lda<D>(). Each warp owns 16 rows; `add` keeps what out held, else it is overwritten.
template <typename T, int D, bool transpose_a>
__device__ void accumulate(const Smem<T, D>& sm, const T* B, float* out, bool add) {
  const int warp = threadIdx.x / 32;
  if constexpr (is_f32<T>()) {
    const int r = threadIdx.x / 2;
    for (int d = threadIdx.x % 2; d < D; d += 2) {
      float sum = add ? out[r * lda<D>() + d] : 0.f;
      for (int j = 0; j < Bc; j++)
        sum += (transpose_a ? sm.P[j * ldp<T>() + r] : sm.P[r * ldp<T>() + j]) * B[j * ldq<T, D>() + d];
      out[r * lda<D>() + d] = sum;
    }
  } else {
    using layout = typename std::conditional<transpose_a, wmma::col_major, wmma::row_major>::type;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, layout> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    for (int n = 0; n < D; n += 16) {
      float* o = out + warp * 16 * lda<D>() + n;
      if (add) wmma::load_matrix_sync(c, o, lda<D>(), wmma::mem_row_major);
      else wmma::fill_fragment(c, 0.f);
      for (int k = 0; k < Bc; k += 16) {
        const T* pa = transpose_a ? sm.P + k * ldp<T>() + warp * 16 : sm.P + warp * 16 * ldp<T>() + k;
        wmma::load_matrix_sync(a, pa, ldp<T>());
        wmma::load_matrix_sync(b, B + k * ldq<T, D>() + n, ldq<T, D>());
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(o, c, lda<D>(), wmma::mem_row_major);
    }
  }
}

// Row pass of the backward: P[r][c] = p * (sum_g dm(g)[key in g] - sum_g dm(g) m(g)) for this
// thread's row r and every other column of the tile. Keys past q_pos (or Tk) give p = 0.
template <typename T, int D, int NG> __device__ void grad_scores(const Smem<T, D>& sm, int k0, int Tk, float scale2) {
  const int r = threadIdx.x / 2, last = min(sm.pos[r], Tk - 1) - k0;  // columns c <= last are visible
  const float L2 = sm.row_L[r], c_r = sm.row_c[r];
  float g[NG];
#pragma unroll
  for (int q = 0; q < NG; q++) g[q] = sm.row_g[r * MAXG + q];
  for (int c = threadIdx.x % 2; c < Bc; c += 2) {
    float dS = 0.f;
    if (c <= last) {
      const float p = exp2f(sm.S[r * LDS + c] * scale2 - L2);
      const uint8_t bits = sm.grp[c];
      float w = 0.f;
#pragma unroll
      for (int q = 0; q < NG; q++) w += (bits >> q & 1) ? g[q] : 0.f;
      dS = p * (w - c_r);
    }
    sm.P[r * ldp<T>() + c] = from_f<T>(dS);
  }
}

// Per-row inputs of a query tile: positions, and for the backward L (log2 units), dm and c.
template <typename T, int D>
__device__ void load_rows(const Smem<T, D>& sm, const int* q_pos, const float* lse, const float* mass,
                          const float* dmass, int row0, int Nq, int G) {
  if (threadIdx.x == 0) *sm.max_pos = -1;
  __syncthreads();
  for (int r = threadIdx.x; r < Br; r += NT) {
    const int i = row0 + r;
    sm.pos[r] = i < Nq ? q_pos[i] : -1;
    atomicMax(sm.max_pos, sm.pos[r]);
    if (lse == nullptr) continue;
    sm.row_L[r] = i < Nq ? lse[i] * LOG2E : INFINITY;
    float c = 0.f;
    for (int q = 0; q < MAXG; q++) {
      const float dm = (i < Nq && q < G) ? dmass[(size_t)i * G + q] : 0.f;
      sm.row_g[r * MAXG + q] = dm;
      c += (i < Nq && q < G) ? dm * mass[(size_t)i * G + q] : 0.f;
    }
    sm.row_c[r] = c;
  }
  __syncthreads();
}

__device__ void load_groups(uint8_t* grp, const uint8_t* key_groups, int k0, int Tk) {
  for (int c = threadIdx.x; c < Bc; c += NT) grp[c] = k0 + c < Tk ? key_groups[k0 + c] : 0;
}

// grid (Nq/Br, Hq, B). One pass over key tiles: online max, one exp2 per score, all groups at once.
template <typename T, int D, int NG>
__global__ void mass_forward(const T* q, const T* k, const int* q_pos, const uint8_t* key_groups, float* mass,
                             float* lse, int Hq, int Hkv, int Nq, int Tk, int G, float scale) {
  extern __shared__ __align__(128) char smem[];
  Smem<T, D> sm(smem);
  const int b = blockIdx.z, h = blockIdx.y, row0 = blockIdx.x * Br, hk = h / (Hq / Hkv);
  const size_t bh = (size_t)b * Hq + h;
  q += bh * Nq * D;
  k += ((size_t)b * Hkv + hk) * Tk * D;
  q_pos += (size_t)b * Nq;
  key_groups += (size_t)b * Tk;
  load_rows(sm, q_pos, nullptr, nullptr, nullptr, row0, Nq, G);
  load_tile<T, D>(sm.Q, q, row0, Nq);

  // This thread: row r, every other column. Its own running max m, sum l and group sums lg, in
  // base 2 (exp2f is one instruction); rescaled only when the max grows, merged with the partner
  // thread (the other columns) at the end.
  const int r = threadIdx.x / 2;
  const float scale2 = scale * LOG2E;
  float m = -INFINITY, l = 0.f, lg[NG] = {};
  const int n_keys = min(Tk, *sm.max_pos + 1), pos_r = sm.pos[r];
  for (int k0 = 0; k0 < n_keys; k0 += Bc) {
    __syncthreads();  // the previous K tile is no longer read
    load_tile<T, D>(sm.K, k, k0, Tk);
    load_groups(sm.grp, key_groups, k0, Tk);
    __syncthreads();
    scores<T, D>(sm);
    const int last = min(pos_r, Tk - 1) - k0;  // columns c <= last are visible
    for (int c = threadIdx.x % 2; c <= min(last, Bc - 1); c += 2) {
      const float s = sm.S[r * LDS + c] * scale2;
      if (s > m) {  // new max: rescale what was summed so far
        const float alpha = exp2f(m - s);
        l *= alpha;
#pragma unroll
        for (int q = 0; q < NG; q++) lg[q] *= alpha;
        m = s;
      }
      const float e = exp2f(s - m);
      const uint8_t bits = sm.grp[c];
      l += e;
#pragma unroll
      for (int q = 0; q < NG; q++) lg[q] += (bits >> q & 1) ? e : 0.f;
    }
  }
  const float m_other = __shfl_xor_sync(0xffffffff, m, 1), m_row = fmaxf(m, m_other);
  const float a = m == -INFINITY ? 0.f : exp2f(m - m_row);  // -inf: this half saw no key
  const float a_other = m_other == -INFINITY ? 0.f : exp2f(m_other - m_row);
  l = a * l + a_other * __shfl_xor_sync(0xffffffff, l, 1);
#pragma unroll
  for (int q = 0; q < NG; q++) lg[q] = a * lg[q] + a_other * __shfl_xor_sync(0xffffffff, lg[q], 1);
  const int i = row0 + r;
  if (threadIdx.x % 2 == 0 && i < Nq) {
    for (int q = 0; q < G; q++) mass[(bh * Nq + i) * G + q] = l > 0.f ? lg[q] / l : 0.f;
    lse[bh * Nq + i] = l > 0.f ? (m_row + log2f(l)) / LOG2E : INFINITY;  // +inf: p = 0 in the backward
  }
}

// grid (Tk/Bc, Hq, B): the backward for one key tile and query head h, looping over its query tiles
// (skipping tiles whose rows all sit before the keys). dS is computed once per (query, key) tile:
// dK += dS^T Q stays in shared memory; dS K is added to the fp32 dQ with atomics (rows are shared
// by all key tiles). One block per query head, not per kv head, for parallelism; the host sums the
// dK parts of the heads that share a kv head (GQA) and scales dQ.
template <typename T, int D, int NG>
__global__ void mass_backward(const T* q, const T* k, const int* q_pos, const uint8_t* key_groups,
                              const float* mass, const float* lse, const float* dmass, float* dq_acc,
                              float* dk_heads, int Hq, int Hkv, int Nq, int Tk, int G, float scale) {
  extern __shared__ __align__(128) char smem[];
  Smem<T, D> sm(smem);
  const int b = blockIdx.z, h = blockIdx.y, k0 = blockIdx.x * Bc, hk = h / (Hq / Hkv);
  const size_t bh = (size_t)b * Hq + h;
  load_tile<T, D>(sm.K, k + ((size_t)b * Hkv + hk) * Tk * D, k0, Tk);
  load_groups(sm.grp, key_groups + (size_t)b * Tk, k0, Tk);
  for (int idx = threadIdx.x; idx < Bc * lda<D>(); idx += NT) sm.acc[idx] = 0.f;
  for (int row0 = 0; row0 < Nq; row0 += Br) {
    __syncthreads();
    load_rows(sm, q_pos + (size_t)b * Nq, lse + bh * Nq, mass + bh * Nq * G, dmass + bh * Nq * G, row0, Nq, G);
    if (*sm.max_pos < k0) continue;  // no row of this tile sees these keys
    load_tile<T, D>(sm.Q, q + bh * Nq * D, row0, Nq);
    __syncthreads();
    scores<T, D>(sm);
    grad_scores<T, D, NG>(sm, k0, Tk, scale * LOG2E);
    __syncthreads();
    accumulate<T, D, true>(sm, sm.Q, sm.acc, true);  // dK part += P^T Q
    accumulate<T, D, false>(sm, sm.K, sm.S, false);  // S no longer needed: it takes P K
    __syncthreads();
    for (int idx = threadIdx.x; idx < Br * D; idx += NT) {
      const int r = idx / D, d = idx % D;
      if (row0 + r < Nq) atomicAdd(dq_acc + (bh * Nq + row0 + r) * D + d, sm.S[r * lda<D>() + d]);
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < Bc * D; idx += NT) {
    const int c = idx / D, d = idx % D;
    if (k0 + c < Tk) dk_heads[(bh * Tk + k0 + c) * D + d] = scale * sm.acc[c * lda<D>() + d];
  }
}

// ---------------------------------------------------------------------------------------------
// host side

// Calls f.template operator()<T, HD, NG>() for q's dtype, head dim and the group count rounded up.
template <typename F> void dispatch(const at::Tensor& q, int G, F&& f) {
  const int D = q.size(3);
  TORCH_CHECK(D == 64 || D == 128, "attention_mass: head dim ", D, " not compiled (64, 128)");
  auto by_groups = [&]<typename T, int HD>() {
    if (G <= 2) f.template operator()<T, HD, 2>(); else f.template operator()<T, HD, 8>();
  };
  auto by_dim = [&]<typename T>() {
    if (D == 64) by_groups.template operator()<T, 64>(); else by_groups.template operator()<T, 128>();
  };
  switch (q.scalar_type()) {
    case at::kFloat: by_dim.template operator()<float>(); break;
    case at::kBFloat16: by_dim.template operator()<__nv_bfloat16>(); break;
    case at::kHalf: by_dim.template operator()<__half>(); break;
    default: TORCH_CHECK(false, "attention_mass: dtype ", q.scalar_type(), " not supported");
  }
}

static at::Tensor aligned(const at::Tensor& x) {  // 16-byte vector loads need 16-byte aligned rows
  auto y = x.contiguous();
  return reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 ? y.clone() : y;
}

static void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_pos, const at::Tensor& grp, int G) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && q_pos.is_cuda() && grp.is_cuda(), "attention_mass: CUDA tensors expected");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && q_pos.is_contiguous() && grp.is_contiguous(), "attention_mass: contiguous inputs expected");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(3) == k.size(3), "attention_mass: q (B,Hq,Nq,D), k (B,Hkv,Tk,D)");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "attention_mass: Hq must be a multiple of Hkv");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "attention_mass: q and k dtypes differ");
  TORCH_CHECK(q_pos.scalar_type() == at::kInt && grp.scalar_type() == at::kByte, "attention_mass: q_pos int32, key_groups uint8");
  TORCH_CHECK(G >= 1 && G <= MAXG, "attention_mass: 1 to 8 groups");
}

std::vector<at::Tensor> forward(at::Tensor q, at::Tensor k, at::Tensor q_pos, at::Tensor key_groups, int64_t G, double scale) {
  q = aligned(q), k = aligned(k);
  check_inputs(q, k, q_pos, key_groups, G);
  const int B = q.size(0), Hq = q.size(1), Nq = q.size(2), Hkv = k.size(1), Tk = k.size(2);
  auto mass = at::empty({B, Hq, Nq, G}, q.options().dtype(at::kFloat));
  auto lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (mass.numel() == 0) return {mass, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q, G, [&]<typename T, int HD, int NG>() {
    auto kernel = mass_forward<T, HD, NG>;
    const int smem = Smem<T, HD>::bytes(false);
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kernel<<<dim3((Nq + Br - 1) / Br, Hq, B), NT, smem, stream>>>(
        (const T*)q.data_ptr(), (const T*)k.data_ptr(), q_pos.data_ptr<int>(), key_groups.data_ptr<uint8_t>(),
        mass.data_ptr<float>(), lse.data_ptr<float>(), Hq, Hkv, Nq, Tk, G, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mass, lse};
}

std::vector<at::Tensor> backward(at::Tensor dmass, at::Tensor q, at::Tensor k, at::Tensor q_pos, at::Tensor key_groups,
                                 at::Tensor mass, at::Tensor lse, double scale) {
  const int G = mass.size(3);
  q = aligned(q), k = aligned(k);
  check_inputs(q, k, q_pos, key_groups, G);
  dmass = dmass.contiguous().to(at::kFloat);
  const int B = q.size(0), Hq = q.size(1), Nq = q.size(2), Hkv = k.size(1), Tk = k.size(2);
  auto dq_acc = at::zeros({B, Hq, Nq, q.size(3)}, q.options().dtype(at::kFloat));
  auto dk_heads = at::empty({B, Hq, Tk, q.size(3)}, q.options().dtype(at::kFloat));  // every element written
  if (q.numel() == 0 || k.numel() == 0) return {at::zeros_like(q), at::zeros_like(k)};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q, G, [&]<typename T, int HD, int NG>() {
    auto kernel = mass_backward<T, HD, NG>;
    const int smem = Smem<T, HD>::bytes(true);
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kernel<<<dim3((Tk + Bc - 1) / Bc, Hq, B), NT, smem, stream>>>(
        (const T*)q.data_ptr(), (const T*)k.data_ptr(), q_pos.data_ptr<int>(), key_groups.data_ptr<uint8_t>(),
        mass.data_ptr<float>(), lse.data_ptr<float>(), dmass.data_ptr<float>(), dq_acc.data_ptr<float>(),
        dk_heads.data_ptr<float>(), Hq, Hkv, Nq, Tk, G, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto dq = (dq_acc * scale).to(q.scalar_type());
  auto dk = dk_heads.view({B, Hkv, Hq / Hkv, Tk, q.size(3)}).sum(2).to(k.scalar_type());
  return {dq, dk};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "attention mass forward: (mass (B,Hq,Nq,G) fp32, lse (B,Hq,Nq) fp32)");
  m.def("backward", &backward, "attention mass backward: (dq, dk)");
}
