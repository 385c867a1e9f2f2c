// One decode step (B tokens, each in its own KV-cache row) through every transformer block, on the CPU.
//
// The same arithmetic as model/model.py's blocks with quant/linear.py's layers, written as
// plain loops around the matmul kernels: for a 135M model, a Python decode step spends more
// time dispatching ~45 small ops per block than in the matmuls themselves. Here each block is
// four kernel calls and loops over buffers sized once for the batch (the torch kernels and the
// GGUF kernels' per-call sums of x allocate their own).
//
// Residual stream, norms, RoPE, the KV cache and attention are fp32, as in the eager model.
#include <torch/extension.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// ---------------------------------------------------------------- vector width
// The kernels written once for both vector units: Vec is Avx512 (16 floats, 32 registers) or
// Avx2 (8 floats, 16 registers), and LLAMADESK_VEC is defined, when the build has either.
#if defined(__AVX2__)
// the sum of 8 floats (Avx2::sum; AVX-512 builds' 256-bit kernels, q6_k_x15.h, use it too)
inline float sum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif
#if defined(__AVX512F__)
struct Avx512 {
  using V = __m512;
  static constexpr int W = 16, kRegs = 32;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }  // a b + c
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const at::BFloat16* p) {  // bf16 is the top half of an fp32
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load(const int8_t* p) {  // codes; the vector's scale is applied by the caller
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
  // the first n lanes (0 < n <= W); the others load as 0 and are not stored
  static __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
  static V load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static void store_first(float* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }

  // lane j = the sum of v[j]'s 16 lanes
  static V sum_transposed(const V* v) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: a0+a2, b0+b2, a1+a3, b1+b3
      t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i)  // per 128-bit lane: the lane's sums of keys 4i .. 4i+3
      u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
  }
};
using Vec = Avx512;
#elif defined(__AVX2__) && defined(__FMA__)
struct Avx2 {
  using V = __m256;
  static constexpr int W = 8, kRegs = 16;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const at::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static float sum(V v) { return sum8(v); }
  static __m256i first(int64_t n) {  // lanes below n all ones
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, first(n)); }
  static void store_first(float* p, V v, int64_t n) { _mm256_maskstore_ps(p, first(n), v); }

  // lane j = the sum of v[j]'s 8 lanes: the same steps as Avx512's, one 128-bit swap fewer
  static V sum_transposed(const V* v) {
    __m256 t[4], u[2];
    for (int i = 0; i < 4; ++i)
      t[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; ++i)
      u[i] = _mm256_add_ps(_mm256_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm256_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    // u[i]: each 128-bit half holds its half's sums of keys 4i .. 4i+3
    return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
  }
};
using Vec = Avx2;
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define LLAMADESK_VEC 1
#endif

#include "row_chunks.h"  // in_row_chunks: activation rows 4 (or 8), 2, 1 at a time
#include "gguf_gemv.h"  // GGUF block GEMV (Q4_0 ... Q6_K) on these vector types

// ---------------------------------------------------------------- int4 GEMV
// y = W x for one token, read straight from the tensors torch's CPU int4 kernel takes: no copy
// of the weight. torch's own kernel (_weight_int4pack_mm_for_cpu) rounds x to bf16 and
// dequantizes every weight before its FMA; this one multiplies the raw 4-bit codes by fp32 x
// and applies scale and zero once per group and row:
//   y[n] = sum_g  s[g,n] * sum_{k in g} x[k] (q[n,k] - 8)  +  z[g,n] * sum_{k in g} x[k]
// which is w = (q - 8) * s + z, torch's dequantization, in fp32 from the unrounded x.
// SmolLM2-135M int4 on 2 Zen 4 cores, the 120 int4 calls of a decode step (66 MB from DRAM):
// 2.9 ms with torch's kernel (23 GB/s), 2.0 ms with this one (33 GB/s; DRAM streams ~42).
//
// torch's packed layout (aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel):
// uint8 (N, K/2) holding blocks of BN rows one after another (BN = 64 on AVX-512, 32 on AVX2 and
// without vector units; N is a multiple of 16); inside a block, K rows of BN/2 bytes, one per k.
// A full block on AVX-512 and AVX2 splits its rows in halves: byte b of k holds row b in the low
// nibble and row b + BN/2 in the high one. A short last block (N % BN rows) and every block of
// the plain build pair neighbours: byte b holds rows 2b (low) and 2b + 1 (high). Which one torch
// used depends on the CPU capability it dispatched to (ATEN_CPU_CAPABILITY can change it), so
// int4_layout() packs a probe once and compares; a layout it does not know keeps torch's kernel.
// scales_and_zeros: bf16 (K/group, N, 2), the (scale, zero) pair of row n in one 32-bit word.
struct Int4Layout {
  int64_t block = 0;  // BN; 0: not recognised
  bool split = false;
};

// (byte, shift) of row j of a block of nb rows
inline void int4_row_at(const Int4Layout& l, int64_t nb, int64_t j, int64_t& byte, int& shift) {
  if (nb == l.block && l.split) {
    byte = j % (nb / 2);
    shift = j < nb / 2 ? 0 : 4;
  } else {
    byte = j / 2;
    shift = (j & 1) * 4;
  }
}

Int4Layout detect_int4_layout() {
  const int64_t N = 80, K = 4;  // a block of 64 and a short one of 16 (or 2 x 32 + 16)
  auto q = at::empty({N, K}, at::kInt);
  int32_t* qp = q.data_ptr<int32_t>();
  for (int64_t i = 0; i < N * K; ++i) qp[i] = static_cast<int32_t>((i * 7 + i / 5) % 16);
  at::Tensor packed;
  try {
    packed = at::_convert_weight_to_int4pack_for_cpu(q, 2).contiguous();
  } catch (const std::exception&) {
    return {};
  }
  if (packed.scalar_type() != at::kByte || packed.numel() != N * K / 2) return {};
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  for (const Int4Layout l : {Int4Layout{64, true}, Int4Layout{32, true}, Int4Layout{32, false}, Int4Layout{64, false}}) {
    bool same = true;
    for (int64_t r0 = 0; r0 < N && same; r0 += l.block) {
      const int64_t nb = std::min(l.block, N - r0);
      for (int64_t j = 0; j < nb && same; ++j) {
        int64_t byte;
        int shift;
        int4_row_at(l, nb, j, byte, shift);
        for (int64_t k = 0; k < K && same; ++k) {
          same = ((pp[r0 * K / 2 + k * nb / 2 + byte] >> shift) & 15) == qp[(r0 + j) * K + k];
        }
      }
    }
    if (same) return l;
  }
  return {};
}

const Int4Layout& int4_layout() {
  static const Int4Layout layout = detect_int4_layout();
  return layout;
}

// Which kernel the decode step runs for int4 layers: ours, or torch's (for comparisons).
std::atomic<bool> g_int4_torch{false};
// Past this many keys attention goes to the threads, where waking them pays: each KV head's keys
// split over them (the vector path) or the KV heads shared out (the plain loops).
// set_parallel_keys: tests run the split on tiny contexts, benchmarks compare.
std::atomic<int64_t> g_parallel_keys{256};
// The vector path's key ranges a KV head splits into past g_parallel_keys, whatever the thread
// count: the merged softmax then depends on the context's length alone, so a reply's numbers do
// not change when the thread governor (app/threads.py) moves between counts mid-reply. 8 ranges
// keep a desktop's threads busy; the merge costs 8 * rep * head_dim adds a head.
constexpr int64_t KEY_PARTS = 8;

#if defined(__GNUC__) || defined(__clang__)
#define INT4_PREFETCH(p) __builtin_prefetch(p)
#else
#define INT4_PREFETCH(p) ((void)0)
#endif

// Rows [r0, r0 + 2 * HALF) of a block in any layout, portable C++: the kernel of builds without
// AVX-512 and the AVX-512 one's short last block. B: the block's first byte; sz: (scale, zero)
// words of group 0, row 0; out: 2 * HALF values. HALF, bytes a k, is a constant so that the
// compiler keeps the sums in registers.
template <int HALF>
void int4_block_portable(bool split, const float* x, const float* xsum, const uint8_t* B, const uint32_t* sz,
                         int64_t K, int64_t gs, int64_t N_pad, int64_t r0, float* out) {
  constexpr int nb = 2 * HALF;
  float tot[nb] = {0.f};
  for (int64_t g = 0; g < K / gs; ++g) {
    float lo[HALF] = {0.f}, hi[HALF] = {0.f};  // sum x q over the group, q the low or high nibble of byte b
    if (g + 2 < K / gs) {  // the scales of a later group: rows N_pad * 4 bytes apart
      for (int i = 0; i < nb; i += 16) INT4_PREFETCH(sz + (g + 2) * N_pad + r0 + i);
    }
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
      const uint8_t* p = B + k * HALF;
      INT4_PREFETCH(p + 4096);
      const float xk = x[k];
#pragma omp simd
      for (int b = 0; b < HALF; ++b) {
        lo[b] += xk * static_cast<float>(p[b] & 15);
        hi[b] += xk * static_cast<float>(p[b] >> 4);
      }
    }
    // row j's (q - 8) x sum, in the row order of the layout
    float d[nb];
    const float off = 8.f * xsum[g];
    if (split) {
      for (int b = 0; b < HALF; ++b) {
        d[b] = lo[b] - off;
        d[HALF + b] = hi[b] - off;
      }
    } else {
      for (int b = 0; b < HALF; ++b) {
        d[2 * b] = lo[b] - off;
        d[2 * b + 1] = hi[b] - off;
      }
    }
    const uint32_t* s = sz + g * N_pad + r0;
#pragma omp simd
    for (int j = 0; j < nb; ++j) {
      const uint32_t sbits = s[j] << 16, zbits = s[j] & 0xFFFF0000u;
      float sc, zr;
      std::memcpy(&sc, &sbits, sizeof(sc));
      std::memcpy(&zr, &zbits, sizeof(zr));
      tot[j] += sc * d[j] + zr * xsum[g];
    }
  }
  std::copy(tot, tot + nb, out);
}

