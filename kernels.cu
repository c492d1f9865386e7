// Masked attention-mass reduction, forward and backward, never materialising the (Nq, Tk) matrix.
//
// For query row i (position q_pos[i]) and keys j <= q_pos[i]:
//   s_ij = scale * q_i . k_j,   p_ij = softmax_j(s_ij),   m_i(g) = sum_{j in group g} p_ij
// Forward: one pass over key tiles with an online max m_i; l_i = sum_j exp(s_ij - m_i) and one
//   l_i(g) per group, accumulated from the same exponentials; m_i(g) = l_i(g) / l_i. Saves
//   L_i = m_i + log l_i (the row log-sum-exp).
// Backward: p_ij = exp(s_ij - L_i) recomputed from q, k, L (no V, no dO). With upstream dm_i(g):
//   dS_ij = p_ij * (sum_g dm_i(g) [j in g] - sum_g dm_i(g) m_i(g));  dQ = scale dS K;  dK = scale dS^T Q
//   c_i = sum_g dm_i(g) m_i(g) is one number per row, computed once on the host.
//   One block per (key tile, kv head) loops over the query heads that share it (GQA) and their query
//   tiles: dK stays in registers; dS K goes to an fp32 dQ with atomics (all key tiles add to a row).
// Names follow the flash-attention papers: Br x Bc tiles, S the score tile (St = S^T in the
// backward), dSt the dS^T tile; g is the fragment row of a lane, gi a group index.
// Matmuls run on tensor cores (mma.sync m16n8k16, operands from shared memory through ldmatrix, the
// score tile in registers) for 16-bit inputs; fp32 inputs compute the same fragments with FMAs.
// tests/emulate_kernels.cpp runs this file on the CPU, so CI checks its indexing without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

constexpr int NT = 128, WARPS = NT / 32;   // threads per block; each warp owns 16 rows of a tile
constexpr int Br = 16 * WARPS, Bc = Br;     // query rows and key columns of a tile: 64 x 64
constexpr int MAXG = 8;                     // groups per pass: the bits of a uint8; kernels take NG = 2 or 8
static_assert(Br == 64 && Bc == Br,
              "load_tile, the group bits and Smem are laid out for square 64-row tiles");
constexpr float LOG2E = 1.4426950408889634f;

// a row stride of W elements plus 16 bytes: no bank conflicts
template <typename T, int W> constexpr int ld() { return W + 16 / (int)sizeof(T); }

#include "kernels_mma.cuh"  // ldmatrix, mma.sync and mma_tile: the warp-level matrix multiply

// dst[r][:] = src[row0 + r][:] for r < Br (zeros past n_rows), in 16-byte vectors. src rows are D
// contiguous elements; src is 16-byte aligned (the host checks).
template <typename T, int D> __device__ void load_tile(T* dst, const T* src, int row0, int n_rows) {
  constexpr int V = 16 / sizeof(T), VPR = D / V;  // elements per vector, vectors per row
  for (int idx = threadIdx.x; idx < Br * VPR; idx += NT) {
    const int r = idx / VPR, v = idx % VPR;
    uint4 x = make_uint4(0, 0, 0, 0);
    if (row0 + r < n_rows) x = *reinterpret_cast<const uint4*>(src + (size_t)(row0 + r) * D + v * V);
    *reinterpret_cast<uint4*>(dst + r * ld<T, D>() + v * V) = x;
  }
}

template <typename T> __device__ __forceinline__ void store2(T* p, float a, float b) {  // p[0], p[1] = a, b
  if constexpr (is_f32<T>()) p[0] = a, p[1] = b;
  else if constexpr (std::is_same<T, __nv_bfloat16>::value)
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  else *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}

