// kernels.cu on the CPU: each CUDA thread of a block is a std::thread, blocks run one after another,
// and the warp-level instructions the kernels use (ldmatrix, mma.sync, shuffles) are computed from
// their PTX definitions. So CI, which has no GPU, checks the kernels' tiling, masking, fragment
// layouts and synchronisation against the PyTorch reference (tests/test_kernels.py builds this with
// g++ and calls it through ctypes). Timing and memory behaviour still need a GPU.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#include <cuda_bf16.h>  // host-side 16-bit types and conversions
#include <cuda_fp16.h>
#include <vector_functions.h>

#define EMULATE_ON_CPU
#undef __global__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __shared__
#define __launch_bounds__(n)
#define __align__(n)  // the one shared memory below is aligned
using std::max;
using std::min;

struct Index { unsigned x, y, z; };
thread_local Index threadIdx, blockIdx;
Index gridDim;
alignas(128) char smem[256 * 1024];  // one block at a time, so one shared memory
int smem_bytes;                       // what the running kernel asked for

[[noreturn]] void fail(const char* what) {  // a rule the GPU would break on: stop loudly
  std::fprintf(stderr, "emulate_kernels: %s\n", what);
  std::abort();
}

namespace emu {
constexpr int WARPS = 4;
std::barrier<>* block_barrier;
std::barrier<>* warp_barrier[WARPS];
const void* lane_ptr[WARPS][32];  // what each lane hands a warp-wide instruction
uint32_t lane_reg[WARPS][32][6];
float lane_float[WARPS][32];
int warp() { return threadIdx.x / 32; }
int lane() { return threadIdx.x % 32; }
void warp_sync() { warp_barrier[warp()]->arrive_and_wait(); }

float to_float(uint16_t bits, bool bf16) {
  if (bf16) { uint32_t x = uint32_t(bits) << 16; float f; std::memcpy(&f, &x, 4); return f; }
  __half h; std::memcpy(&h, &bits, 2); return __half2float(h);
}
uint16_t half_of(uint32_t reg, int which) { return which ? reg >> 16 : reg & 0xffff; }
}  // namespace emu

void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
int __syncthreads_or(int predicate) {  // a barrier that also tells every thread whether any predicate held
  static std::atomic<int> any;
  if (threadIdx.x == 0) any = 0;
  __syncthreads();
  if (predicate) any = 1;
  __syncthreads();
  const int result = any;
  __syncthreads();  // nobody resets `any` before everyone has read it
  return result;
}
void __syncwarp() { emu::warp_sync(); }

float __shfl_xor_sync(unsigned, float x, int lane_mask) {
  const int w = emu::warp(), l = emu::lane();
  emu::lane_float[w][l] = x;
  emu::warp_sync();
  const float y = emu::lane_float[w][l ^ lane_mask];
  emu::warp_sync();
  return y;
}

float atomicAdd(float* p, float x) { return std::atomic_ref<float>(*p).fetch_add(x); }

// ldmatrix.x4: lane l addresses row l % 8 of matrix l / 8; reg[r] gets, from matrix r, row l / 4,
// columns 2 (l % 4) and 2 (l % 4) + 1, or with trans rows 2 (l % 4) and + 1 of column l / 4.
template <bool trans> void ldmatrix_x4(uint32_t (&reg)[4], const void* smem_row) {
  const int w = emu::warp(), l = emu::lane(), g = l / 4, t = l % 4;
  const char* p = static_cast<const char*>(smem_row);  // the hardware's rules: shared memory, 16-byte rows
  if (p < smem || p + 16 > smem + smem_bytes || (p - smem) % 16)
    fail("ldmatrix: a row address outside the block's shared memory or not 16-byte aligned");
  emu::lane_ptr[w][l] = smem_row;
  emu::warp_sync();
  for (int r = 0; r < 4; r++) {
    auto element = [&](int row, int col) { return static_cast<const uint16_t*>(emu::lane_ptr[w][8 * r + row])[col]; };
    const uint16_t lo = trans ? element(2 * t, g) : element(g, 2 * t);
    const uint16_t hi = trans ? element(2 * t + 1, g) : element(g, 2 * t + 1);
    reg[r] = lo | uint32_t(hi) << 16;
  }
  emu::warp_sync();
}

// mma.m16n8k16 (row.col, fp32 accumulate): gather A and B from the fragments every lane holds
// (layouts as in kernels.cu's mma16816), then each lane computes its four elements of D.
template <typename T> void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  constexpr bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  const int w = emu::warp(), l = emu::lane(), g = l / 4, t = l % 4;
  for (int i = 0; i < 4; i++) emu::lane_reg[w][l][i] = a[i];
  emu::lane_reg[w][l][4] = b0, emu::lane_reg[w][l][5] = b1;
  emu::warp_sync();
  auto A = [&](int m, int k) {  // held by lane 4 (m % 8) + (k % 8) / 2, register (m / 8) + 2 (k / 8)
    return emu::to_float(emu::half_of(emu::lane_reg[w][4 * (m % 8) + (k % 8) / 2][m / 8 + 2 * (k / 8)], k % 2), bf16);
  };
  auto B = [&](int k, int n) {  // held by lane 4 n + (k % 8) / 2, register 4 + k / 8
    return emu::to_float(emu::half_of(emu::lane_reg[w][4 * n + (k % 8) / 2][4 + k / 8], k % 2), bf16);
  };
  for (int e = 0; e < 4; e++) {
    const int m = g + 8 * (e / 2), n = 2 * t + e % 2;
    float sum = d[e];
    for (int k = 0; k < 16; k++) sum += A(m, k) * B(k, n);
    d[e] = sum;
  }
  emu::warp_sync();
}