// a block of nb rows (16, 32, 48 or 64: N is padded to 16)
void int4_block_portable(const Int4Layout& l, const float* x, const float* xsum, const uint8_t* B,
                         const uint32_t* sz, int64_t K, int64_t gs, int64_t N_pad, int64_t r0, int64_t nb,
                         float* out) {
  const bool split = nb == l.block && l.split;
  switch (nb) {
    case 16: return int4_block_portable<8>(split, x, xsum, B, sz, K, gs, N_pad, r0, out);
    case 32: return int4_block_portable<16>(split, x, xsum, B, sz, K, gs, N_pad, r0, out);
    case 48: return int4_block_portable<24>(split, x, xsum, B, sz, K, gs, N_pad, r0, out);
    default: return int4_block_portable<32>(split, x, xsum, B, sz, K, gs, N_pad, r0, out);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// A full 32-row block in torch's AVX2 layout (byte b of k: row b | row b + 16 << 4), for machines
// without AVX-512 (the compiler vectorizes the portable loop with 4-float halves: 12% slower than
// torch's AVX2 kernel there). out: 32 values.
inline void int4_block_avx2(const float* x, const float* xsum, const uint8_t* B, const uint32_t* sz, int64_t K,
                            int64_t gs, int64_t N_pad, float* out) {
  const __m256i nibble = _mm256_set1_epi32(15);
  const __m256i zero_bits = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m256 eight = _mm256_set1_ps(8.f);
  __m256 tot[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < K / gs; ++g) {
    __m256 a[4], b[4];  // rows 0-7, 8-15 (low nibbles), 16-23, 24-31 (high); a even k, b odd k
    for (int i = 0; i < 4; ++i) a[i] = b[i] = _mm256_setzero_ps();
    if (g + 2 < K / gs) {
      for (int i = 0; i < 32; i += 16) INT4_PREFETCH(sz + (g + 2) * N_pad + i);
    }
    const uint8_t* p = B + g * gs * 16;
    const float* xg = x + g * gs;
    for (int64_t k = 0; k < gs; k += 2) {
      INT4_PREFETCH(p + k * 16 + 4096);
      for (int odd = 0; odd < 2; ++odd) {
        __m256* acc = odd ? b : a;
        const __m256 xk = _mm256_broadcast_ss(xg + k + odd);
        const uint8_t* q = p + (k + odd) * 16;
        const __m256i d0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
        const __m256i d1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8)));
        acc[0] = _mm256_fmadd_ps(xk, _mm256_cvtepi32_ps(_mm256_and_si256(d0, nibble)), acc[0]);
        acc[1] = _mm256_fmadd_ps(xk, _mm256_cvtepi32_ps(_mm256_and_si256(d1, nibble)), acc[1]);
        acc[2] = _mm256_fmadd_ps(xk, _mm256_cvtepi32_ps(_mm256_srli_epi32(d0, 4)), acc[2]);
        acc[3] = _mm256_fmadd_ps(xk, _mm256_cvtepi32_ps(_mm256_srli_epi32(d1, 4)), acc[3]);
      }
    }
    const __m256 xs = _mm256_set1_ps(xsum[g]);
    const uint32_t* s = sz + g * N_pad;
    for (int i = 0; i < 4; ++i) {  // codes are 0..15 here: w = q * s + (z - 8 s)
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 8 * i));
      const __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 zr = _mm256_fnmadd_ps(eight, sc, _mm256_castsi256_ps(_mm256_and_si256(v, zero_bits)));
      tot[i] = _mm256_fmadd_ps(sc, _mm256_add_ps(a[i], b[i]), tot[i]);
      tot[i] = _mm256_fmadd_ps(zr, xs, tot[i]);
    }
  }
  for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + 8 * i, tot[i]);
}

// R rows (R <= 4) of x against 8 of a 32-row block's rows (quarter c: rows 8c .. 8c + 7, the low
// nibbles of bytes 0-7 or 8-15, then their high nibbles), each code converted once for all R rows.
// A row's lanes take exactly int4_block_avx2's operations in its order, so its values are the
// single-row kernel's. x, xsum: R rows of K and K/gs; out: R x 8 values.
template <int R>
inline void int4_quarter_avx2_rows(const float* x, const float* xsum, const uint8_t* B, const uint32_t* sz, int64_t K,
                                   int64_t gs, int64_t N_pad, int c, float* out) {
  const __m256i nibble = _mm256_set1_epi32(15);
  const __m256i zero_bits = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m256 eight = _mm256_set1_ps(8.f);
  const int byte0 = (c & 1) * 8, shift = (c >> 1) * 4;
  const int64_t G = K / gs;
  __m256 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
    const uint8_t* p = B + g * gs * 16 + byte0;
    const int64_t k0 = g * gs;
    for (int64_t k = 0; k < gs; k += 2) {
      INT4_PREFETCH(p + k * 16 + 4096);
      const __m256i d0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + k * 16)));
      const __m256i d1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + (k + 1) * 16)));
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d0, shift), nibble));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d1, shift), nibble));
      for (int r = 0; r < R; ++r) {
        a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * K + k0 + k), w0, a[r]);
        b[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * K + k0 + k + 1), w1, b[r]);
      }
    }
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + g * N_pad + 8 * (c & 1) + 16 * (c >> 1)));
    const __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const __m256 zr = _mm256_fnmadd_ps(eight, sc, _mm256_castsi256_ps(_mm256_and_si256(v, zero_bits)));
    for (int r = 0; r < R; ++r) {
      tot[r] = _mm256_fmadd_ps(sc, _mm256_add_ps(a[r], b[r]), tot[r]);
      tot[r] = _mm256_fmadd_ps(zr, _mm256_set1_ps(xsum[r * G + g]), tot[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + 8 * r, tot[r]);
}

#endif

#ifdef __AVX512F__
// A decode step streams the weights from DRAM; software prefetch (as torch's kernel does) keeps
// more reads in flight than the hardware's (2.3 -> 2.0 ms of int4 a SmolLM2 step).
constexpr int64_t kInt4PrefetchGroups = 2;    // scales, this many groups ahead
constexpr int64_t kInt4PrefetchBytes = 4096;  // codes, this far ahead in the block's stream

// the (scale, zero) words of one group of a 64-row block: 4 cache lines
inline void int4_prefetch_scales(const uint32_t* s) {
  for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(s + 16 * i), _MM_HINT_T0);
}

// H halves (16 bytes of each k: 16 rows in the low nibbles, the 16 rows BN/2 further in the high
// ones) of a full 64-row block in the split layout, starting at half h0; out: the H low-nibble
// vectors, then the H high-nibble ones. Per k and 16 rows: a byte-to-dword load, one table
// permute (vpermps reads only the low 4 bits of its index: q - 8 as fp32) and one FMA. Two
// accumulators per vector (even and odd k) keep eight FMA chains going.
template <int H>
inline void int4_block_avx512(const float* x, const float* xsum, const uint8_t* B, const uint32_t* sz, int64_t K,
                              int64_t gs, int64_t N_pad, int h0, __m512* out) {
  const __m512 lut = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i zero_bits = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  constexpr int V = 2 * H;
  __m512 tot[V];
  for (int i = 0; i < V; ++i) tot[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / gs; ++g) {
    __m512 a[V], b[V];
    for (int i = 0; i < V; ++i) a[i] = b[i] = _mm512_setzero_ps();
    const uint8_t* p = B + g * gs * 32 + h0 * 16;
    const float* xg = x + g * gs;
    // Scale rows sit N_pad * 4 bytes apart, a stride the hardware does not follow from DRAM:
    // fetch those of a later group now, past the last one those of the next block.
    if (g + kInt4PrefetchGroups < K / gs) {
      const uint32_t* next = sz + (g + kInt4PrefetchGroups) * N_pad + h0 * 16;
      for (int i = 0; i < V; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + (i % H) * 16 + (i / H) * 32), _MM_HINT_T0);
    } else {
      int4_prefetch_scales(sz + (g + kInt4PrefetchGroups - K / gs) * N_pad + 64);
    }
    for (int64_t k = 0; k < gs; k += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(p + k * 32 + kInt4PrefetchBytes), _MM_HINT_T0);
      const __m512 x0 = _mm512_set1_ps(xg[k]);
      const __m512 x1 = _mm512_set1_ps(xg[k + 1]);
      for (int h = 0; h < H; ++h) {
        const __m512i d0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k * 32 + h * 16)));
        const __m512i d1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k * 32 + 32 + h * 16)));
        a[h] = _mm512_fmadd_ps(x0, _mm512_permutexvar_ps(d0, lut), a[h]);
        a[H + h] = _mm512_fmadd_ps(x0, _mm512_permutexvar_ps(_mm512_srli_epi32(d0, 4), lut), a[H + h]);
        b[h] = _mm512_fmadd_ps(x1, _mm512_permutexvar_ps(d1, lut), b[h]);
        b[H + h] = _mm512_fmadd_ps(x1, _mm512_permutexvar_ps(_mm512_srli_epi32(d1, 4), lut), b[H + h]);
      }
    }
    const __m512 xs = _mm512_set1_ps(xsum[g]);
    const uint32_t* s = sz + g * N_pad + h0 * 16;
    for (int i = 0; i < V; ++i) {  // vector i: rows (i % H) * 16 of the halves, + 32 for the high nibbles
      const __m512i v = _mm512_loadu_si512(s + (i % H) * 16 + (i / H) * 32);
      const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 zr = _mm512_castsi512_ps(_mm512_and_si512(v, zero_bits));
      tot[i] = _mm512_fmadd_ps(sc, _mm512_add_ps(a[i], b[i]), tot[i]);
      tot[i] = _mm512_fmadd_ps(zr, xs, tot[i]);
    }
  }
  for (int i = 0; i < V; ++i) out[i] = tot[i];
}