// Shared memory, carved in 16-byte aligned pieces (ldmatrix rows must be): Q and K tiles, the group
// bits of the key tile, row positions; the backward adds the dS^T tile and per-row L, c and dm.
template <typename T, int D> struct Smem {
  T *Q, *K, *dSt; uint8_t* grp; int* pos; float *row_L, *row_c, *row_dm;
  static constexpr int tile = Br * ld<T, D>() * sizeof(T), dst_tile = Bc * ld<T, Br>() * sizeof(T);
  static_assert(Bc % 16 == 0 && (Br * 4) % 16 == 0, "every piece starts 16-byte aligned");
  static constexpr int bytes(bool backward) {
    return 2 * tile + Bc + Br * 4 + (backward ? dst_tile + 2 * Br * 4 + Br * MAXG * 4 : 0);
  }
  __device__ Smem(char* p) {
    Q = (T*)p; p += tile;
    K = (T*)p; p += tile;
    grp = (uint8_t*)p; p += Bc;
    pos = (int*)p; p += Br * 4;
    dSt = (T*)p; p += dst_tile;  // backward only from here on
    row_L = (float*)p; p += Br * 4;
    row_c = (float*)p; p += Br * 4;
    row_dm = (float*)p;
  }
};

__device__ void load_groups(uint8_t* grp, const uint8_t* key_groups, int k0, int Tk) {
  for (int c = threadIdx.x; c < Bc; c += NT) grp[c] = k0 + c < Tk ? key_groups[k0 + c] : 0;
}

__device__ float quad_max(float x) {  // over the 4 lanes that hold one fragment row
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// grid (Nq/Br, Hq, B), the longest query tiles (most keys) first. Warp w holds the scores of rows
// 16w + g and 16w + g + 8 of the tile (g = lane / 4), 16 columns per lane; one exp2 per score
// feeds the row sum and every group sum, and the 4 lanes of a row share its running max.
template <typename T, int D, int NG>
__global__ void __launch_bounds__(NT) mass_forward(const T* q, const T* k, const int* q_pos,
                                                   const uint8_t* key_groups, float* mass, float* lse, int Hq,
                                                   int Hkv, int Nq, int Tk, int G, float scale) {
  extern __shared__ __align__(128) char smem[];
  Smem<T, D> sm(smem);
  const int b = blockIdx.z, h = blockIdx.y, row0 = (gridDim.x - 1 - blockIdx.x) * Br, hk = h / (Hq / Hkv);
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const size_t bh = (size_t)b * Hq + h;
  q += bh * Nq * D;
  k += ((size_t)b * Hkv + hk) * Tk * D;
  load_tile<T, D>(sm.Q, q, row0, Nq);
  for (int r = threadIdx.x; r < Br; r += NT)
    sm.pos[r] = row0 + r < Nq ? min(q_pos[(size_t)b * Nq + row0 + r], Tk - 1) : -1;
  __syncthreads();
  int n_keys = 0;  // keys past the tile's last position are never visible
  for (int r = 0; r < Br; r++) n_keys = max(n_keys, sm.pos[r] + 1);
  const int pos[2] = {sm.pos[16 * warp + g], sm.pos[16 * warp + g + 8]};

  // Per row e: running max m (base 2: exp2f is one instruction), sum l, group sums lg.
  const float scale2 = scale * LOG2E;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, lg[2][NG] = {};
  for (int k0 = 0; k0 < n_keys; k0 += Bc) {
    __syncthreads();  // the previous K tile is no longer read
    load_tile<T, D>(sm.K, k, k0, Tk);
    load_groups(sm.grp, key_groups + (size_t)b * Tk, k0, Tk);
    __syncthreads();
    float S[Bc / 8][4] = {};
    mma_tile<T, Bc / 8, D, false, false>(S, sm.Q + 16 * warp * ld<T, D>(), ld<T, D>(), sm.K, ld<T, D>());
#pragma unroll
    for (int e = 0; e < 2; e++) {  // S[n][2e + j]: row e's column 8n + 2t + j
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < Bc / 8; n++)
        for (int j = 0; j < 2; j++) {
          const int c = 8 * n + 2 * t + j;
          S[n][2 * e + j] = k0 + c <= pos[e] ? S[n][2 * e + j] * scale2 : -INFINITY;
          tile_max = fmaxf(tile_max, S[n][2 * e + j]);
        }
      const float m_new = fmaxf(m[e], quad_max(tile_max));
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: every exp2 is 0
      const float alpha = exp2f(m[e] - m_safe);                 // rescale what was summed so far
      l[e] *= alpha;
#pragma unroll
      for (int gi = 0; gi < NG; gi++) lg[e][gi] *= alpha;
      m[e] = m_new;
#pragma unroll
      for (int n = 0; n < Bc / 8; n++)
        for (int j = 0; j < 2; j++) {
          const float p = exp2f(S[n][2 * e + j] - m_safe);
          const uint8_t bits = sm.grp[8 * n + 2 * t + j];
          l[e] += p;
#pragma unroll
          for (int gi = 0; gi < NG; gi++) lg[e][gi] += (bits >> gi & 1) ? p : 0.f;
        }
    }
  }
  for (int e = 0; e < 2; e++) {
    const float l_row = quad_sum(l[e]);
    float lg_row[NG];
#pragma unroll
    for (int gi = 0; gi < NG; gi++) lg_row[gi] = quad_sum(lg[e][gi]);
    const int i = row0 + 16 * warp + g + 8 * e;
    if (t == 0 && i < Nq) {
      for (int gi = 0; gi < G; gi++) mass[(bh * Nq + i) * G + gi] = l_row > 0.f ? lg_row[gi] / l_row : 0.f;
      // +inf: p = 0 in the backward
      lse[bh * Nq + i] = l_row > 0.f ? (m[e] + log2f(l_row)) / LOG2E : INFINITY;
    }
  }
}

