// The tensor-core plumbing of kernels.cu: one warp's 16 x 8 x 16 matrix multiply-accumulate (mma.sync)
// and its operands' fragments, loaded from shared memory with ldmatrix; an fp32 path computes the
// same fragments with FMAs. kernels.cu reads without it: mma_tile(acc, A, lda, B, ldb) is
// acc += A B on one warp's 16-row tile.
#pragma once
#include <cuda_bf16.h>
#include <cstdint>
#include <type_traits>

template <typename T> constexpr bool is_f32() { return std::is_same<T, float>::value; }

// warp-level tensor-core instructions (the CPU emulator supplies its own versions of these three)
//
// mma.sync m16n8k16: one warp computes D (16x8, fp32) += A (16x16) B (16x8). Lane l = 4g + t holds
//
//        A (16 x 16)                   B (16 x 8)            D (16 x 8)
//      cols 2t,2t+1  2t+8,+9          col g                  cols 2t, 2t+1
//   row g    [a0]      [a2]       rows 2t,2t+1    [b0]     row g    [d0 d1]
//   row g+8  [a1]      [a3]       rows 2t+8,+9    [b1]     row g+8  [d2 d3]
//
// (each a_i, b_i one 32-bit register = two 16-bit values). ldmatrix.x4 fills such registers from
// shared memory: four 8x8 matrices, lane l pointing at row l % 8 of matrix l / 8; with .trans each
// matrix arrives transposed, which is how a k-major (transposed) operand is loaded.
#ifndef EMULATE_ON_CPU
// Four 8x8 16-bit matrices: lane l gives the address of row l % 8 of matrix l / 8 and receives,
// from matrix r into reg[r], row l / 4, columns 2 (l % 4) and +1 (trans: rows 2 (l % 4), +1 of
// column l / 4).
template <bool trans> __device__ __forceinline__ void ldmatrix_x4(uint32_t (&reg)[4], const void* smem_row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  if constexpr (trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(reg[0]), "=r"(reg[1]), "=r"(reg[2]), "=r"(reg[3]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(reg[0]), "=r"(reg[1]), "=r"(reg[2]), "=r"(reg[3]) : "r"(a));
}

// d (16x8, fp32) += a (16x16) b (16x8), 16-bit inputs. Lane l, g = l / 4, t = l % 4 holds
// a: {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}, b: {(2t..2t+1, g), (2t+8.., g)},
// d: {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// The A fragment of rows 0-15, columns k..k+15 of A: matrices (m 0-7, k 0-7), (m 8-15, k 0-7),
// (m 0-7, k 8-15), (m 8-15, k 8-15) -> a[0..3]. kmajor: A is stored transposed (A(m, k) = A[k * lda + m]).
template <bool kmajor, typename T>
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const T* A, int lda, int k) {
  const int mat = threadIdx.x % 32 / 8, row = threadIdx.x % 8;  // this lane: row `row` of matrix `mat`
  if constexpr (kmajor) ldmatrix_x4<true>(a, A + (k + 8 * (mat / 2) + row) * lda + 8 * (mat % 2));
  else ldmatrix_x4<false>(a, A + (8 * (mat % 2) + row) * lda + k + 8 * (mat / 2));
}

// Two B fragments, rows k..k+15 and columns 8n..8n+15 of B: matrices (k 0-7, n 0-7), (k 8-15, n 0-7)
// -> b[0], b[1] (columns 8n..8n+7), then (k 0-7, n 8-15), (k 8-15, n 8-15) -> b[2], b[3].
// kmajor: B(k, n) = B[k * ldb + n]; else B is stored n-major (B(k, n) = B[n * ldb + k]).
template <bool kmajor, typename T>
__device__ __forceinline__ void load_b_fragments(uint32_t (&b)[4], const T* B, int ldb, int k, int n) {
  const int mat = threadIdx.x % 32 / 8, row = threadIdx.x % 8;
  if constexpr (kmajor) ldmatrix_x4<true>(b, B + (k + 8 * (mat % 2) + row) * ldb + 8 * n + 8 * (mat / 2));
  else ldmatrix_x4<false>(b, B + (8 * n + 8 * (mat / 2) + row) * ldb + k + 8 * (mat % 2));
}

// acc (16 x 8N, this warp's output tile, in mma fragments) += A (16 x K) B (K x 8N), A and B in
// shared memory with row strides lda, ldb. *_kmajor says how each is stored:
//   A(m, k) = a_kmajor ? A[k * lda + m] : A[m * lda + k]
//   B(k, n) = b_kmajor ? B[k * ldb + n] : B[n * ldb + k]
// 16-bit: ldmatrix (transposing where the storage is the other way round) and mma. fp32: each lane
// computes its own fragment elements with FMAs, which is also the definition of the 16-bit path.
template <typename T, int N, int K, bool a_kmajor, bool b_kmajor>
__device__ __forceinline__ void mma_tile(float (&acc)[N][4], const T* A, int lda, const T* B, int ldb) {
  static_assert(N % 2 == 0 && K % 16 == 0, "tiles of 16 x 16 x 16");
  const int lane = threadIdx.x % 32;
  if constexpr (is_f32<T>()) {
    const int g = lane / 4, t = lane % 4;
    for (int n = 0; n < N; n++)
      for (int e = 0; e < 4; e++) {
        const int m = g + 8 * (e / 2), c = 8 * n + 2 * t + e % 2;
        float sum = acc[n][e];
        for (int k = 0; k < K; k++)
          sum += (a_kmajor ? A[k * lda + m] : A[m * lda + k]) * (b_kmajor ? B[k * ldb + c] : B[c * ldb + k]);
        acc[n][e] = sum;
      }
  } else {
#pragma unroll
    for (int k = 0; k < K; k += 16) {
      uint32_t a[4];
      load_a_fragment<a_kmajor>(a, A, lda, k);
#pragma unroll
      for (int n = 0; n < N; n += 2) {
        uint32_t b[4];
        load_b_fragments<b_kmajor>(b, B, ldb, k, n);
        mma16816<T>(acc[n], a, b[0], b[1]);
        mma16816<T>(acc[n + 1], a, b[2], b[3]);
      }
    }
  }
}