// R rows (R <= 4) of x against one half (h0) of a 64-row block: int4_block_avx512<1>'s
// operations for each row, in its order (a row's values are the single-row kernel's), with each
// code's table lookup done once for all R rows. x, xsum: R rows of K and K/gs; out: per row the
// low-nibble vector, then the high one.
template <int R>
inline void int4_half_avx512_rows(const float* x, const float* xsum, const uint8_t* B, const uint32_t* sz, int64_t K,
                                  int64_t gs, int64_t N_pad, int h0, __m512* out) {
  const __m512 lut = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i zero_bits = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t G = K / gs;
  __m512 tot[2 * R];
  for (int i = 0; i < 2 * R; ++i) tot[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 a[2 * R], b[2 * R];  // row r: [2r] low nibbles, [2r + 1] high
    for (int i = 0; i < 2 * R; ++i) a[i] = b[i] = _mm512_setzero_ps();
    const uint8_t* p = B + g * gs * 32 + h0 * 16;
    const int64_t k0 = g * gs;
    if (g + kInt4PrefetchGroups < G) {
      const uint32_t* next = sz + (g + kInt4PrefetchGroups) * N_pad + h0 * 16;
      _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(next + 32), _MM_HINT_T0);
    }
    for (int64_t k = 0; k < gs; k += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(p + k * 32 + kInt4PrefetchBytes), _MM_HINT_T0);
      const __m512i d0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k * 32)));
      const __m512i d1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k * 32 + 32)));
      const __m512 w0 = _mm512_permutexvar_ps(d0, lut), w0h = _mm512_permutexvar_ps(_mm512_srli_epi32(d0, 4), lut);
      const __m512 w1 = _mm512_permutexvar_ps(d1, lut), w1h = _mm512_permutexvar_ps(_mm512_srli_epi32(d1, 4), lut);
      for (int r = 0; r < R; ++r) {
        const __m512 x0 = _mm512_set1_ps(x[r * K + k0 + k]), x1 = _mm512_set1_ps(x[r * K + k0 + k + 1]);
        a[2 * r] = _mm512_fmadd_ps(x0, w0, a[2 * r]);
        a[2 * r + 1] = _mm512_fmadd_ps(x0, w0h, a[2 * r + 1]);
        b[2 * r] = _mm512_fmadd_ps(x1, w1, b[2 * r]);
        b[2 * r + 1] = _mm512_fmadd_ps(x1, w1h, b[2 * r + 1]);
      }
    }
    const uint32_t* s = sz + g * N_pad + h0 * 16;
    for (int i = 0; i < 2; ++i) {  // i = 0: rows h0 * 16 .. +15; i = 1: the same + 32
      const __m512i v = _mm512_loadu_si512(s + i * 32);
      const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 zr = _mm512_castsi512_ps(_mm512_and_si512(v, zero_bits));
      for (int r = 0; r < R; ++r) {
        tot[2 * r + i] = _mm512_fmadd_ps(sc, _mm512_add_ps(a[2 * r + i], b[2 * r + i]), tot[2 * r + i]);
        tot[2 * r + i] = _mm512_fmadd_ps(zr, _mm512_set1_ps(xsum[r * G + g]), tot[2 * r + i]);
      }
    }
  }
  for (int i = 0; i < 2 * R; ++i) out[i] = tot[i];
}
#endif

#include "r16_gemm.h"  // Q4_0, Q4_1, Q8_0, grouped int8 in 16-row groups, integer dot products
#include "q6_k_x15.h"  // Q6_K rows times x as 15-bit integers

// y[m, 0:n_out] = W x[m] for M rows (x: M x K, y: M x n_out). packed: uint8 (N_pad, K/2) in
// `layout`; sz: bf16 (K/gs, N_pad, 2) as 32-bit words. Work goes to threads in 32-row halves of
// blocks, so 576 rows split 288/288, not 320/256. Each block is read from memory once and run for
// every row while its bytes are in cache (a batch of M rows costs far less than M GEMVs), and a
// row's sums are the single-row kernel's, in the same order: its values never depend on M or on
// the other rows (batch invariance, which the server promises).
void int4_gemv(const Int4Layout& layout, const float* x, const uint8_t* packed, const uint32_t* sz, int64_t K,
               int64_t gs, int64_t N_pad, int64_t n_out, float* y, bool portable_only = false, int64_t M = 1) {
  const int64_t G = K / gs;
  float xsum_small[64];
  std::vector<float> xsum_big;
  float* xsum = xsum_small;  // (M, G)
  if (M * G > 64) {
    xsum_big.resize(M * G);
    xsum = xsum_big.data();
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < gs; ++k) sum += x[m * K + g * gs + k];
      xsum[m * G + g] = sum;
    }
  }
  const int64_t BN = layout.block;
  const int64_t full = N_pad / BN;      // full blocks
  const bool tail = full * BN < N_pad;  // a short last block
  // in 32-row units (16 K bytes): below ~12 KiB a thread, waking the other costs more (~0.4 us)
  // than it saves
  const int64_t grain = std::max<int64_t>(1, (12 << 10) / (16 * K * M));
  auto store = [&](int64_t m, int64_t r0, const float* v, int64_t n) {  // row m's outputs r0.., padding dropped
    if (r0 < n_out) std::copy(v, v + std::min(n, n_out - r0), y + m * n_out + r0);
  };
  auto portable = [&](int64_t blk) {
    const int64_t r0 = blk * BN, nb = std::min(BN, N_pad - r0);
    float out[64];
    for (int64_t m = 0; m < M; ++m) {
      int4_block_portable(layout, x + m * K, xsum + m * G, packed + r0 * K / 2, sz, K, gs, N_pad, r0, nb, out);
      store(m, r0, out, nb);
    }
  };
#ifdef __AVX512F__
  if (BN == 64 && layout.split && !portable_only) {
    at::parallel_for(0, 2 * full + tail, grain, [&](int64_t u0, int64_t u1) {
      __m512 v[4];
      float out[64];
      auto run = [&](int64_t blk, int h0, int H) {  // H halves of block blk from half h0, every row
        const uint8_t* B = packed + blk * 32 * K;
        if (M > 1) {  // rows 4 (then 2, 1) at a time, one table lookup per code for all of them
          __m512 w[8];
          for (int h = h0; h < h0 + H; ++h) {
            in_row_chunks(M, [&](auto R, int64_t m) {
              int4_half_avx512_rows<R>(x + m * K, xsum + m * G, B, sz + blk * 64, K, gs, N_pad, h, w);
              for (int r = 0; r < R; ++r) {
                _mm512_storeu_ps(out, w[2 * r]);
                _mm512_storeu_ps(out + 16, w[2 * r + 1]);
                store(m + r, blk * 64 + h * 16, out, 16);
                store(m + r, blk * 64 + 32 + h * 16, out + 16, 16);
              }
            });
          }
          return;
        }
        for (int64_t m = 0; m < M; ++m) {
          if (H == 2) {
            int4_block_avx512<2>(x + m * K, xsum + m * G, B, sz + blk * 64, K, gs, N_pad, 0, v);
          } else {
            int4_block_avx512<1>(x + m * K, xsum + m * G, B, sz + blk * 64, K, gs, N_pad, h0, v);
          }
          for (int h = 0; h < H; ++h) {  // v[h]: rows (h0 + h) * 16, v[H + h]: 32 more
            _mm512_storeu_ps(out, v[h]);
            _mm512_storeu_ps(out + 16, v[H + h]);
            store(m, blk * 64 + (h0 + h) * 16, out, 16);
            store(m, blk * 64 + 32 + (h0 + h) * 16, out + 16, 16);
          }
        }
      };
      int64_t u = u0;
      const int64_t end = std::min(u1, 2 * full);
      if (u < end) {  // this thread's first reads: the blocks' own prefetches start from there
        const uint8_t* B = packed + (u / 2) * 32 * K;
        for (int64_t i = 0; i < std::min(kInt4PrefetchBytes, 32 * K); i += 64) _mm_prefetch(reinterpret_cast<const char*>(B + i), _MM_HINT_T0);
        for (int64_t g = 0; g < std::min(kInt4PrefetchGroups, K / gs); ++g) int4_prefetch_scales(sz + g * N_pad + (u / 2) * 64);
      }
      if (u < end && (u & 1)) run(u++ / 2, 1, 1);
      for (; u + 2 <= end; u += 2) run(u / 2, 0, 2);
      if (u < end) run(u++ / 2, 0, 1);
      if (u1 > 2 * full) portable(full);
    });
    return;
  }
#endif
  const bool avx2 = BN == 32 && layout.split && !portable_only;  // torch's AVX2 packing
  at::parallel_for(0, full + tail, std::max<int64_t>(1, grain * 32 / BN), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
#if defined(__AVX2__) && defined(__FMA__)
      if (avx2 && blk < full && M == 1) {
        float out[32];
        int4_block_avx2(x, xsum, packed + blk * 16 * K, sz + blk * 32, K, gs, N_pad, out);
        store(0, blk * 32, out, 32);
        continue;
      }
      if (avx2 && blk < full) {  // rows 4 (then 2, 1) at a time, each code converted once for them
        float out[32];
        const uint8_t* B = packed + blk * 16 * K;
        for (int c = 0; c < 4; ++c) {  // quarter c: rows 8 (c & 1) + 16 (c >> 1) .. + 7
          in_row_chunks(M, [&](auto R, int64_t m) {
            int4_quarter_avx2_rows<R>(x + m * K, xsum + m * G, B, sz + blk * 32, K, gs, N_pad, c, out);
            for (int r = 0; r < R; ++r) store(m + r, blk * 32 + 8 * (c & 1) + 16 * (c >> 1), out + 8 * r, 8);
          });
        }
        continue;
      }
#endif
      portable(blk);
    }
  });
  (void)avx2;
}

// The checks that let the decode step read a layer with int4_gemv rather than torch's kernel.
bool int4_gemv_fits(const at::Tensor& packed, const at::Tensor& sz, int64_t group, int64_t n_out, int64_t K) {
  const auto& l = int4_layout();
  if (l.block == 0 || packed.scalar_type() != at::kByte || packed.dim() != 2 || !packed.is_contiguous()) return false;
  const int64_t N_pad = packed.size(0);
  return packed.size(1) * 2 == K && N_pad % 16 == 0 && n_out <= N_pad && group > 0 && group % 2 == 0 &&
         K % group == 0 && sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 &&
         sz.size(0) == K / group && sz.size(1) == N_pad && sz.size(2) == 2;
}

