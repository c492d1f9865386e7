// Masked attention-mass reduction, forward and backward, never materialising the (Nq, Tk) matrix.
//
// For query row i (position q_pos[i]) and keys j <= q_pos[i]:
//   s_ij = scale * q_i . k_j,   p_ij = softmax_j(s_ij),   m_i(g) = sum_{j in group g} p_ij
// Forward: one pass over key tiles with an online max m_i; l_i = sum_j exp(s_ij - m_i) and one
//   l_i(g) per group, accumulated from the same exponentials; m_i(g) = l_i(g) / l_i. Saves
//   L_i = m_i + log l_i (the row log-sum-exp).
// Backward: p_ij = exp(s_ij - L_i) recomputed from q, k, L (no V, no dO). With upstream dm_i(g):
//   dS_ij = p_ij * (sum_g dm_i(g) [j in g] - sum_g dm_i(g) m_i(g));  dQ = scale dS K;  dK = scale dS^T Q
//   dK sums over the query heads that share a kv head (GQA), so there are no atomics.
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
constexpr int MAXG = 8;                     // groups per pass: the bits of a uint8
constexpr float LOG2E = 1.4426950408889634f;

template <typename T> constexpr bool is_f32() { return std::is_same<T, float>::value; }
template <typename T, int D> constexpr int ldq() { return is_f32<T>() ? D + 1 : D + 8; }  // padded rows
template <typename T> constexpr int ldp() { return is_f32<T>() ? Bc + 1 : Bc + 8; }
constexpr int LDS = Bc + 4;
template <int D> constexpr int lda() { return D + 4; }
__host__ __device__ constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }

template <typename T> __device__ __forceinline__ T from_f(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f(float x) { return __float2half(x); }

// Shared memory, carved in 128-byte aligned pieces (wmma pointers must be 32-byte aligned).
template <typename T, int D> struct Smem {
  T *Q, *K, *P; float *S, *acc, *row_L, *row_c, *row_g; uint8_t *grp; int *pos, *max_pos;
  static constexpr int bytes() {
    return 2 * align128(Br * ldq<T, D>() * sizeof(T)) + align128(Br * ldp<T>() * sizeof(T))
         + align128(Br * LDS * 4) + align128(Br * lda<D>() * 4) + 3 * align128(Br * MAXG * 4)
         + align128(Bc) + align128(Br * 4) + 128;
  }
  __device__ Smem(char* p) {
    Q = (T*)p; p += align128(Br * ldq<T, D>() * sizeof(T));
    K = (T*)p; p += align128(Br * ldq<T, D>() * sizeof(T));
    P = (T*)p; p += align128(Br * ldp<T>() * sizeof(T));
    S = (float*)p; p += align128(Br * LDS * 4);
    acc = (float*)p; p += align128(Br * lda<D>() * 4);
    row_L = (float*)p; p += align128(Br * MAXG * 4);
    row_c = (float*)p; p += align128(Br * MAXG * 4);
    row_g = (float*)p; p += align128(Br * MAXG * 4);
    grp = (uint8_t*)p; p += align128(Bc);
    pos = (int*)p; p += align128(Br * 4);
    max_pos = (int*)p;
  }
};

// dst[r][:] = src[row0 + r][:] for r < Br (zeros past n_rows). src rows are D contiguous elements.
template <typename T, int D> __device__ void load_tile(T* dst, const T* src, int row0, int n_rows) {
  for (int idx = threadIdx.x; idx < Br * D; idx += NT) {
    int r = idx / D, d = idx % D;
    dst[r * ldq<T, D>() + d] = row0 + r < n_rows ? src[(size_t)(row0 + r) * D + d] : from_f<T>(0.f);
  }
}

// S = Q K^T for this warp's 16 rows (wmma) or this thread's row half (fp32). Only a __syncwarp
// is needed before the row pass, since each warp reads back the rows it computed.
template <typename T, int D> __device__ void scores(const Smem<T, D>& sm) {
  const int warp = threadIdx.x / 32;
  if constexpr (is_f32<T>()) {
    const int r = threadIdx.x / 2, c0 = (threadIdx.x % 2) * (Bc / 2);
    for (int c = c0; c < c0 + Bc / 2; c++) {
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

// acc[Br][D] += A[Br][Bc] @ B[Bc][D], A = P (dQ) or P^T (dK, transpose_a). Each warp owns 16 rows.
template <typename T, int D, bool transpose_a> __device__ void accumulate(const Smem<T, D>& sm, const T* B) {
  const int warp = threadIdx.x / 32;
  if constexpr (is_f32<T>()) {
    const int r = threadIdx.x / 2, d0 = (threadIdx.x % 2) * (D / 2);
    for (int j = 0; j < Bc; j++) {
      float a = transpose_a ? sm.P[j * ldp<T>() + r] : sm.P[r * ldp<T>() + j];
      for (int d = d0; d < d0 + D / 2; d++) sm.acc[r * lda<D>() + d] += a * B[j * ldq<T, D>() + d];
    }
  } else {
    using layout = typename std::conditional<transpose_a, wmma::col_major, wmma::row_major>::type;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, layout> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    for (int n = 0; n < D; n += 16) {
      float* out = sm.acc + warp * 16 * lda<D>() + n;
      wmma::load_matrix_sync(c, out, lda<D>(), wmma::mem_row_major);
      for (int k = 0; k < Bc; k += 16) {
        const T* pa = transpose_a ? sm.P + k * ldp<T>() + warp * 16 : sm.P + warp * 16 * ldp<T>() + k;
        wmma::load_matrix_sync(a, pa, ldp<T>());
        wmma::load_matrix_sync(b, B + k * ldq<T, D>() + n, ldq<T, D>());
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(out, c, lda<D>(), wmma::mem_row_major);
    }
  }
}

// Row pass of the backward: P[r][c] = p * (sum_g dm(g)[key in g] - sum_g dm(g) m(g)) for this
// thread's row r and half of the tile's columns. Keys past q_pos (or Tk) give p = 0.
template <typename T, int D> __device__ void grad_scores(const Smem<T, D>& sm, int k0, int Tk, int G, float scale2) {
  const int r = threadIdx.x / 2, c0 = (threadIdx.x % 2) * (Bc / 2);
  const float L2 = sm.row_L[r], c_r = sm.row_c[r];
  float g[MAXG];
#pragma unroll
  for (int q = 0; q < MAXG; q++) g[q] = q < G ? sm.row_g[r * MAXG + q] : 0.f;
  for (int c = c0; c < c0 + Bc / 2; c++) {
    const int j = k0 + c;
    const float p = (j < Tk && j <= sm.pos[r]) ? exp2f(sm.S[r * LDS + c] * scale2 - L2) : 0.f;
    const uint8_t bits = sm.grp[c];
    float w = 0.f;
#pragma unroll
    for (int q = 0; q < MAXG; q++) w += (bits >> q & 1) ? g[q] : 0.f;
    sm.P[r * ldp<T>() + c] = from_f<T>(p * (w - c_r));
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
template <typename T, int D>
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

  const int r = threadIdx.x / 2, c0 = (threadIdx.x % 2) * (Bc / 2);  // this thread: row r, half the columns
  const float scale2 = scale * LOG2E;  // work in base 2: exp2f is one instruction
  float m = -INFINITY, l = 0.f, lg[MAXG] = {};
  const int n_keys = min(Tk, *sm.max_pos + 1);
  for (int k0 = 0; k0 < n_keys; k0 += Bc) {
    __syncthreads();  // the previous K tile is no longer read
    load_tile<T, D>(sm.K, k, k0, Tk);
    load_groups(sm.grp, key_groups, k0, Tk);
    __syncthreads();
    scores<T, D>(sm);
    float m_tile = -INFINITY;
    for (int c = c0; c < c0 + Bc / 2; c++)
      if (k0 + c < Tk && k0 + c <= sm.pos[r]) m_tile = fmaxf(m_tile, sm.S[r * LDS + c] * scale2);
    m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffff, m_tile, 1));  // both halves share the row max
    const float m_new = fmaxf(m, m_tile);
    if (m_new == -INFINITY) continue;  // no visible key yet
    const float alpha = exp2f(m - m_new);
    l *= alpha;
#pragma unroll
    for (int q = 0; q < MAXG; q++) lg[q] *= alpha;
    for (int c = c0; c < c0 + Bc / 2; c++) {
      if (k0 + c >= Tk || k0 + c > sm.pos[r]) continue;
      const float e = exp2f(sm.S[r * LDS + c] * scale2 - m_new);
      const uint8_t bits = sm.grp[c];
      l += e;
#pragma unroll
      for (int q = 0; q < MAXG; q++) lg[q] += (bits >> q & 1) ? e : 0.f;
    }
    m = m_new;
  }
  l += __shfl_xor_sync(0xffffffff, l, 1);
#pragma unroll
  for (int q = 0; q < MAXG; q++) lg[q] += __shfl_xor_sync(0xffffffff, lg[q], 1);
  const int i = row0 + r;
  if (threadIdx.x % 2 == 0 && i < Nq) {
    for (int q = 0; q < G; q++) mass[(bh * Nq + i) * G + q] = l > 0.f ? lg[q] / l : 0.f;
    lse[bh * Nq + i] = l > 0.f ? (m + log2f(l)) / LOG2E : INFINITY;  // +inf: p = 0 in the backward
  }
}

// grid (Nq/Br, Hq, B): dQ for one query tile, looping over key tiles.
template <typename T, int D>
__global__ void mass_backward_dq(const T* q, const T* k, const int* q_pos, const uint8_t* key_groups,
                                 const float* mass, const float* lse, const float* dmass, T* dq,
                                 int Hq, int Hkv, int Nq, int Tk, int G, float scale) {
  extern __shared__ __align__(128) char smem[];
  Smem<T, D> sm(smem);
  const int b = blockIdx.z, h = blockIdx.y, row0 = blockIdx.x * Br, hk = h / (Hq / Hkv);
  const size_t bh = (size_t)b * Hq + h;
  q += bh * Nq * D;
  dq += bh * Nq * D;
  k += ((size_t)b * Hkv + hk) * Tk * D;
  key_groups += (size_t)b * Tk;
  load_rows(sm, q_pos + (size_t)b * Nq, lse + bh * Nq, mass + bh * Nq * G, dmass + bh * Nq * G, row0, Nq, G);
  load_tile<T, D>(sm.Q, q, row0, Nq);
  for (int idx = threadIdx.x; idx < Br * lda<D>(); idx += NT) sm.acc[idx] = 0.f;
  const int n_keys = min(Tk, *sm.max_pos + 1);
  for (int k0 = 0; k0 < n_keys; k0 += Bc) {
    __syncthreads();
    load_tile<T, D>(sm.K, k, k0, Tk);
    load_groups(sm.grp, key_groups, k0, Tk);
    __syncthreads();
    scores<T, D>(sm);
    grad_scores<T, D>(sm, k0, Tk, G, scale * LOG2E);
    __syncthreads();
    accumulate<T, D, false>(sm, sm.K);  // acc += P K
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < Br * D; idx += NT) {
    const int r = idx / D, d = idx % D;
    if (row0 + r < Nq) dq[(size_t)(row0 + r) * D + d] = from_f<T>(scale * sm.acc[r * lda<D>() + d]);
  }
}

// grid (Tk/Bc, Hkv, B): dK for one key tile, looping over the query heads of its kv head and their
// query tiles (skipping tiles whose rows all sit before the keys).
template <typename T, int D>
__global__ void mass_backward_dk(const T* q, const T* k, const int* q_pos, const uint8_t* key_groups,
                                 const float* mass, const float* lse, const float* dmass, T* dk,
                                 int Hq, int Hkv, int Nq, int Tk, int G, float scale) {
  extern __shared__ __align__(128) char smem[];
  Smem<T, D> sm(smem);
  const int b = blockIdx.z, hk = blockIdx.y, k0 = blockIdx.x * Bc, group = Hq / Hkv;
  const size_t bhk = (size_t)b * Hkv + hk;
  load_tile<T, D>(sm.K, k + bhk * Tk * D, k0, Tk);
  load_groups(sm.grp, key_groups + (size_t)b * Tk, k0, Tk);
  for (int idx = threadIdx.x; idx < Bc * lda<D>(); idx += NT) sm.acc[idx] = 0.f;
  for (int h = hk * group; h < (hk + 1) * group; h++) {
    const size_t bh = (size_t)b * Hq + h;
    for (int row0 = 0; row0 < Nq; row0 += Br) {
      __syncthreads();
      load_rows(sm, q_pos + (size_t)b * Nq, lse + bh * Nq, mass + bh * Nq * G, dmass + bh * Nq * G, row0, Nq, G);
      if (*sm.max_pos < k0) continue;  // no row of this tile sees these keys
      load_tile<T, D>(sm.Q, q + bh * Nq * D, row0, Nq);
      __syncthreads();
      scores<T, D>(sm);
      grad_scores<T, D>(sm, k0, Tk, G, scale * LOG2E);
      __syncthreads();
      accumulate<T, D, true>(sm, sm.Q);  // acc += P^T Q
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < Bc * D; idx += NT) {
    const int c = idx / D, d = idx % D;
    if (k0 + c < Tk) dk[(bhk * Tk + k0 + c) * D + d] = from_f<T>(scale * sm.acc[c * lda<D>() + d]);
  }
}

// ---------------------------------------------------------------------------------------------
// host side

#define DISPATCH(q, D, ...)                                                                        \
  [&] {                                                                                            \
    auto st = q.scalar_type();                                                                     \
    TORCH_CHECK(D == 64 || D == 128, "attention_mass: head dim ", D, " not compiled (64, 128)");     \
    if (st == at::kFloat) { using T = float; if (D == 64) { constexpr int HD = 64; __VA_ARGS__(); } else { constexpr int HD = 128; __VA_ARGS__(); } } \
    else if (st == at::kBFloat16) { using T = __nv_bfloat16; if (D == 64) { constexpr int HD = 64; __VA_ARGS__(); } else { constexpr int HD = 128; __VA_ARGS__(); } } \
    else if (st == at::kHalf) { using T = __half; if (D == 64) { constexpr int HD = 64; __VA_ARGS__(); } else { constexpr int HD = 128; __VA_ARGS__(); } } \
    else TORCH_CHECK(false, "attention_mass: dtype ", st, " not supported");                       \
  }()

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
  check_inputs(q, k, q_pos, key_groups, G);
  const int B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  auto mass = at::empty({B, Hq, Nq, G}, q.options().dtype(at::kFloat));
  auto lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (mass.numel() == 0) return {mass, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  DISPATCH(q, D, [&] {
    auto kernel = mass_forward<T, HD>;
    const int smem = Smem<T, HD>::bytes();
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kernel<<<dim3((Nq + Br - 1) / Br, Hq, B), NT, smem, stream>>>(
        (const T*)q.data_ptr(), (const T*)k.data_ptr(), q_pos.data_ptr<int>(), key_groups.data_ptr<uint8_t>(),
        mass.data_ptr<float>(), lse.data_ptr<float>(), Hq, Hkv, Nq, Tk, G, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mass, lse};
}

std::vector<at::Tensor> backward(at::Tensor dmass, at::Tensor q, at::Tensor k, at::Tensor q_pos, at::Tensor key_groups,
                                 at::Tensor mass, at::Tensor lse, double scale) {
  const int G = mass.size(3);
  check_inputs(q, k, q_pos, key_groups, G);
  dmass = dmass.contiguous().to(at::kFloat);
  const int B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  auto dq = at::zeros_like(q), dk = at::zeros_like(k);
  if (q.numel() == 0 || k.numel() == 0) return {dq, dk};
  auto stream = c10::cuda::getCurrentCUDAStream();
  DISPATCH(q, D, [&] {
    const int smem = Smem<T, HD>::bytes();
    auto kq = mass_backward_dq<T, HD>;
    cudaFuncSetAttribute(kq, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kq<<<dim3((Nq + Br - 1) / Br, Hq, B), NT, smem, stream>>>(
        (const T*)q.data_ptr(), (const T*)k.data_ptr(), q_pos.data_ptr<int>(), key_groups.data_ptr<uint8_t>(),
        mass.data_ptr<float>(), lse.data_ptr<float>(), dmass.data_ptr<float>(), (T*)dq.data_ptr(), Hq, Hkv, Nq, Tk, G, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto kk = mass_backward_dk<T, HD>;
    cudaFuncSetAttribute(kk, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kk<<<dim3((Tk + Bc - 1) / Bc, Hkv, B), NT, smem, stream>>>(
        (const T*)q.data_ptr(), (const T*)k.data_ptr(), q_pos.data_ptr<int>(), key_groups.data_ptr<uint8_t>(),
        mass.data_ptr<float>(), lse.data_ptr<float>(), dmass.data_ptr<float>(), (T*)dk.data_ptr(), Hq, Hkv, Nq, Tk, G, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dk};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "attention mass forward: (mass (B,Hq,Nq,G) fp32, lse (B,Hq,Nq) fp32)");
  m.def("backward", &backward, "attention mass backward: (dq, dk)");
}