// grid (Tk/Bc, Hkv, B): keys k0..k0+63 of kv head hk; warp w owns keys 16w..16w+15. For each query
// head of the group and each query tile that can see these keys: S^T = K Q^T in registers, dS^T
// into shared memory, dK += dS^T Q (registers, this warp's keys), then dQ = dS K for the warp's 16
// query rows, added to the fp32 dq_acc with atomics.
template <typename T, int D, int NG>
__global__ void __launch_bounds__(NT) mass_backward(const T* q, const T* k, const int* q_pos,
                                                    const uint8_t* key_groups, const float* row_c,
                                                    const float* lse, const float* dmass, float* dq_acc, T* dk,
                                                    int Hq, int Hkv, int Nq, int Tk, int G, float scale) {
  extern __shared__ __align__(128) char smem[];
  Smem<T, D> sm(smem);
  const int b = blockIdx.z, hk = blockIdx.y, k0 = blockIdx.x * Bc, rep = Hq / Hkv;
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const size_t bk = (size_t)b * Hkv + hk;
  constexpr int LD = ld<T, D>(), LP = ld<T, Br>();
  load_tile<T, D>(sm.K, k + bk * Tk * D, k0, Tk);
  load_groups(sm.grp, key_groups + (size_t)b * Tk, k0, Tk);
  __syncthreads();
  const int key[2] = {k0 + 16 * warp + g, k0 + 16 * warp + g + 8};  // this lane's two fragment rows
  const uint8_t bits[2] = {sm.grp[16 * warp + g], sm.grp[16 * warp + g + 8]};
  const float scale2 = scale * LOG2E;
  float dK[D / 8][4] = {};
  for (int h = hk * rep; h < (hk + 1) * rep; h++) {
    const size_t bh = (size_t)b * Hq + h;
    for (int row0 = 0; row0 < Nq; row0 += Br) {
      __syncthreads();  // the previous Q and dS tiles are no longer read
      bool sees_keys = false;
      for (int r = threadIdx.x; r < Br; r += NT) {  // per row: position, L (base 2), dm, c
        const int i = row0 + r;
        sm.pos[r] = i < Nq ? min(q_pos[(size_t)b * Nq + i], Tk - 1) : -1;
        sees_keys |= sm.pos[r] >= k0;
        sm.row_L[r] = i < Nq ? lse[bh * Nq + i] * LOG2E : INFINITY;
        for (int gi = 0; gi < MAXG; gi++)
          sm.row_dm[r * MAXG + gi] = i < Nq && gi < G ? dmass[(bh * Nq + i) * G + gi] : 0.f;
        sm.row_c[r] = i < Nq ? row_c[bh * Nq + i] : 0.f;
      }
      if (!__syncthreads_or(sees_keys)) continue;  // no row of this tile sees these keys
      load_tile<T, D>(sm.Q, q + bh * Nq * D, row0, Nq);
      __syncthreads();

      float St[Br / 8][4] = {};  // S^T = K Q^T: this warp's 16 keys x Br query rows
      mma_tile<T, Br / 8, D, false, false>(St, sm.K + 16 * warp * LD, LD, sm.Q, LD);
#pragma unroll
      for (int n = 0; n < Br / 8; n++) {
        float dS[2][2];  // [key e][query row 8n + 2t + j], from St[n][2e + j]
        for (int j = 0; j < 2; j++) {
          const int r = 8 * n + 2 * t + j;
          const float L = sm.row_L[r], c = sm.row_c[r];
          float dm[NG];
#pragma unroll
          for (int gi = 0; gi < NG; gi++) dm[gi] = sm.row_dm[r * MAXG + gi];
          for (int e = 0; e < 2; e++) {
            float w = 0.f;  // sum of dm over the groups of key e
#pragma unroll
            for (int gi = 0; gi < NG; gi++) w += (bits[e] >> gi & 1) ? dm[gi] : 0.f;
            dS[e][j] = key[e] <= sm.pos[r] ? exp2f(St[n][2 * e + j] * scale2 - L) * (w - c) : 0.f;
          }
        }
        for (int e = 0; e < 2; e++)
          store2(sm.dSt + (16 * warp + g + 8 * e) * LP + 8 * n + 2 * t, dS[e][0], dS[e][1]);
      }
      __syncwarp();  // dK reads only this warp's rows of dS^T
      mma_tile<T, D / 8, Br, false, true>(dK, sm.dSt + 16 * warp * LP, LP, sm.Q, LD);
      __syncthreads();  // dQ reads every warp's dS^T
      float dQ[D / 8][4] = {};  // rows 16 warp + g (+8) of the query tile
      mma_tile<T, D / 8, Bc, true, true>(dQ, sm.dSt + 16 * warp, LP, sm.K, LD);
      for (int e = 0; e < 2; e++) {
        const int i = row0 + 16 * warp + g + 8 * e;
        if (i >= Nq) continue;
        float* out = dq_acc + (bh * Nq + i) * D + 2 * t;
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
          atomicAdd(out + 8 * n, scale * dQ[n][2 * e]);
          atomicAdd(out + 8 * n + 1, scale * dQ[n][2 * e + 1]);
        }
      }
    }
  }
  for (int e = 0; e < 2; e++)
    if (key[e] < Tk)