// The kernels a linear layer runs here, from the `kind` of its quant.linear.PreparedWeights record.
enum Kind : int64_t { DENSE = 0, INT4 = 1, INT8 = 2, FP16 = 3, GGUF = 4, ROWS = 5, R16 = 6 };

struct Linear {
  int64_t kind;
  at::Tensor a, b;  // DENSE/FP16: weight (N, K); INT4: packed, scales_and_zeros; INT8: qweight, scales
  int64_t group;    // INT4's group size
  int64_t n_out;    // the kernel's output may hold padding rows past n_out
  int64_t k_in;
  at::Tensor x_in;  // (1, K) input buffer in the kernel's activation dtype
  bool own_int4 = false;  // INT4 read by int4_gemv
  GgufType gguf = GGUF_NONE;  // GGUF: the block type of `a`'s rows
  int r16 = -1;               // R16: the R16Type of `a`'s bytes
  std::vector<Linear> parts;  // ROWS: layers whose outputs follow one another (q, k, v in two types)

  // Whether apply reads the weight once for M rows (r16, Q6_K, our int4 kernel, ROWS of those):
  // torch's kernels and the other GGUF block kernels run a prompt's rows a few at a time.
  bool one_pass() const {
    if (kind == ROWS) return std::all_of(parts.begin(), parts.end(), [](const Linear& p) { return p.one_pass(); });
    return kind == R16 || (kind == GGUF && gguf == GGUF_Q6_K) ||
           (kind == INT4 && own_int4 && !g_int4_torch.load(std::memory_order_relaxed));
  }

  // y[m, 0:n_out] = W x[m] for M rows (x: M x k_in, y: M x n_out), fp32. Our kernels (int4, GGUF
  // blocks, r16) read the weight once for all rows; torch's kernels run a row at a time,
  // since their blocking (and so their sums' order) may change with the number of rows: a row's
  // values never depend on M. x8: r16 layers take x as 8-bit integers (r16_gemm.h's
  // quantize_x_row); the other kinds keep their own rounding.
  void apply(const float* x, float* y, int64_t M = 1, bool x8 = false) {
    if (kind == R16) {
      r16_gemm(r16, a.data_ptr<uint8_t>(), n_out, k_in, x, M, y, false, x8);
      return;
    }
    if (kind == GGUF && gguf == GGUF_Q6_K) {
      q6_k_gemm(static_cast<const uint8_t*>(a.data_ptr()), x, M, n_out, k_in, y, true, false);
      return;
    }
    if (kind == GGUF) {
      block_gemv(gguf, static_cast<const uint8_t*>(a.data_ptr()), b.defined() ? b.data_ptr<float>() : nullptr, x, M,
                 n_out, k_in, y);
      return;
    }
    if (kind == ROWS) {  // each part over all M rows, then its columns into each row's output
      // one buffer a thread for every ROWS layer: a prompt's chunk of rows leaves one, not one a layer
      static thread_local std::vector<float> part_out;
      int64_t off = 0;
      for (auto& p : parts) {
        part_out.resize(M * p.n_out);
        p.apply(x, part_out.data(), M, x8);
        for (int64_t r = 0; r < M; ++r) std::copy_n(part_out.data() + r * p.n_out, p.n_out, y + r * n_out + off);
        off += p.n_out;
      }
      return;
    }
    if (own_int4 && !g_int4_torch.load(std::memory_order_relaxed)) {
      int4_gemv(int4_layout(), x, a.data_ptr<uint8_t>(), reinterpret_cast<const uint32_t*>(b.data_ptr()), k_in,
                group, a.size(0), n_out, y, false, M);
      return;
    }
    for (int64_t m = 0; m < M; ++m) apply_torch(x + m * k_in, y + m * n_out);
  }

 private:
  void apply_torch(const float* x, float* y) {
    const int64_t K = k_in;
    at::Tensor out;
    if (kind == DENSE) {
      float* xi = x_in.data_ptr<float>();
      std::copy(x, x + K, xi);
      out = at::mm(x_in, a.t());
    } else if (kind == FP16) {
      auto* xi = x_in.data_ptr<at::Half>();
      for (int64_t i = 0; i < K; ++i) xi[i] = at::Half(x[i]);
      out = at::mm(x_in, a.t());
    } else {
      auto* xi = x_in.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < K; ++i) xi[i] = at::BFloat16(x[i]);
      out = kind == INT4 ? at::_weight_int4pack_mm_for_cpu(x_in, a, group, b)
                         : at::_weight_int8pack_mm(x_in, a, b);
    }
    if (out.scalar_type() == at::kFloat) {
      const float* o = out.data_ptr<float>();
      std::copy(o, o + n_out, y);
    } else if (out.scalar_type() == at::kBFloat16) {
      const auto* o = out.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < n_out; ++i) y[i] = static_cast<float>(o[i]);
    } else {
      const auto* o = out.data_ptr<at::Half>();
      for (int64_t i = 0; i < n_out; ++i) y[i] = static_cast<float>(o[i]);
    }
  }
};

// From a quant.linear.PreparedWeights record (its fields by name; see its docstring for layouts).
Linear make_linear(const py::object& w) {
  const std::string name = w.attr("kind").cast<std::string>();
  int64_t kind;
  if (name == "dense") {
    kind = DENSE;
  } else if (name == "int4") {
    kind = INT4;
  } else if (name == "int8") {
    kind = INT8;
  } else if (name == "fp16") {
    kind = FP16;
  } else if (name == "gguf") {
    kind = GGUF;
  } else if (name == "rows") {
    kind = ROWS;
  } else if (name == "r16") {
    kind = R16;
  } else {
    TORCH_CHECK(false, "no kernel for prepared weights of kind '", name, "'");
  }
  const py::object weight = w.attr("weight"), scales = w.attr("scales");
  Linear l{kind, weight.is_none() ? at::Tensor() : weight.cast<at::Tensor>(),
           scales.is_none() ? at::Tensor() : scales.cast<at::Tensor>(), w.attr("group_size").cast<int64_t>(),
           w.attr("out_features").cast<int64_t>(), w.attr("in_features").cast<int64_t>(), {}};
  if (kind == GGUF) {
    l.gguf = gguf_type(w.attr("scheme").cast<std::string>());
    TORCH_CHECK(l.gguf != GGUF_NONE, "no native kernel for GGUF blocks of type ", w.attr("scheme").cast<std::string>());
    TORCH_CHECK(l.a.scalar_type() == at::kByte && l.a.is_contiguous() && l.a.dim() == 2 && l.a.size(0) == l.n_out &&
                    l.a.size(1) == block_row_bytes(l.gguf, l.k_in), "GGUF blocks do not fit the layer's shape");
    return l;
  }
  if (kind == R16) {
    l.r16 = r16_type(w.attr("scheme").cast<std::string>());
    TORCH_CHECK(l.r16 >= 0, "no r16 layout for ", w.attr("scheme").cast<std::string>());
    TORCH_CHECK(l.a.scalar_type() == at::kByte && l.a.is_contiguous() && l.k_in % 32 == 0 &&
                    l.a.numel() == r16_bytes(l.r16, l.n_out, l.k_in), "r16 bytes do not fit the layer's shape");
    return l;
  }
  if (kind == ROWS) {
    int64_t n = 0;
    for (const auto& part : w.attr("parts")) {
      l.parts.push_back(make_linear(py::reinterpret_borrow<py::object>(part)));
      TORCH_CHECK(l.parts.back().k_in == l.k_in && l.parts.back().kind != ROWS, "stacked layers must share K");
      n += l.parts.back().n_out;
    }
    TORCH_CHECK(n == l.n_out, "stacked layers do not add up to the layer's rows");
    return l;
  }
  auto dtype = l.kind == DENSE ? at::kFloat : l.kind == FP16 ? at::kHalf : at::kBFloat16;
  l.x_in = at::empty({1, l.k_in}, at::TensorOptions().dtype(dtype));
  l.own_int4 = l.kind == INT4 && int4_gemv_fits(l.a, l.b, l.group, l.n_out, l.k_in);
  return l;
}

struct Block {
  at::Tensor attention_norm, ffn_norm;  // (D,) fp32
  at::Tensor k_cache, v_cache;          // (1, n_kv, S, hd) fp32, bf16 or int8
  at::Tensor k_scale, v_scale;          // (1, n_kv, S, 1) fp32 for an int8 cache, else undefined
  Linear wqkv, wo, w13, w2;
};

// exp for softmax and SiLU in a form the compiler vectorizes (std::exp is one call per value):
// 2^(x log2 e) as an exponent-bits power of two times Cephes' exp2f polynomial on [-0.5, 0.5],
// ~2e-7 relative error.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const float n = std::floor(t + 0.5f);
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return p * pow2n;
}

// Cache elements as fp32: bf16 is the top half of an fp32; int8 codes get their vector's scale later.
inline float as_float(float x) { return x; }
inline float as_float(int8_t x) { return static_cast<float>(x); }
inline float as_float(at::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

void rms_norm(const float* x, const float* w, float* out, int64_t n, double eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / n + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

// Meta's interleaved RoPE: pairs (x0, x1) rotate as complex numbers by (cos, sin) of their position.
void rope(float* x, const float* cs, int64_t n_heads, int64_t hd) {
  for (int64_t h = 0; h < n_heads; ++h) {
    float* v = x + h * hd;
    for (int64_t j = 0; j < hd / 2; ++j) {
      const float a = v[2 * j], b = v[2 * j + 1], c = cs[2 * j], s = cs[2 * j + 1];
      v[2 * j] = a * c - b * s;
      v[2 * j + 1] = a * s + b * c;
    }
  }
}

// p[i] = exp(p[i] - max p) for a softmax: returns their sum, the max in *max_out
inline float exp_shifted(float* p, int64_t n, float* max_out) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, p[i]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    p[i] = fast_exp(p[i] - mx);
    sum += p[i];
  }
  *max_out = mx;
  return sum;
}