#include "../kernels.cu"
static_assert(NT == 32 * emu::WARPS, "the emulator's warp barriers assume kernels.cu's block size");

template <typename Kernel, typename... Args> void launch(Index grid, int bytes, Kernel kernel, Args... args) {
  if (bytes > (int)sizeof(smem)) fail("more shared memory than the emulator has");
  gridDim = grid, smem_bytes = bytes;
  for (unsigned z = 0; z < grid.z; z++)
    for (unsigned y = 0; y < grid.y; y++)
      for (unsigned x = 0; x < grid.x; x++) {
        std::memset(smem, 0xff, sizeof(smem));  // garbage: a read before a write shows
        std::barrier<> block(NT), w0(32), w1(32), w2(32), w3(32);
        emu::block_barrier = &block;
        emu::warp_barrier[0] = &w0, emu::warp_barrier[1] = &w1, emu::warp_barrier[2] = &w2, emu::warp_barrier[3] = &w3;
        std::vector<std::thread> threads;
        for (unsigned i = 0; i < NT; i++)
          threads.emplace_back([&, i] { threadIdx = {i, 0, 0}; blockIdx = {x, y, z}; kernel(args...); });
        for (auto& th : threads) th.join();
      }
}

// The host functions of kernels.cu without torch: same grids, same shared memory, plain pointers
// (dq_acc must be zeroed by the caller; mass, lse, dk are written in full).
extern "C" int emulate_forward(int dtype, const void* q, const void* k, const int* q_pos, const uint8_t* key_groups,
                               float* mass, float* lse, int B, int Hq, int Hkv, int Nq, int Tk, int D, int G, float scale) {
  return dispatch(dtype, D, G, [&]<typename T, int HD, int NG>() {
    launch({unsigned((Nq + Br - 1) / Br), unsigned(Hq), unsigned(B)}, Smem<T, HD>::bytes(false), mass_forward<T, HD, NG>,
           (const T*)q, (const T*)k, q_pos, key_groups, mass, lse, Hq, Hkv, Nq, Tk, G, scale);
  });
}

extern "C" int emulate_backward(int dtype, const void* q, const void* k, const int* q_pos, const uint8_t* key_groups,
                                const float* mass, const float* lse, const float* dmass, float* dq_acc, void* dk,
                                int B, int Hq, int Hkv, int Nq, int Tk, int D, int G, float scale) {
  std::vector<float> row_c((size_t)B * Hq * Nq);  // (dmass * mass).sum(-1), as the host code does
  for (size_t i = 0; i < row_c.size(); i++)
    for (int g = 0; g < G; g++) row_c[i] += dmass[i * G + g] * mass[i * G + g];
  return dispatch(dtype, D, G, [&]<typename T, int HD, int NG>() {
    launch({unsigned((Tk + Bc - 1) / Bc), unsigned(Hkv), unsigned(B)}, Smem<T, HD>::bytes(true), mass_backward<T, HD, NG>,
           (const T*)q, (const T*)k, q_pos, key_groups, row_c.data(), lse, dmass, dq_acc, (T*)dk, Hq, Hkv, Nq, Tk, G, scale);
  });
}

#ifdef SANITIZER_MAIN
// Built with -fsanitize=thread (a missing __syncthreads or __syncwarp is a data race between the
// threads) or -fsanitize=address,undefined (reads and writes past exact-size buffers), and run on
// odd shapes: the positions include -5 (sees nothing) and past Tk (sees everything).
#include <random>
template <typename T> void run(int dtype, int B, int Hq, int Hkv, int Nq, int Tk, int D, int G) {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<T> q((size_t)B * Hq * Nq * D), k((size_t)B * Hkv * Tk * D), dk(k.size());
  for (auto& x : q) x = T(normal(rng));
  for (auto& x : k) x = T(normal(rng));
  std::vector<int> q_pos(B * Nq);
  for (auto& p : q_pos) p = int(rng() % (Tk + 10)) - 5;
  std::vector<uint8_t> groups(B * Tk);
  for (auto& bits : groups) bits = rng() % (1 << G);
  std::vector<float> mass(q_pos.size() * Hq * G), lse(q_pos.size() * Hq), dmass(mass.size()), dq(q.size());
  for (auto& x : dmass) x = normal(rng);
  emulate_forward(dtype, q.data(), k.data(), q_pos.data(), groups.data(), mass.data(), lse.data(), B, Hq, Hkv, Nq, Tk, D, G, 0.125f);
  emulate_backward(dtype, q.data(), k.data(), q_pos.data(), groups.data(), mass.data(), lse.data(), dmass.data(), dq.data(),
                   dk.data(), B, Hq, Hkv, Nq, Tk, D, G, 0.125f);
}

int main() {
  run<float>(0, 2, 4, 2, 70, 80, 64, 2);
  run<__nv_bfloat16>(1, 2, 4, 2, 70, 80, 64, 2);
  run<__half>(2, 1, 3, 1, 65, 63, 128, 7);
  std::puts("ran");
}
#endif