#pragma unroll
      for (int n = 0; n < D / 8; n++)
        store2(dk + (bk * Tk + key[e]) * D + 8 * n + 2 * t, scale * dK[n][2 * e], scale * dK[n][2 * e + 1]);
}

// Calls f.template operator()<T, HD, NG>() for the dtype (0 fp32, 1 bf16, 2 fp16), head dim and the
// group count rounded up; false if that combination is not compiled.
template <typename F> bool dispatch(int dtype, int D, int G, F&& f) {
  auto by_groups = [&]<typename T, int HD>() {
    if (G <= 2) f.template operator()<T, HD, 2>(); else f.template operator()<T, HD, 8>();
  };
  auto by_dim = [&]<typename T>() {
    if (D == 64) by_groups.template operator()<T, 64>(); else by_groups.template operator()<T, 128>();
  };
  if ((D != 64 && D != 128) || dtype < 0 || dtype > 2 || G < 1 || G > MAXG) return false;
  if (dtype == 0) by_dim.template operator()<float>();
  else if (dtype == 1) by_dim.template operator()<__nv_bfloat16>();
  else by_dim.template operator()<__half>();
  return true;
}

// ---------------------------------------------------------------------------------------------
// host side
#ifndef EMULATE_ON_CPU
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

static int dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default:
      TORCH_CHECK(false, "attention_mass: dtype ", x.scalar_type(), " not supported (fp32, bf16, fp16)");
  }
}

static at::Tensor aligned(const at::Tensor& x) {  // 16-byte vector loads need 16-byte aligned rows
  auto y = x.contiguous();
  return reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 ? y.clone() : y;
}