#ifdef LLAMADESK_VEC
// ---- attention for one KV head and the n_rep queries that share it, W keys at a time.
// Scores take one FMA per W values of a key and a W-by-W transposing sum per W keys (a
// horizontal sum per key costs ~10x more); values are weighted into hd/W accumulators.
//
// Keys t0..t1 of one KV head against its `rep` queries (q: rep x hd, hd = NC W). Leaves in o
// (rep x hd) the sum of exp(score - m) * v, in m (rep) the largest score and in l (rep) the sum of
// exp(score - m): partial results over a key range, merged across ranges by merge_attention.
template <typename S, typename T, int NC>
void attend_range(const float* q, const T* keys, const T* vals, const float* ks, const float* vs, int64_t t0,
                  int64_t t1, int64_t rep, float scale, float* p, float* o, float* m, float* l) {
  using V = typename S::V;
  constexpr int W = S::W;
  constexpr int64_t hd = NC * W;
  // The query stays in registers beside the W key sums while it fits (AVX-512); else (AVX2)
  // each of its vectors is loaded once per W keys and swept across them.
  constexpr bool q_in_regs = NC + W + 4 <= S::kRegs;
  // Values: up to 8 vectors of columns at a time, in two sets of accumulators (even and odd
  // keys, twice the FMAs in flight) where the registers hold both.
  constexpr int CC = NC < 8 ? NC : 8;
  constexpr bool two_sets = 4 * CC <= S::kRegs;
  static_assert(NC % CC == 0, "head dim is a multiple of the value columns swept at once");
  const int64_t n = t1 - t0;
  for (int64_t r = 0; r < rep; ++r) {
    const float* qr = q + r * hd;
    V qv[q_in_regs ? NC : 1];
    if (q_in_regs) {
      for (int c = 0; c < NC; ++c) qv[c] = S::load(qr + W * c);
    }
    float* pr = p + r * n;
    for (int64_t t = t0; t < t1; t += W) {
      const int64_t nb = std::min<int64_t>(W, t1 - t);
      V acc[W];
      if (q_in_regs) {
        for (int64_t j = 0; j < W; ++j) {
          if (j < nb) {
            const T* kt = keys + (t + j) * hd;
            V a = S::mul(qv[0], S::load(kt));
            for (int c = 1; c < NC; ++c) a = S::fma(qv[c], S::load(kt + W * c), a);
            acc[j] = a;
          } else {
            acc[j] = S::zero();
          }
        }
      } else {
        // a short last run of keys reads its last key again in the lanes it does not store
        const T* kt = keys + t * hd;
        for (int j = 0; j < W; ++j) acc[j] = S::zero();
        for (int c = 0; c < NC; ++c) {
          const V qc = S::load(qr + W * c);
          if (nb == W) {
            for (int j = 0; j < W; ++j) acc[j] = S::fma(qc, S::load(kt + j * hd + W * c), acc[j]);
          } else {
            for (int j = 0; j < W; ++j) acc[j] = S::fma(qc, S::load(kt + std::min<int64_t>(j, nb - 1) * hd + W * c), acc[j]);
          }
        }
      }
      V sc = S::mul(S::sum_transposed(acc), S::set1(scale));
      if (ks) sc = S::mul(sc, S::load_first(ks + t, nb));
      S::store_first(pr + (t - t0), sc, nb);
    }
    l[r] = exp_shifted(pr, n, m + r);
    if (vs) {
      for (int64_t i = 0; i < n; ++i) pr[i] *= vs[t0 + i];
    }
    for (int c0 = 0; c0 < NC; c0 += CC) {
      V a0[CC], a1[CC];
      for (int c = 0; c < CC; ++c) a0[c] = a1[c] = S::zero();
      const T* v0 = vals + t0 * hd + W * c0;
      int64_t i = 0;
      if (two_sets) {
        for (; i + 1 < n; i += 2) {
          const V w0 = S::set1(pr[i]), w1 = S::set1(pr[i + 1]);
          for (int c = 0; c < CC; ++c) {
            a0[c] = S::fma(w0, S::load(v0 + i * hd + W * c), a0[c]);
            a1[c] = S::fma(w1, S::load(v0 + (i + 1) * hd + W * c), a1[c]);
          }
        }
      }
      for (; i < n; ++i) {
        const V w0 = S::set1(pr[i]);
        for (int c = 0; c < CC; ++c) a0[c] = S::fma(w0, S::load(v0 + i * hd + W * c), a0[c]);
      }
      for (int c = 0; c < CC; ++c) S::store(o + r * hd + W * (c0 + c), two_sets ? S::add(a0[c], a1[c]) : a0[c]);
    }
  }
}
#endif

// out (rep x hd) = the softmax-weighted values of `parts` key ranges, each with its own (o, m, l)
inline void merge_attention(const float* o, const float* m, const float* l, int64_t parts, int64_t rep,
                            int64_t hd, float* out) {
  for (int64_t r = 0; r < rep; ++r) {
    float mx = -INFINITY;
    for (int64_t s = 0; s < parts; ++s) mx = std::max(mx, m[s * rep + r]);
    float total = 0.f;
    float* y = out + r * hd;
    std::fill(y, y + hd, 0.f);
    for (int64_t s = 0; s < parts; ++s) {
      const float w = fast_exp(m[s * rep + r] - mx);
      total += w * l[s * rep + r];
      const float* os = o + (s * rep + r) * hd;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) y[d] += w * os[d];
    }
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) y[d] *= inv;
  }
}

class Decoder {
  // attention's scratch for one row
  struct AttnScratch {
    std::vector<float> scores, part_o, part_ml;
  };

 public:
  Decoder(int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t hidden,
          double eps, at::Tensor rope_cos_sin)
      : dim_(dim), nh_(n_heads), nkv_(n_kv_heads), hd_(head_dim), hidden_(hidden), eps_(eps),
        rope_(rope_cos_sin.contiguous()) {
    const int64_t qkv = (nh_ + 2 * nkv_) * hd_;
    xn_.resize(dim_);
    qkv_.resize(qkv);
    att_.resize(nh_ * hd_);
    o_.resize(dim_);
    h13_.resize(2 * hidden_);
    act_.resize(hidden_);
  }

  void add_block(at::Tensor attention_norm, at::Tensor ffn_norm, at::Tensor k_cache, at::Tensor v_cache,
                 c10::optional<at::Tensor> k_scale, c10::optional<at::Tensor> v_scale,
                 const py::object& wqkv, const py::object& wo, const py::object& w13, const py::object& w2) {
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
    const auto t = k_cache.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kChar, "KV cache dtype ", t, " is not supported");
    TORCH_CHECK(t != at::kChar || (k_scale && v_scale), "an int8 KV cache needs its scales");
    blocks_.push_back(Block{attention_norm.contiguous(), ffn_norm.contiguous(), k_cache, v_cache,
                            t == at::kChar ? *k_scale : at::Tensor(), t == at::kChar ? *v_scale : at::Tensor(),
                            make_linear(wqkv), make_linear(wo), make_linear(w13), make_linear(w2)});
  }

  // x: (B, 1, dim) fp32 hidden states of B tokens, token b at position positions[b] of KV-cache
  // row rows[b] (the caches are (rows, n_kv, S, hd)); returns them after blocks first .. last - 1
  // (default: every block). Each linear layer runs once for the B rows; norms and RoPE run row by
  // row, then every row's k and v go into the cache, then each row attends to its cache row's keys
  // up to its position. So tokens may share a cache row at distinct positions: a prompt's chunk
  // (quant/decode_cpu.py's run_prompt_chunk) is its tokens as rows of one cache row, each seeing
  // those before it.
  at::Tensor step_rows(at::Tensor x, const std::vector<int64_t>& positions, const std::vector<int64_t>& rows,
                       int64_t first = 0, int64_t last = -1) {
    const int64_t B = static_cast<int64_t>(positions.size());
    last = last < 0 ? static_cast<int64_t>(blocks_.size()) : last;
    TORCH_CHECK(0 <= first && first <= last && last <= static_cast<int64_t>(blocks_.size()), "blocks ", first, " to ",
                last, " are not among the ", blocks_.size());
    TORCH_CHECK(B > 0 && static_cast<int64_t>(rows.size()) == B, "one position and one cache row a token");
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() == B * dim_, "x must be (B, 1, dim) fp32");
    for (int64_t i = 0; i < B; ++i) {
      TORCH_CHECK(positions[i] >= 0 && positions[i] < rope_.size(0), "position ", positions[i], " is past the cache");
      TORCH_CHECK(blocks_.empty() || (rows[i] >= 0 && rows[i] < blocks_[0].k_cache.size(0)), "cache row ", rows[i],
                  " is out of range");
    }
    seen_.resize(B);  // kept between calls: a decode step allocates nothing
    for (int64_t i = 0; i < B; ++i) seen_[i] = {rows[i], positions[i]};
    std::sort(seen_.begin(), seen_.end());
    const auto twice = std::adjacent_find(seen_.begin(), seen_.end());
    TORCH_CHECK(twice == seen_.end(), "cache row ", twice->first, " position ", twice->second, " is given twice");
    const int64_t qkv = (nh_ + 2 * nkv_) * hd_;
    xn_.resize(B * dim_);
    qkv_.resize(B * qkv);
    att_.resize(B * nh_ * hd_);
    o_.resize(B * dim_);
    h13_.resize(B * 2 * hidden_);
    act_.resize(B * hidden_);
    // one attention scratch a thread (a row's scores take n_heads x its keys)
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    if (static_cast<int64_t>(scratch_.size()) < threads) scratch_.resize(threads);
    at::Tensor h = x.contiguous().clone().view({B, 1, dim_});
    float* hp = h.data_ptr<float>();
    for (int64_t l = first; l < last; ++l) {
      Block& b = blocks_[l];
      // attention: h += wo(attend(rope(q), rope(k), v))
      for (int64_t r = 0; r < B; ++r) rms_norm(hp + r * dim_, b.attention_norm.data_ptr<float>(), xn_.data() + r * dim_, dim_, eps_);
      b.wqkv.apply(xn_.data(), qkv_.data(), B, x8_);
      for (int64_t r = 0; r < B; ++r) {
        float* q = qkv_.data() + r * qkv;
        rope(q, rope_.data_ptr<float>() + positions[r] * hd_, nh_ + nkv_, hd_);  // q and k sit next to each other
        switch (b.k_cache.scalar_type()) {
          case at::kFloat: store_kv<float>(b, q + nh_ * hd_, q + (nh_ + nkv_) * hd_, positions[r], rows[r]); break;
          case at::kBFloat16: store_kv<at::BFloat16>(b, q + nh_ * hd_, q + (nh_ + nkv_) * hd_, positions[r], rows[r]); break;
          default: store_kv<int8_t>(b, q + nh_ * hd_, q + (nh_ + nkv_) * hd_, positions[r], rows[r]); break;
        }
      }
      auto attend_rows = [&](int64_t r0, int64_t r1) {
        const int64_t t = at::get_thread_num();
        TORCH_CHECK(t < threads, "attention scratch for thread ", t, " of ", threads);
        AttnScratch& sc = scratch_[t];
        for (int64_t r = r0; r < r1; ++r) {
          const float* q = qkv_.data() + r * qkv;
          float* out = att_.data() + r * nh_ * hd_;
          switch (b.k_cache.scalar_type()) {
            case at::kFloat: attend_block<float>(b, q, positions[r], rows[r], out, sc); break;
            case at::kBFloat16: attend_block<at::BFloat16>(b, q, positions[r], rows[r], out, sc); break;
            default: attend_block<int8_t>(b, q, positions[r], rows[r], out, sc); break;
          }
        }
      };
      // rows on the threads at once (each its own cache row and scratch); a row's arithmetic is
      // what it does alone, since its key ranges follow KEY_PARTS, not the region it runs in.
      // An fp32 cache's long rows run torch's matmul: one row at a time.
      if (B > 1 && (b.k_cache.scalar_type() != at::kFloat || vector_attention())) {
        at::parallel_for(0, B, 1, attend_rows);
      } else {
        attend_rows(0, B);
      }
      b.wo.apply(att_.data(), o_.data(), B, x8_);
      for (int64_t i = 0; i < B * dim_; ++i) hp[i] += o_[i];
      // feed-forward: h += w2(silu(w1 x) * w3 x)
      for (int64_t r = 0; r < B; ++r) rms_norm(hp + r * dim_, b.ffn_norm.data_ptr<float>(), xn_.data() + r * dim_, dim_, eps_);
      b.w13.apply(xn_.data(), h13_.data(), B, x8_);
      for (int64_t r = 0; r < B; ++r) {
        const float* gate = h13_.data() + r * 2 * hidden_;
        const float* up = gate + hidden_;
        float* act = act_.data() + r * hidden_;
#pragma omp simd
        for (int64_t i = 0; i < hidden_; ++i) act[i] = gate[i] / (1.f + fast_exp(-gate[i])) * up[i];
      }
      b.w2.apply(act_.data(), o_.data(), B, x8_);
      for (int64_t i = 0; i < B * dim_; ++i) hp[i] += o_[i];
    }
    return h;
  }

  // 8: from the next step on, the r16 layers (and an r16 head) take x as 8-bit integers (one
  // product a weight: about half the vector work a row, what a server's batched steps are made
  // of), 15: as 15-bit integers (the default); returns the previous setting. Every row of every
  // step the same way, so a row's logits still do not depend on the rows beside it. Set between
  // steps (the engine does, when it builds or hands over a decoder): a step reads it unlocked.
  int64_t set_activation_bits(int64_t bits) {
    TORCH_CHECK(bits == 8 || bits == 15, "activations are rounded to 8 or 15 bits, not ", bits);
    return std::exchange(x8_, bits == 8) ? 8 : 15;
  }

  // The model's final norm and output layer (its prepared weights), so that step_logits can end
  // a token's step in here: between the blocks and the head, Python's ~10 small ops each let go
  // of the GIL and wait to get it back from whatever Python thread runs meanwhile (the chat app's
  // screen, the server's event loop).
  void set_head(at::Tensor norm, const py::object& output) {
    TORCH_CHECK(norm.scalar_type() == at::kFloat && norm.numel() == dim_, "the final norm must be (dim,) fp32");
    head_norm_ = norm.contiguous();
    head_ = make_linear(output);
    TORCH_CHECK(head_.k_in == dim_, "the output layer must take dim inputs");
    has_head_ = true;
  }

  // The model's token table (a quant.linear.PreparedEmbedding record), so that step_tokens can
  // start a token's step in here too.
  void set_embedding(const py::object& e) {
    const std::string kind = e.attr("kind").cast<std::string>();
    emb_table_ = e.attr("table").cast<at::Tensor>();
    const py::object scales = e.attr("scales");
    emb_scales_ = scales.is_none() ? at::Tensor() : scales.cast<at::Tensor>();
    emb_group_ = e.attr("group_size").cast<int64_t>();
    TORCH_CHECK(e.attr("dim").cast<int64_t>() == dim_ && emb_table_.is_contiguous() && emb_table_.dim() == 2,
                "the token table must be contiguous (V, dim) rows");
    if (kind == "dense") {
      TORCH_CHECK(emb_table_.scalar_type() == at::kFloat && emb_table_.size(1) == dim_, "a dense table is fp32 (V, dim)");
      emb_kind_ = EMB_DENSE;
    } else if (kind == "int8_group") {
      TORCH_CHECK(emb_table_.scalar_type() == at::kChar && emb_table_.size(1) == dim_ && emb_group_ > 0 &&
                      dim_ % emb_group_ == 0 && emb_scales_.defined() && emb_scales_.scalar_type() == at::kFloat &&
                      emb_scales_.is_contiguous() && emb_scales_.numel() == emb_table_.size(0) * (dim_ / emb_group_),
                  "an int8 table is int8 (V, dim) with fp32 scales (V, dim / group)");
      emb_kind_ = EMB_INT8;
    } else if (kind == "gguf") {
      emb_gguf_ = gguf_type(e.attr("scheme").cast<std::string>());
      TORCH_CHECK(emb_gguf_ != GGUF_NONE && emb_table_.scalar_type() == at::kByte &&
                      emb_table_.size(1) == block_row_bytes(emb_gguf_, dim_), "GGUF rows do not fit the table's shape");
      emb_kind_ = EMB_GGUF;
    } else {
      TORCH_CHECK(false, "no lookup for a token table of kind '", kind, "'");
    }
  }

  // The token table's rows, then step_logits: logits (B, V) fp32 after token b at positions[b]
  // of cache row rows[b]. Each row is what the module's own lookup gives, in fp32.
  at::Tensor step_tokens(const std::vector<int64_t>& tokens, const std::vector<int64_t>& positions,
                         const std::vector<int64_t>& rows) {
    TORCH_CHECK(emb_kind_ != EMB_NONE, "set_embedding first");
    const int64_t B = static_cast<int64_t>(tokens.size()), V = emb_table_.size(0);
    at::Tensor x = at::empty({B, 1, dim_}, at::TensorOptions().dtype(at::kFloat));
    float* xp = x.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t = tokens[b];
      TORCH_CHECK(t >= 0 && t < V, "token ", t, " is not in the vocabulary");
      float* out = xp + b * dim_;
      if (emb_kind_ == EMB_DENSE) {
        const float* row = emb_table_.data_ptr<float>() + t * dim_;
        std::copy(row, row + dim_, out);
      } else if (emb_kind_ == EMB_INT8) {
        const int8_t* row = emb_table_.data_ptr<int8_t>() + t * dim_;
        const float* sc = emb_scales_.data_ptr<float>() + t * (dim_ / emb_group_);
        for (int64_t i = 0; i < dim_; ++i) out[i] = static_cast<float>(row[i]) * sc[i / emb_group_];
      } else {
        gguf_dequantize(emb_gguf_, emb_table_.data_ptr<uint8_t>(), dim_, t, t + 1, out);
      }
    }
    return step_logits(x, positions, rows);
  }

  // step_rows, then the final norm and the output layer of each row: logits (B, V) fp32. The head
  // runs once for the B rows, a row's logits independent of the others (Linear::apply).
  at::Tensor step_logits(at::Tensor x, const std::vector<int64_t>& positions, const std::vector<int64_t>& rows) {
    TORCH_CHECK(has_head_, "set_head first");
    at::Tensor h = step_rows(x, positions, rows);
    const int64_t B = static_cast<int64_t>(positions.size());
    const float* hp = h.data_ptr<float>();
    for (int64_t r = 0; r < B; ++r) rms_norm(hp + r * dim_, head_norm_.data_ptr<float>(), xn_.data() + r * dim_, dim_, eps_);
    at::Tensor logits = at::empty({B, head_.n_out}, at::TensorOptions().dtype(at::kFloat));
    head_.apply(xn_.data(), logits.data_ptr<float>(), B, x8_);
    return logits;
  }

  // Whether a prompt's chunk as B rows reads each layer's weights once (Linear::one_pass for every
  // layer): else the model's forward, whose torch GEMMs take all rows, runs it faster.
  bool prompts_in_one_pass() const {
    return std::all_of(blocks_.begin(), blocks_.end(), [](const Block& b) {
      return b.wqkv.one_pass() && b.wo.one_pass() && b.w13.one_pass() && b.w2.one_pass();
    });
  }

  // One token: step_rows for B = 1.
  at::Tensor step(at::Tensor x, int64_t pos, int64_t row) {
    TORCH_CHECK(x.numel() == dim_, "x must be (1, 1, dim) fp32");
    return step_rows(x, {pos}, {row});
  }

 private:
  // attend_fast for every row (no torch matmul, which runs one row at a time)
  bool vector_attention() const {
#ifdef LLAMADESK_VEC
    return hd_ == 64 || hd_ == 128;
#else
    return false;
#endif
  }

  // Store a token's k, v (nkv * hd each) at `pos` of cache row `row` as the cache holds them (as
  // the Python KVCache.update does).
  template <typename T>
  void store_kv(Block& b, const float* k, const float* v, int64_t pos, int64_t row) {
    const int64_t S = b.k_cache.size(2);
    const int64_t first = row * nkv_ * S;  // this row's first vector
    T* kc = b.k_cache.data_ptr<T>() + first * hd_;
    T* vc = b.v_cache.data_ptr<T>() + first * hd_;
    float* ks = b.k_scale.defined() ? b.k_scale.data_ptr<float>() + first : nullptr;
    float* vs = b.v_scale.defined() ? b.v_scale.data_ptr<float>() + first : nullptr;
    for (int64_t g = 0; g < nkv_; ++g) {
      const int64_t at_pos = g * S + pos;
      store(k + g * hd_, kc + at_pos * hd_, ks ? ks + at_pos : nullptr);
      store(v + g * hd_, vc + at_pos * hd_, vs ? vs + at_pos : nullptr);
    }
  }

  // q (nh * hd) against cache row `row`'s keys 0 .. pos; writes out (nh * hd).
  template <typename T>
  void attend_block(Block& b, const float* q, int64_t pos, int64_t row, float* out, AttnScratch& sc) {
    const int64_t S = b.k_cache.size(2);
    const int64_t first = row * nkv_ * S;  // this row's first vector
    const T* kc = b.k_cache.data_ptr<T>() + first * hd_;
    const T* vc = b.v_cache.data_ptr<T>() + first * hd_;
    const float* ks = b.k_scale.defined() ? b.k_scale.data_ptr<float>() + first : nullptr;
    const float* vs = b.v_scale.defined() ? b.v_scale.data_ptr<float>() + first : nullptr;
#ifdef LLAMADESK_VEC
    if (hd_ == 64) return attend_fast<T, 64 / Vec::W>(q, kc, vc, ks, vs, S, pos + 1, out, sc);
    if (hd_ == 128) return attend_fast<T, 128 / Vec::W>(q, kc, vc, ks, vs, S, pos + 1, out, sc);
#endif
    if (std::is_same<T, float>::value && pos + 1 > kLoopKeys) {
      attend_matmul(q, b.k_cache.narrow(0, row, 1), b.v_cache.narrow(0, row, 1), pos + 1, out);
    } else {
      attend(q, kc, vc, ks, vs, S, pos + 1, out, sc);
    }
  }