static void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_pos, const at::Tensor& grp,
                         int G) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && q_pos.is_cuda() && grp.is_cuda(),
              "attention_mass: CUDA tensors expected");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && q_pos.is_contiguous() && grp.is_contiguous(),
              "attention_mass: contiguous inputs expected");
  TORCH_CHECK(k.device() == q.device() && q_pos.device() == q.device() && grp.device() == q.device(),
              "attention_mass: inputs on different devices");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "attention_mass: q (B,Hq,Nq,D), k (B,Hkv,Tk,D)");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention_mass: Hq must be a multiple of Hkv >= 1");
  TORCH_CHECK(q_pos.dim() == 2 && q_pos.size(0) == q.size(0) && q_pos.size(1) == q.size(2),
              "attention_mass: q_pos (B,Nq)");
  TORCH_CHECK(grp.dim() == 2 && grp.size(0) == k.size(0) && grp.size(1) == k.size(2),
              "attention_mass: key_groups (B,Tk)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "attention_mass: q and k dtypes differ");
  TORCH_CHECK(q_pos.scalar_type() == at::kInt && grp.scalar_type() == at::kByte,
              "attention_mass: q_pos int32, key_groups uint8");
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "attention_mass: head dim ", q.size(3),
              " not compiled (64, 128)");
  TORCH_CHECK(G >= 1 && G <= MAXG, "attention_mass: 1 to 8 groups");
}

std::vector<at::Tensor> forward(at::Tensor q, at::Tensor k, at::Tensor q_pos, at::Tensor key_groups, int64_t G,
                                double scale) {
  const c10::cuda::CUDAGuard device_guard(q.device());  // launch on q's GPU, not the current one
  q = aligned(q), k = aligned(k);
  check_inputs(q, k, q_pos, key_groups, G);
  const int B = q.size(0), Hq = q.size(1), Nq = q.size(2), Hkv = k.size(1), Tk = k.size(2);
  auto mass = at::empty({B, Hq, Nq, G}, q.options().dtype(at::kFloat));
  auto lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (mass.numel() == 0) return {mass, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(dtype_code(q), q.size(3), G, [&]<typename T, int HD, int NG>() {
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

std::vector<at::Tensor> backward(at::Tensor dmass, at::Tensor q, at::Tensor k, at::Tensor q_pos,
                                 at::Tensor key_groups, at::Tensor mass, at::Tensor lse, double scale) {
  const int G = mass.size(3);
  const c10::cuda::CUDAGuard device_guard(q.device());
  q = aligned(q), k = aligned(k);
  check_inputs(q, k, q_pos, key_groups, G);
  TORCH_CHECK(dmass.sizes() == mass.sizes(), "attention_mass: dmass and mass shapes differ");
  dmass = dmass.contiguous().to(at::kFloat);
  auto row_c = (dmass * mass).sum(-1).contiguous();  // (B, Hq, Nq): the same for every key tile
  const int B = q.size(0), Hq = q.size(1), Nq = q.size(2), Hkv = k.size(1), Tk = k.size(2);
  auto dq_acc = at::zeros({B, Hq, Nq, q.size(3)}, q.options().dtype(at::kFloat));
  auto dk = at::empty_like(k);  // every element written
  if (q.numel() == 0 || k.numel() == 0) return {at::zeros_like(q), at::zeros_like(k)};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(dtype_code(q), q.size(3), G, [&]<typename T, int HD, int NG>() {
    auto kernel = mass_backward<T, HD, NG>;
    const int smem = Smem<T, HD>::bytes(true);
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kernel<<<dim3((Tk + Bc - 1) / Bc, Hkv, B), NT, smem, stream>>>(
        (const T*)q.data_ptr(), (const T*)k.data_ptr(), q_pos.data_ptr<int>(), key_groups.data_ptr<uint8_t>(),
        row_c.data_ptr<float>(), lse.data_ptr<float>(), dmass.data_ptr<float>(), dq_acc.data_ptr<float>(),
        (T*)dk.data_ptr(), Hq, Hkv, Nq, Tk, G, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq_acc.to(q.scalar_type()), dk};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "attention mass forward: (mass (B,Hq,Nq,G) fp32, lse (B,Hq,Nq) fp32)");
  m.def("backward", &backward, "attention mass backward: (dq, dk)");
}
#endif