#ifdef LLAMADESK_VEC
  // Each KV head's keys in `parts` ranges (KEY_PARTS once the context is long), attended on
  // their own and merged by their softmax maxima and sums, as flash-decoding does.
  template <typename T, int NC>
  void attend_fast(const float* q, const T* kc, const T* vc, const float* ks, const float* vs, int64_t S, int64_t L,
                   float* out, AttnScratch& sc) {
    const int64_t rep = nh_ / nkv_;
    const float scale = 1.f / std::sqrt(static_cast<float>(hd_));
    const int64_t parts = L >= g_parallel_keys.load(std::memory_order_relaxed) ? KEY_PARTS : 1;
    const int64_t chunk = ((L + parts - 1) / parts + 15) / 16 * 16;
    const int64_t units = nkv_ * parts;
    if (static_cast<int64_t>(sc.scores.size()) < units * rep * chunk) sc.scores.resize(units * rep * chunk);
    if (static_cast<int64_t>(sc.part_o.size()) < units * rep * hd_) sc.part_o.resize(units * rep * hd_);
    if (static_cast<int64_t>(sc.part_ml.size()) < 2 * units * rep) sc.part_ml.resize(2 * units * rep);
    float* pm = sc.part_ml.data();
    float* pl = pm + units * rep;
    auto run = [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t g = u / parts, t0 = (u % parts) * chunk, t1 = std::min(L, t0 + chunk);
        float* o = sc.part_o.data() + u * rep * hd_;
        if (t0 >= t1) {
          std::fill(o, o + rep * hd_, 0.f);
          std::fill(pm + u * rep, pm + (u + 1) * rep, -INFINITY);
          std::fill(pl + u * rep, pl + (u + 1) * rep, 0.f);
          continue;
        }
        const int64_t head = g * S;
        attend_range<Vec, T, NC>(q + g * rep * hd_, kc + head * hd_, vc + head * hd_, ks ? ks + head : nullptr,
                            vs ? vs + head : nullptr, t0, t1, rep, scale, sc.scores.data() + u * rep * chunk, o,
                            pm + u * rep, pl + u * rep);
      }
    };
    if (parts > 1) {
      at::parallel_for(0, units, 1, run);
    } else {
      run(0, units);
    }
    for (int64_t g = 0; g < nkv_; ++g) {
      merge_attention(sc.part_o.data() + g * parts * rep * hd_, pm + g * parts * rep, pl + g * parts * rep, parts,
                      rep, hd_, out + g * rep * hd_);
    }
  }
#endif

  // Without AVX2 or AVX-512, or for other head dims than 64 and 128:
  // up to this many keys of an fp32 cache, loops beat the matmul kernels' call overhead; past it,
  // the GEMV kernels win (2-core Zen 4, SmolLM2: at 576 keys 4.7 ms a step against 6.1 in loops,
  // whose cost is the per-key dot-product reductions). bf16 and int8 caches, chosen to save
  // memory, always run the loops, which read them without a converted copy.
  static constexpr int64_t kLoopKeys = 192;

  // Attention through the matmul and softmax kernels, query heads grouped by the KV head they share.
  void attend_matmul(const float* q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t L, float* out) {
    const int64_t rep = nh_ / nkv_;
    auto qg = at::from_blob(const_cast<float*>(q), {1, nkv_, rep, hd_}, at::kFloat);  // (B, nkv, n_rep, hd)
    auto k = k_cache.narrow(2, 0, L);                                                // (B, nkv, L, hd)
    auto v = v_cache.narrow(2, 0, L);
    auto scores = at::matmul(qg, k.transpose(-1, -2)).mul_(1.0 / std::sqrt(static_cast<double>(hd_)));
    auto y = at::matmul(at::softmax(scores, -1), v);  // (B, nkv, n_rep, hd)
    std::copy(y.data_ptr<float>(), y.data_ptr<float>() + nh_ * hd_, out);
  }

  void store(const float* x, float* out, float*) { std::copy(x, x + hd_, out); }
  void store(const float* x, at::BFloat16* out, float*) {
    for (int64_t d = 0; d < hd_; ++d) out[d] = at::BFloat16(x[d]);  // round to nearest even, as .to() does
  }
  void store(const float* x, int8_t* out, float* scale) {  // model.quantize_kv: absmax / 127 per vector
    float amax = 0.f;
    for (int64_t d = 0; d < hd_; ++d) amax = std::max(amax, std::abs(x[d]));
    const float s = amax / 127.f;
    const float div = std::max(s, std::numeric_limits<float>::min());
    for (int64_t d = 0; d < hd_; ++d) {
      out[d] = static_cast<int8_t>(std::min(std::max(std::nearbyint(x[d] / div), -127.f), 127.f));
    }
    *scale = s;
  }

  // One query per head against keys 0..L-1 of its KV head; the n_rep query heads that share a
  // KV head read each key and value once. KV heads go to threads once the context is long.
  template <typename T>
  void attend(const float* q, const T* kc, const T* vc, const float* ks, const float* vs, int64_t S, int64_t L,
              float* out, AttnScratch& sc) {
    const int64_t rep = nh_ / nkv_;
    const float scale = 1.f / std::sqrt(static_cast<float>(hd_));
    if (static_cast<int64_t>(sc.scores.size()) < nh_ * L) sc.scores.resize(nh_ * L);
    auto heads = [&](int64_t g0, int64_t g1) {
      std::vector<float> row(hd_);
      for (int64_t g = g0; g < g1; ++g) {
        const T* keys = kc + g * S * hd_;
        const T* vals = vc + g * S * hd_;
        float* p = sc.scores.data() + g * rep * L;  // (rep, L)
        for (int64_t t = 0; t < L; ++t) {
          const T* kt = keys + t * hd_;
          for (int64_t d = 0; d < hd_; ++d) row[d] = as_float(kt[d]);
          const float kscale = ks ? ks[g * S + t] * scale : scale;
          for (int64_t r = 0; r < rep; ++r) {
            const float* qh = q + (g * rep + r) * hd_;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < hd_; ++d) s += qh[d] * row[d];
            p[r * L + t] = s * kscale;
          }
        }
        for (int64_t r = 0; r < rep; ++r) {
          float* pr = p + r * L;
          float mx;
          const float inv = 1.f / exp_shifted(pr, L, &mx);
          for (int64_t t = 0; t < L; ++t) pr[t] *= inv * (vs ? vs[g * S + t] : 1.f);
          std::fill(out + (g * rep + r) * hd_, out + (g * rep + r + 1) * hd_, 0.f);
        }
        for (int64_t t = 0; t < L; ++t) {
          const T* vt = vals + t * hd_;
          for (int64_t d = 0; d < hd_; ++d) row[d] = as_float(vt[d]);
          for (int64_t r = 0; r < rep; ++r) {
            const float w = p[r * L + t];
            float* y = out + (g * rep + r) * hd_;
#pragma omp simd
            for (int64_t d = 0; d < hd_; ++d) y[d] += w * row[d];
          }
        }
      }
    };
    if (L >= g_parallel_keys.load(std::memory_order_relaxed) && nkv_ > 1) {
      at::parallel_for(0, nkv_, 1, heads);
    } else {
      heads(0, nkv_);
    }
  }

  int64_t dim_, nh_, nkv_, hd_, hidden_;
  double eps_;
  at::Tensor rope_;  // (S, hd/2, 2) fp32
  std::vector<Block> blocks_;
  bool x8_ = false;  // set_activation_bits(8)
  std::vector<float> xn_, qkv_, att_, o_, h13_, act_;
  std::vector<AttnScratch> scratch_;  // one a thread: rows attend on the threads at once
  std::vector<std::pair<int64_t, int64_t>> seen_;  // step_rows' (cache row, position) pairs, sorted
  at::Tensor head_norm_;  // (dim,) fp32, with head_ once set_head ran
  Linear head_{};
  bool has_head_ = false;
  enum { EMB_NONE, EMB_DENSE, EMB_INT8, EMB_GGUF } emb_kind_ = EMB_NONE;  // set_embedding's table
  at::Tensor emb_table_, emb_scales_;
  int64_t emb_group_ = 0;
  GgufType emb_gguf_ = GGUF_NONE;
};

// y (M, N) = x (M, K) @ W^T with W = q (N, K) int8 times scales (N, K / 32) fp32, one scale per
// group of 32 along each row: quant.linear's grouped int8 and a GGUF Q8_0 table, exactly.
// PyTorch's int8 kernel takes one scale per row, which re-rounds such a table (+0.3% perplexity
// on SmolLM2's head). One pass over the weights per 4 rows of x (gguf_gemv.h).
at::Tensor int8_group_linear(at::Tensor x, at::Tensor q, at::Tensor scales, bool portable) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be (M, K) fp32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be contiguous (N, K) int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "scales must be contiguous fp32");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && scales.dim() == 2 && scales.size(0) == N && scales.size(1) * 32 == K,
              "int8_group_linear takes groups of 32: q (N, K), scales (N, K / 32)");
  x = x.contiguous();
  auto y = at::empty({M, N}, x.options());
  block_gemv(INT8_GROUP32, reinterpret_cast<const uint8_t*>(q.data_ptr<int8_t>()), scales.data_ptr<float>(),
             x.data_ptr<float>(), M, N, K, y.data_ptr<float>(), portable);
  return y;
}

// y (M, N) = x (M, K) @ W^T for W as N rows of a GGUF file's blocks of `scheme` (q4_0, q4_1,
// q5_0, q8_0, q4_k, q6_k): (N, K / QK * type_size) uint8. One pass over the weights per 4 rows
// of x; `portable` forces the plain C++ kernel (tests). `x15`: Q6_K takes x as 15-bit integers
// (q6_k_x15.h), as the decode step does; the other types and precise layers keep fp32 x.
at::Tensor gguf_linear(at::Tensor x, at::Tensor blocks, const std::string& scheme, bool portable, bool x15) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be (M, K) fp32");
  const GgufType type = gguf_type(scheme);
  TORCH_CHECK(type != GGUF_NONE, "no native kernel for GGUF blocks of type ", scheme);
  const int64_t M = x.size(0), K = x.size(1), N = blocks.size(0);
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.size(1) == block_row_bytes(type, K), "blocks must be contiguous uint8 (N, row bytes of K)");
  x = x.contiguous();
  auto y = at::empty({M, N}, x.options());
  if (type == GGUF_Q6_K) {
    q6_k_gemm(blocks.data_ptr<uint8_t>(), x.data_ptr<float>(), M, N, K, y.data_ptr<float>(), x15, portable);
  } else {
    block_gemv(type, blocks.data_ptr<uint8_t>(), nullptr, x.data_ptr<float>(), M, N, K, y.data_ptr<float>(), portable);
  }
  return y;
}

// (N, K) fp32 values of N rows of a GGUF file's blocks of `scheme` (a native type): what
// gguf.quants.dequantize gives, for prefill tiles (a matmul over many rows of x).
at::Tensor gguf_dequantize_rows(at::Tensor blocks, const std::string& scheme, int64_t K) {
  const GgufType type = gguf_type(scheme);
  TORCH_CHECK(type != GGUF_NONE, "no native kernel for GGUF blocks of type ", scheme);
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.size(1) == block_row_bytes(type, K), "blocks must be contiguous uint8 (N, row bytes of K)");
  auto out = at::empty({blocks.size(0), K}, at::kFloat);
  gguf_dequantize(type, blocks.data_ptr<uint8_t>(), K, 0, blocks.size(0), out.data_ptr<float>());
  return out;
}

// y (M, n_out) = x (M, K) @ W^T for an int4 layer in torch's CPU layout (what the decode step
// runs), fp32 in and out; `portable` forces the plain C++ kernel (tests). One weight read for all rows.
at::Tensor int4_linear(at::Tensor x, at::Tensor packed, at::Tensor scales_and_zeros, int64_t group, int64_t n_out,
                       bool portable) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be (M, K) fp32");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(int4_layout().block != 0, "torch's int4 packing is not a layout int4_linear knows");
  TORCH_CHECK(int4_gemv_fits(packed, scales_and_zeros, group, n_out, K), "packed weight, scales and shapes do not fit");
  x = x.contiguous();
  auto y = at::empty({M, n_out}, x.options());
  int4_gemv(int4_layout(), x.data_ptr<float>(), packed.data_ptr<uint8_t>(),
            reinterpret_cast<const uint32_t*>(scales_and_zeros.data_ptr()), K, group, packed.size(0), n_out,
            y.data_ptr<float>(), portable, M);
  return y;
}

// A source's rows in the r16 layout of r16_gemm.h, uint8 (r16_bytes,): GGUF q4_0 / q4_1 / q8_0
// blocks (N, row bytes of K), or scheme "int8_group": codes int8 (N, K) and `scales` fp32
// (N, K / 32). The same values, 16 rows interleaved.
at::Tensor r16_repack(at::Tensor src, const std::string& scheme, int64_t K, c10::optional<at::Tensor> scales) {
  const int type = r16_type(scheme);
  TORCH_CHECK(type >= 0, "the r16 layout holds q4_0, q4_1, q8_0, q4_k or int8_group weights, not ", scheme);
  TORCH_CHECK(src.dim() == 2 && src.is_contiguous() && K % (type == R16_Q4_K ? 256 : 32) == 0,
              "weights must be contiguous (N, ...)");
  const int64_t N = src.size(0);
  const float* sc = nullptr;
  if (type == R16_I8G) {
    TORCH_CHECK(src.scalar_type() == at::kChar && src.size(1) == K && scales.has_value() &&
                    scales->scalar_type() == at::kFloat && scales->is_contiguous() && scales->numel() == N * (K / 32),
                "int8_group takes codes int8 (N, K) and scales fp32 (N, K / 32)");
    sc = scales->data_ptr<float>();
  } else {
    TORCH_CHECK(src.scalar_type() == at::kByte && src.size(1) == block_row_bytes(gguf_type(scheme), K),
                "blocks must be contiguous uint8 (N, row bytes of K)");
  }
  auto out = at::empty({r16_bytes(type, N, K)}, at::kByte);
  repack_r16(type, static_cast<const uint8_t*>(src.data_ptr()), sc, N, K, out.data_ptr<uint8_t>());
  return out;
}

// y (M, N) = x (M, K) @ W^T for W in the r16 layout (r16_repack), x rounded to 15-bit integers
// per 32 values (r16_gemm.h), or to 8-bit ones with `x8` (as a decode step after
// set_activation_bits(8)); `portable` forces the plain C++ kernel (tests).
at::Tensor r16_linear(at::Tensor x, at::Tensor packed, const std::string& scheme, int64_t N, bool portable,
                      bool x8) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be (M, K) fp32");
  const int type = r16_type(scheme);
  TORCH_CHECK(type >= 0, "the r16 layout holds q4_0, q4_1, q8_0, q4_k or int8_group weights, not ", scheme);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 32 == 0 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == r16_bytes(type, N, K), "r16 bytes do not fit (N, K)");
  x = x.contiguous();
  auto y = at::empty({M, N}, x.options());
  r16_gemm(type, packed.data_ptr<uint8_t>(), N, K, x.data_ptr<float>(), M, y.data_ptr<float>(), portable, x8);
  return y;
}

// (block rows, split halves) of torch's int4 CPU packing as detected; block 0 if unknown
std::tuple<int64_t, bool> int4_packing() { return {int4_layout().block, int4_layout().split}; }

// The vector path this build was compiled for (decode_cpu.py's ISA_FLAGS picks it)
std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "generic";
#endif
}

// "own" or "torch": which kernel decode steps run for int4 layers from now on; returns the previous
std::string set_int4_kernel(const std::string& which) {
  TORCH_CHECK(which == "own" || which == "torch", "int4 kernel must be 'own' or 'torch', not '", which, "'");
  return g_int4_torch.exchange(which == "torch") ? "torch" : "own";
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, at::Tensor>())
      .def("add_block", &Decoder::add_block)
      .def("step", &Decoder::step, py::arg("x"), py::arg("pos"), py::arg("row") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("step_rows", &Decoder::step_rows, py::arg("x"), py::arg("positions"), py::arg("rows"),
           py::arg("first") = 0, py::arg("last") = -1, py::call_guard<py::gil_scoped_release>())
      .def("set_head", &Decoder::set_head)
      .def("set_activation_bits", &Decoder::set_activation_bits)
      .def("set_embedding", &Decoder::set_embedding)
      .def("step_tokens", &Decoder::step_tokens, py::arg("tokens"), py::arg("positions"), py::arg("rows"),
           py::call_guard<py::gil_scoped_release>())
      .def("prompts_in_one_pass", &Decoder::prompts_in_one_pass)
      .def("step_logits", &Decoder::step_logits, py::arg("x"), py::arg("positions"), py::arg("rows"),
           py::call_guard<py::gil_scoped_release>());
  m.def("int8_group_linear", &int8_group_linear, py::arg("x"), py::arg("q"), py::arg("scales"),
        py::arg("portable") = false, py::call_guard<py::gil_scoped_release>());
  m.def("gguf_dequantize_rows", &gguf_dequantize_rows, py::call_guard<py::gil_scoped_release>());
  m.def("gguf_linear", &gguf_linear, py::arg("x"), py::arg("blocks"), py::arg("scheme"), py::arg("portable") = false,
        py::arg("x15") = false, py::call_guard<py::gil_scoped_release>());
  m.def("int4_linear", &int4_linear, py::arg("x"), py::arg("packed"), py::arg("scales_and_zeros"), py::arg("group"),
        py::arg("n_out"), py::arg("portable") = false, py::call_guard<py::gil_scoped_release>());
  m.def("r16_repack", &r16_repack, py::arg("src"), py::arg("scheme"), py::arg("k"), py::arg("scales") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("r16_linear", &r16_linear, py::arg("x"), py::arg("packed"), py::arg("scheme"), py::arg("n_out"),
        py::arg("portable") = false, py::arg("x8") = false, py::call_guard<py::gil_scoped_release>());
  m.def("int4_packing", &int4_packing);
  m.def("isa", &isa);
  m.def("set_int4_kernel", &set_int4_kernel);
  m.def("set_parallel_keys", [](int64_t keys) { return g_parallel_keys.exchange(keys); });
  m.def("set_r16_wide_rows", [](int64_t rows) { return std::exchange(r16_wide_rows(), rows); });
}
