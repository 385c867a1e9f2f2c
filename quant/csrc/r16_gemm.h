// Blocks of 32 weights (Q4_0, Q4_1, Q8_0, Q4_K, grouped int8) times activations as integers, on a
// layout whose vector lanes are 16 weight rows, for decode (a few rows of x) and prefill (many).
//
// Included by decode_cpu.cpp inside its anonymous namespace, after gguf_gemv.h.
//
// Why: gguf_gemv.h multiplies fp32 x into each decoded code, one FMA per weight and row of x,
// and reduces each weight row across its vector lanes. Here each 32 values of x become 15-bit
// integers v = round(x * 16319 / max|x|), split as v = 128 h + l into two int8 halves, and a
// weight's code meets each half in an integer dot product: AVX-512 VNNI's vpdpbusd does 64
// multiply-adds an instruction, AVX2's vpmaddubsw 32 (4-bit codes summed in int16, exact:
// |15 * 128 * 2 * 8| < 2^15; 8-bit codes as |w| times x with w's sign, widened at once). Two dot
// products a weight instead of llama.cpp's one (it rounds x to 8 bits, Q8_0): x keeps 1/16319 of
// its block's largest value where 8 bits keep 1/127, so the logits stay within ~0.1 of exact
// fp32 arithmetic (llama.cpp's way moved them by up to 3 on SmolLM2: see docs/BENCHMARKS.md).
// X8 kernels take x as 8-bit integers instead (quantize_x_row), one product a weight, for a
// server (`llamadesk serve`'s default; `--activation-bits 15` keeps 15 bits). The integer sums are exact, so a block's dot product does not depend on the instruction set;
// its fp32 scaling does only by rounding.
//
// Layout ("r16", made once at load by repack_r16 from a GGUF file's rows or grouped int8's codes
// and scales): N padded to 16; per group of 16 rows, the K / 32 blocks one after another, each
//   codes  4-bit: 256 bytes, 4 runs of 64, run L holding for row r (bytes 4r .. 4r + 3) the codes
//          of k = 8L + j in the low nibbles and k = 8L + 4 + j in the high ones (j = 0..3), so
//          that a nibble mask gives 16 rows x 4 consecutive k, what one vpdpbusd lane sums;
//          8-bit: 512 bytes, 8 runs of 64, run L holding row r's codes of k = 4L .. 4L + 3 plus
//          128 (unsigned, as vpdpbusd takes them);
//   d      16 scales: fp16 (the file's own), fp32 for grouped int8, Q4_K's 6-bit codes (uint8);
//   m      16 mins: Q4_1's fp16 (the file's own), Q4_K's 6-bit codes (uint8).
// Q4_K's 8 blocks of a file's super-block follow a 64-byte header, the 16 rows' fp16 d then their
// fp16 dmin: a block's scale is d times its code, its min -dmin times its code (both exact in
// fp32: 11 + 6 bits), the file's two-level scales read as gguf does.
// The same bytes as the source's (18 a row and block for Q4_0, 20 for Q4_1, 34 for Q8_0, 36 for
// grouped int8, 18.5 for Q4_K where its file has 18), rows interleaved. A value is d (q - 8)
// (Q4_0), d q + m (Q4_1, Q4_K) or d q (8-bit), gguf's arithmetic.

// ---------------------------------------------------------------- x as 15-bit integers
// M rows of K values in blocks of 32: v = 128 h + l, h (M, K) in [-127, 127], l (M, K) in
// [-64, 63]; d (M, K / 32) the block's step (x = v d), s its sum of v (for the codes' offsets)
// and xs its exact fp32 sum of x (for Q4_1's and Q4_K's mins; empty where quantize_x15 is told
// no type reads it).
// quantize_x15's tile 0: row by row as written. tile 8 (what AVX-512 VNNI's kernel reads): the rows in
// in_row_chunks<8>'s chunks, each chunk of R rows block-major, (K / 32, R, 32) and (K / 32, R),
// so that a pass over 8 rows reads them through one pointer per array: 16 row pointers did not
// fit x86's 16 general registers beside the kernel's own, and g++ kept them on the stack.
struct XInt15 {
  std::vector<int8_t> h, l;
  std::vector<float> d, xs;
  std::vector<int32_t> s;
  int64_t K = 0;
  // where row m0 + r's block g starts in h and l, and its index in d, s and xs (m0: the first row
  // of a chunk of R), tiled or not (the kernels know which at compile time)
  template <bool TILED>
  int64_t at(int64_t m0, int R, int r, int64_t g) const {
    return TILED ? m0 * K + (g * R + r) * 32 : (m0 + r) * K + 32 * g;
  }
  template <bool TILED>
  int64_t block(int64_t m0, int R, int r, int64_t g) const {
    return TILED ? m0 * (K / 32) + g * R + r : (m0 + r) * (K / 32) + g;
  }
};

// Rows of x a group's pass takes at once (in_row_chunks<R16_MAX_ROWS>), and whether x is tiled
// for them (quantize_x15's tile). AVX-512 VNNI: 8, whose 16 integer sums (two a row) are the chains that
// keep both vpdpbusd ports busy (its latency is ~5 cycles: 8 chains ran 89% of their rate, 12 all
// of it) in 32 registers; AVX2's 16 registers hold 4 rows' sums.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr int R16_MAX_ROWS = 8;
#else
constexpr int R16_MAX_ROWS = 4;
#endif
constexpr bool R16_TILED = R16_MAX_ROWS == 8;

// The same x as AVX2's wide kernel reads it (quantize_x15_v): v itself, not its halves, and all
// three block-major, v (K / 32, M, 32), d and xs (K / 32, M), so that a block's M rows are one
// run of memory, not M rows K apart (a page each).
struct XInt15Blocks {
  std::vector<int16_t> v;
  std::vector<float> d, xs;
  int64_t K = 0;
};

constexpr float X15_MAX = 16319.f;  // 127 * 128 + 63: h = (v + 64) >> 7 stays within [-127, 127]

// One row of x, K values, block by block. l == nullptr: x as 8-bit integers in XInt15 (what `X8`
// kernels read): v = h = round(x 127 / max|x|), d = max|x| / 127: Q8_0's rounding of x (llama.cpp
// rounds half away from zero and keeps d in fp16; this rounds half to even, d in fp32),
// so that one integer product a weight does, half the vector work a row of 15-bit x takes, at
// llama.cpp's accuracy (on SmolLM2 against exact x: KL 0.012 and perplexity +0.24%, where 15 bits
// give < 1e-5 and +0.002%: docs/BENCHMARKS.md). s is the block's sum of v, xs its exact sum of x.
// Block g of the row goes to h and l at 32 g stride, its d, s and xs at g stride (quantize_x15's tile).
// with_sum false: xs is left alone (only Q4_1's and Q4_K's mins read it). Its 32 additions in order
// are a chain of dependent ones that no vector does, where everything else here is.
inline void quantize_x_row(const float* x, int64_t K, int8_t* h, int8_t* l, float* d, int32_t* s, float* xs,
                           int64_t stride = 1, bool with_sum = true) {
  const float top = l ? X15_MAX : 127.f;
  for (int64_t g = 0; g < K / 32; ++g) {
    const float* xb = x + 32 * g;
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    if (with_sum) {
      float sum = 0.f;
      for (int i = 0; i < 32; ++i) sum += xb[i];
      xs[g * stride] = sum;
    }
    const float inv = amax > 0.f ? top / amax : 0.f;
    int8_t *hb = h + 32 * g * stride, *lb = l ? l + 32 * g * stride : nullptr;
    int32_t vs = 0;
    if (l) {
#pragma omp simd reduction(+ : vs)
      for (int i = 0; i < 32; ++i) {
        const int v = static_cast<int>(std::nearbyint(xb[i] * inv));  // |v| <= top
        const int hi = (v + 64) >> 7;  // floor: l = v - 128 hi in [-64, 63]
        hb[i] = static_cast<int8_t>(hi);
        lb[i] = static_cast<int8_t>(v - 128 * hi);
        vs += v;
      }
    } else {
#pragma omp simd reduction(+ : vs)
      for (int i = 0; i < 32; ++i) {
        const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
        hb[i] = static_cast<int8_t>(v);
        vs += v;
      }
    }
    d[g * stride] = amax / top;
    s[g * stride] = vs;
  }
}

// x8: x as 8-bit integers (quantize_x_row) where the kernels take it so (`X8` below); l stays
// empty. tile: 0 or 8, the layout XInt15 describes. with_sum: quantize_x_row's.
inline void quantize_x15(const float* x, int64_t M, int64_t K, XInt15& out, bool x8 = false, int tile = 0,
                         bool with_sum = true) {
  const int64_t G = K / 32;
  out.K = K;
  out.h.resize(M * K);
  out.l.resize(x8 ? 0 : M * K);
  out.d.resize(M * G);
  out.s.resize(M * G);
  out.xs.resize(with_sum ? M * G : 0);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const auto [c0, R] = tile ? row_chunk_of<8>(M, m) : std::pair<int64_t, int>{m, 1};
      const int r = static_cast<int>(m - c0);
      const int64_t a = tile ? out.at<true>(c0, R, r, 0) : m * K, i = tile ? out.block<true>(c0, R, r, 0) : m * G;
      quantize_x_row(x + m * K, K, out.h.data() + a, x8 ? nullptr : out.l.data() + a, out.d.data() + i,
                     out.s.data() + i, with_sum ? out.xs.data() + i : nullptr, tile ? R : 1, with_sum);
    }
  });
}

// ---------------------------------------------------------------- the layout
enum R16Type : int { R16_Q4_0 = 0, R16_Q4_1, R16_Q8_0, R16_I8G, R16_Q4_K };

template <int T>
struct R16Format {
  static constexpr bool FOUR = T == R16_Q4_0 || T == R16_Q4_1 || T == R16_Q4_K;  // else 8-bit codes
  static constexpr bool MIN = T == R16_Q4_1 || T == R16_Q4_K;
  static constexpr bool F32_SCALE = T == R16_I8G;  // grouped int8's own fp32 scales
  // Q4_K: 6-bit scale and min codes, uint8, times the fp16 d and dmin of a header that SUPER
  // blocks share (HEADER bytes before them)
  static constexpr bool CODED_SCALE = T == R16_Q4_K;
  static constexpr int64_t SUPER = CODED_SCALE ? 8 : 1, HEADER = CODED_SCALE ? 64 : 0;
  static constexpr int64_t CODES = FOUR ? 256 : 512, SCALES = CODES;
  static constexpr int64_t MINS = SCALES + (F32_SCALE ? 64 : CODED_SCALE ? 16 : 32);
  static constexpr int64_t BYTES = MINS + (MIN ? (CODED_SCALE ? 16 : 32) : 0);
  static constexpr int64_t SUPER_BYTES = HEADER + SUPER * BYTES;
  // what the integer sum of a block adds per unit of x's sum of v: Q4_0's codes are q + 8, the
  // 8-bit ones w + 128
  static constexpr int32_t OFFSET = T == R16_Q4_0 ? 8 : FOUR ? 0 : 128;
};

// a group of 16 rows' bytes, G blocks (Q4_K: a multiple of 8)
template <int T>
constexpr int64_t r16_group_bytes(int64_t G) {
  return G / R16Format<T>::SUPER * R16Format<T>::SUPER_BYTES;
}

// block g of a group, and the header it shares (Q4_K; the block itself for the other types)
template <int T>
inline const uint8_t* r16_block(const uint8_t* grp, int64_t g) {
  using F = R16Format<T>;
  return grp + g / F::SUPER * F::SUPER_BYTES + F::HEADER + g % F::SUPER * F::BYTES;
}

template <int T>
inline const uint8_t* r16_header(const uint8_t* grp, int64_t g) {
  return grp + g / R16Format<T>::SUPER * R16Format<T>::SUPER_BYTES;
}

inline int64_t r16_bytes(int type, int64_t N, int64_t K) {
  const int64_t G = K / 32, group[] = {r16_group_bytes<0>(G), r16_group_bytes<1>(G), r16_group_bytes<2>(G),
                                       r16_group_bytes<3>(G), r16_group_bytes<4>(G)};
  return (N + 15) / 16 * group[type];
}

// src: N rows of the source's blocks: GGUF Q4_0 / Q4_1 / Q8_0 rows, or grouped int8's (N, K)
// codes with `scales` (N, K / 32) fp32. out: r16_bytes(T, N, K); padding rows are zeros (scale
// 0: their outputs are 0, whatever their codes).
// Q4_K (256 values a super-block: fp16 d, dmin; eight 6-bit scales and mins; codes with chunk j
// in the low (even j) or high nibbles of bytes 16 + 32 (j / 2) ...): chunk j's 32 codes and its
// value = d scale_j q - dmin min_j, as gguf_gemv.h's Q4_K reads them: its 6-bit scale and min
inline void q4_k_chunk(const uint8_t* b, int j, uint8_t* codes, uint8_t* sc, uint8_t* mn) {
  const uint8_t* s = b + 4;
  *sc = static_cast<uint8_t>(j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 2) & 0x30));
  *mn = static_cast<uint8_t>(j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30));
  const uint8_t* p = b + 16 + 32 * (j / 2);
  for (int i = 0; i < 32; ++i) codes[i] = (p[i] >> (4 * (j & 1))) & 15;
}

template <int T>
void repack_r16_as(const uint8_t* src, const float* scales, int64_t N, int64_t K, uint8_t* out) {
  using F = R16Format<T>;
  const int64_t G = K / 32;
  const int64_t src_bytes = T == R16_Q4_0 ? 18 : T == R16_Q4_1 ? 20 : T == R16_Q8_0 ? 34 : 32;
  const int64_t hdr = T == R16_Q4_0 ? 2 : T == R16_Q4_1 ? 4 : T == R16_Q8_0 ? 2 : 0;
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint8_t* grp = out + t * r16_group_bytes<T>(G);
      std::memset(grp, 0, r16_group_bytes<T>(G));  // padding rows: scale 0
      for (int64_t g = 0; g < G; ++g) {
        uint8_t* o = const_cast<uint8_t*>(r16_block<T>(grp, g));
        uint8_t* head = const_cast<uint8_t*>(r16_header<T>(grp, g));
        for (int r = 0; r < 16; ++r) {
          const int64_t n = 16 * t + r;
          if (n >= N) break;
          if (T == R16_Q4_K) {
            const uint8_t* b = src + (n * (K / 256) + g / 8) * 144;
            uint8_t c[32];
            q4_k_chunk(b, static_cast<int>(g % 8), c, o + F::SCALES + r, o + F::MINS + r);
            for (int L = 0; L < 4; ++L) {
              for (int j = 0; j < 4; ++j) o[64 * L + 4 * r + j] = static_cast<uint8_t>(c[8 * L + j] | (c[8 * L + 4 + j] << 4));
            }
            std::memcpy(head + 2 * r, b, 2);           // d
            std::memcpy(head + 32 + 2 * r, b + 2, 2);  // dmin
            continue;
          }
          const uint8_t* b = src + (n * G + g) * src_bytes;
          const uint8_t* qs = b + hdr;
          if (F::FOUR) {
            auto code = [&](int k) { return k < 16 ? qs[k] & 15 : qs[k - 16] >> 4; };
            for (int L = 0; L < 4; ++L) {
              for (int j = 0; j < 4; ++j)
                o[64 * L + 4 * r + j] = static_cast<uint8_t>(code(8 * L + j) | (code(8 * L + 4 + j) << 4));
            }
          } else {
            for (int L = 0; L < 8; ++L) {
              for (int j = 0; j < 4; ++j) o[64 * L + 4 * r + j] = static_cast<uint8_t>(qs[4 * L + j] ^ 0x80);
            }
          }
          if (F::F32_SCALE) {
            std::memcpy(o + F::SCALES + 4 * r, scales + n * G + g, 4);
          } else {
            std::memcpy(o + F::SCALES + 2 * r, b, 2);  // d
          }
          if (F::MIN) std::memcpy(o + F::MINS + 2 * r, b + 2, 2);  // m
        }
      }
    }
  });
}

// A decode step streams every weight from DRAM once; the blocks PREFETCH_AHEAD further on (each
// of their cache lines: a block is 5 to 9 lines) are asked for while this one is multiplied,
// past the group's end too (a prefetch past the weights is harmless). One line a block, or
// none, left the kernel waiting on memory: 7.5 GB/s from DRAM against 30 from cache.
constexpr int64_t PREFETCH_AHEAD = 16;

// From how many rows of x AVX2 builds run 4-bit blocks through r16_gemm_avx2_wide (see there).
inline int64_t& r16_wide_rows() {
  static int64_t rows = 16;
  return rows;
}

inline void prefetch_block(const uint8_t* b, int64_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(b + i);
#else
  (void)b, (void)bytes;
#endif
}

// 4 int8 values of x in every 32-bit lane, straight from memory (vbroadcastss m32: a load, not a
// shuffle on the one port that runs them)
#if defined(__AVX2__)
inline __m256i bcast4_256(const int8_t* p) {
  return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(p)));
}
#endif
#if defined(__AVX512F__)
inline __m512i bcast4_512(const int8_t* p) {
  return _mm512_castps_si512(_mm512_broadcastss_ps(_mm_load_ss(reinterpret_cast<const float*>(p))));
}
#endif

// a row's scale (at F::SCALES) or min (at F::MINS) as fp32: fp32 or fp16 as the type stores
// them, or (Q4_K) the code times the header's d, the min's times -dmin, as q4_k_chunk says
template <int T>
inline float r16_param(const uint8_t* b, const uint8_t* head, int64_t at, int n) {
  using F = R16Format<T>;
  if (F::CODED_SCALE) {
    const float v = gguf_f16(head + (at == F::SCALES ? 0 : 32) + 2 * n) * static_cast<float>(b[at + n]);
    return at == F::SCALES ? v : -v;
  }
  if (F::F32_SCALE) {
    float v;
    std::memcpy(&v, b + at + 4 * n, 4);
    return v;
  }
  return gguf_f16(b + at + 2 * n);
}

// ---------------------------------------------------------------- one group of 16 rows
// out[r][0..15] = the group's 16 rows times activation rows m0 .. m0 + R - 1 of x.
// Per block and row of x: the integer dot product of each weight row's 32 codes with x's 32
// 15-bit values, as 128 (codes . h) + (codes . l) (the codes' offset taken off through x's sum of
// v), then acc += isum * (d * dx),
// and for Q4_1 acc += m * sum(x). The same operations in the same order for every row of x,
// whatever R: a row's values never depend on the rows beside it (batch invariance).
// X8: x as 8-bit integers (quantize_x_row): the products with l are skipped.
template <int T, int R, bool X8>
inline void r16_group_portable(const uint8_t* grp, int64_t G, const XInt15& x, int64_t m0, float (*out)[16]) {
  using F = R16Format<T>;
  const int64_t K = x.K;
  float acc[R][16] = {};
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t *b = r16_block<T>(grp, g), *head = r16_header<T>(grp, g);
    for (int r = 0; r < R; ++r) {
      const int8_t* xh = x.h.data() + (m0 + r) * K + 32 * g;
      const int8_t* xl = X8 ? nullptr : x.l.data() + (m0 + r) * K + 32 * g;
      const int64_t gi = (m0 + r) * G + g;
      const float dx = x.d[gi];
      for (int n = 0; n < 16; ++n) {
        int32_t sh = 0, sl = 0;
        if (F::FOUR) {
          for (int L = 0; L < 4; ++L) {
            for (int j = 0; j < 4; ++j) {
              const uint8_t byte = b[64 * L + 4 * n + j];
              const int lo = byte & 15, hi = byte >> 4, k0 = 8 * L + j, k1 = 8 * L + 4 + j;
              sh += lo * xh[k0] + hi * xh[k1];
              if (!X8) sl += lo * xl[k0] + hi * xl[k1];
            }
          }
        } else {
          for (int L = 0; L < 8; ++L) {
            for (int j = 0; j < 4; ++j) {
              const int c = b[64 * L + 4 * n + j];
              sh += c * xh[4 * L + j];
              if (!X8) sl += c * xl[4 * L + j];
            }
          }
        }
        const int32_t isum = (X8 ? sh : 128 * sh + sl) - F::OFFSET * x.s[gi];
        acc[r][n] += static_cast<float>(isum) * (r16_param<T>(b, head, F::SCALES, n) * dx);
        if (F::MIN) acc[r][n] += r16_param<T>(b, head, F::MINS, n) * x.xs[gi];
      }
    }
  }
  for (int r = 0; r < R; ++r) std::copy_n(acc[r], 16, out[r]);
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// acc += v in acc's own register (int16 or int32 lanes). Written as _mm256_add_epi16/32, g++ 12
// adds into the product's register and copies the sum back every round, and with 4 rows of x
// spills sums to the stack: a vmovdqa or a store per multiply that the front end must issue
// (measured on the wide kernel: ~75 instructions per 256 multiply-adds instead of ~40).
inline void add_into(__m256i& acc, __m256i v) {
#if defined(__GNUC__) && !defined(__clang__)
  __asm__("vpaddd %1, %0, %0" : "+x"(acc) : "x"(v));
#else
  acc = _mm256_add_epi32(acc, v);
#endif
}

inline void add_into16(__m256i& acc, __m256i v) {
#if defined(__GNUC__) && !defined(__clang__)
  __asm__("vpaddw %1, %0, %0" : "+x"(acc) : "x"(v));
#else
  acc = _mm256_add_epi16(acc, v);
#endif
}

// 8 rows' scales (at F::SCALES) or mins (at F::MINS), half 0: rows 0-7, 1: rows 8-15, as fp32
// (r16_param's vector twin)
template <int T>
inline __m256 r16_params_avx2(const uint8_t* b, const uint8_t* head, int64_t at, int half) {
  using F = R16Format<T>;
  if (F::CODED_SCALE) {
    const __m256 d = _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(head + (at == F::SCALES ? 0 : 32) + 16 * half)));
    const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + at + 8 * half))));
    const __m256 v = _mm256_mul_ps(d, c);
    return at == F::SCALES ? v : _mm256_xor_ps(v, _mm256_set1_ps(-0.f));
  }
  if (F::F32_SCALE) return _mm256_loadu_ps(reinterpret_cast<const float*>(b + at) + 8 * half);
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + at + 16 * half)));
}

// 16 rows as two halves of 8 (bytes 32h .. 32h + 31 of each run), so that a half's integer sums
// for 4 rows of x fit AVX2's 16 registers (the fp32 ones stay in `out`). Both halves of a block
// before the next block: with every block's first half first and the second halves in a pass of
// their own from cache, the pass over DRAM stalled for half the time, and a Zen 3 decoded the 1.2B
// at 28 tok/s instead of 35 (docs/BENCHMARKS.md).
// 4-bit: vpmaddubsw's int16 pair sums are added in int16 over a block (8 of them: at most
// 30720), then widened once. 8-bit: |w| times x with w's sign (vpsignb; x's halves are never
// -128), each widened at once (a pair reaches 32512).
template <int T, int R, bool X8>
inline void r16_group_avx2(const uint8_t* grp, int64_t G, const XInt15& x, int64_t m0, float (*out)[16]) {
  using F = R16Format<T>;
  const int64_t K = x.K;
  const __m256i mask = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(-128);
  for (int r = 0; r < R; ++r) std::fill_n(out[r], 16, 0.f);
  alignas(32) float dm[32];  // Q4_K: the block's 16 scales, then 16 mins, decoded
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t *b = r16_block<T>(grp, g), *head = r16_header<T>(grp, g);
    prefetch_block(b + PREFETCH_AHEAD * F::BYTES, F::BYTES + F::HEADER);
    if (F::CODED_SCALE) {
      for (int half = 0; half < 2; ++half) {
        _mm256_store_ps(dm + 8 * half, r16_params_avx2<T>(b, head, F::SCALES, half));
        _mm256_store_ps(dm + 16 + 8 * half, r16_params_avx2<T>(b, head, F::MINS, half));
      }
    }
    for (int half = 0; half < 2; ++half) {
      __m256i sh[R], sl[R];  // int32 sums of the codes times h and times l
      if (F::FOUR) {
        __m256i h16[R], l16[R];
        for (int r = 0; r < R; ++r) h16[r] = l16[r] = _mm256_setzero_si256();
        for (int L = 0; L < 4; ++L) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * L + 32 * half));
          const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
          for (int r = 0; r < R; ++r) {
            const int64_t at = (m0 + r) * K + 32 * g + 8 * L;
            const int8_t* xh = x.h.data() + at;
            add_into16(h16[r], _mm256_maddubs_epi16(lo, bcast4_256(xh)));
            add_into16(h16[r], _mm256_maddubs_epi16(hi, bcast4_256(xh + 4)));
            if (X8) continue;
            const int8_t* xl = x.l.data() + at;
            add_into16(l16[r], _mm256_maddubs_epi16(lo, bcast4_256(xl)));
            add_into16(l16[r], _mm256_maddubs_epi16(hi, bcast4_256(xl + 4)));
          }
        }
        for (int r = 0; r < R; ++r) {
          sh[r] = _mm256_madd_epi16(h16[r], ones);
          sl[r] = X8 ? _mm256_setzero_si256() : _mm256_madd_epi16(l16[r], ones);
        }
      } else {
        for (int r = 0; r < R; ++r) sh[r] = sl[r] = _mm256_setzero_si256();
        for (int L = 0; L < 8; ++L) {
          const __m256i w = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * L + 32 * half)), flip);  // signed codes
          const __m256i aw = _mm256_abs_epi8(w);
          for (int r = 0; r < R; ++r) {
            const int64_t at = (m0 + r) * K + 32 * g + 4 * L;
            const __m256i ph = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast4_256(x.h.data() + at), w));
            add_into(sh[r], _mm256_madd_epi16(ph, ones));
            if (X8) continue;
            const __m256i pl = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast4_256(x.l.data() + at), w));
            add_into(sl[r], _mm256_madd_epi16(pl, ones));
          }
        }
      }
      // Q4_K's decoded before the block's integer sums (dm): decoded here, beside 4 rows' sums,
      // they cost a 4-row call 1.5x its time on a Zen 4's AVX2 path
      const __m256 d = F::CODED_SCALE ? _mm256_load_ps(dm + 8 * half) : r16_params_avx2<T>(b, head, F::SCALES, half);
      __m256 m = _mm256_setzero_ps();
      if (F::MIN) m = F::CODED_SCALE ? _mm256_load_ps(dm + 16 + 8 * half) : r16_params_avx2<T>(b, head, F::MINS, half);
      for (int r = 0; r < R; ++r) {
        const int64_t gi = (m0 + r) * G + g;
        // 8-bit codes here are signed already: no offset
        const int32_t offset = F::FOUR ? -F::OFFSET * x.s[gi] : 0;
        const __m256i hl = X8 ? sh[r] : _mm256_add_epi32(_mm256_slli_epi32(sh[r], 7), sl[r]);
        const __m256i isum = _mm256_add_epi32(hl, _mm256_set1_epi32(offset));
        // the fp32 sums live in `out` (L1): registers hold the integer sums of 4 rows of x
        float* o = out[r] + 8 * half;
        __m256 acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(x.d[gi])),
                                     _mm256_loadu_ps(o));
        if (F::MIN) acc = _mm256_fmadd_ps(m, _mm256_set1_ps(x.xs[gi]), acc);
        _mm256_storeu_ps(o, acc);
      }
    }
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512BW__)
// 4-bit blocks times many rows of x (a prefill chunk), AVX2 without AVX-512. vpmaddubsw needs two
// products a weight for 15-bit x (h and l) and an add for each; here a group's block is widened
// once to int16 codes (16 rows x 32 k, 1 KiB in L1) and every row of x meets it as v itself in
// vpmaddwd, 16 multiply-adds an instruction plus one add, no halves to join: ~37 vector uops per
// 256 multiply-adds against ~46. The widening costs ~110 uops a block, paid once for all M rows,
// so below r16_wide_rows() rows (16; set_r16_wide_rows changes it, for benchmarks and tests) the
// narrow kernel stays.
// Exact integer sums (|codes . v| <= 32 * 15 * 16319 < 2^31) and the narrow kernel's fp32 steps
// in the same order: a row's outputs are bit-identical to r16_group_avx2's (batch invariance
// across the two).

// x as AVX2's wide kernel takes it (XInt15Blocks; xs only for types with mins). The same v and d
// as quantize_x_row (x * inv rounded by the current mode, round-half-even, as nearbyint; max|x|
// exact in any order), and xs summed in its order; the sum is skipped without mins: a serial
// chain of 32 adds a block was most of the cost (~0.6 ns a value, 1.6% of a 1.2B prefill)
inline void quantize_x15_v(const float* x, int64_t M, int64_t K, XInt15Blocks& out, bool with_sum) {
  const int64_t G = K / 32;
  out.K = K;
  out.v.resize(M * K);
  out.d.resize(M * G);
  out.xs.resize(M * G);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t g = 0; g < G; ++g) {
        const float* xb = x + m * K + 32 * g;
        __m256 a[4];
        for (int i = 0; i < 4; ++i) a[i] = _mm256_loadu_ps(xb + 8 * i);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a[0]), _mm256_andnot_ps(sign, a[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, a[2]), _mm256_andnot_ps(sign, a[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? X15_MAX / amax : 0.f);
        __m256i v[4];
        for (int i = 0; i < 4; ++i) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(a[i], inv));
        // packs interleaves 128-bit lanes: 0 2 1 3 back in order
        int16_t* o = out.v.data() + (g * M + m) * 32;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(v[0], v[1]), 0xD8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(v[2], v[3]), 0xD8));
        out.d[g * M + m] = amax / X15_MAX;
        if (with_sum) {
          float sum = 0.f;
          for (int i = 0; i < 32; ++i) sum += xb[i];
          out.xs[g * M + m] = sum;
        }
      }
    }
  });
}

// codes of one block (16 rows) as int16 pairs: w[kp][half] lane i = row 8 half + i's codes of
// k = 2 kp and 2 kp + 1 (vpmaddwd's pair), less the type's OFFSET (Q4_0's 8): signed codes give
// the same exact integer sum as the narrow kernel's codes . v - OFFSET s, but leave each row of x
// no offset to broadcast and add per block (3 of ~75 vector uops a row and block)
template <int T>
inline void widen_block_avx2(const uint8_t* b, __m256i (*w)[2]) {
  const __m256i mask = _mm256_set1_epi8(15), offset = _mm256_set1_epi16(R16Format<T>::OFFSET);
  // per dword (a row's 4 bytes): bytes 0, 1 (pairs A) or 2, 3 (pairs B) zero-extended to int16
  const __m256i pa = _mm256_setr_epi8(0, -128, 1, -128, 4, -128, 5, -128, 8, -128, 9, -128, 12, -128, 13, -128,
                                      0, -128, 1, -128, 4, -128, 5, -128, 8, -128, 9, -128, 12, -128, 13, -128);
  const __m256i pb = _mm256_add_epi8(pa, _mm256_setr_epi8(2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0,
                                                          2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0));
  for (int L = 0; L < 4; ++L) {
    for (int half = 0; half < 2; ++half) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * L + 32 * half));
      const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
      w[4 * L + 0][half] = _mm256_sub_epi16(_mm256_shuffle_epi8(lo, pa), offset);  // k = 8L, 8L + 1
      w[4 * L + 1][half] = _mm256_sub_epi16(_mm256_shuffle_epi8(lo, pb), offset);  // 8L + 2, 8L + 3
      w[4 * L + 2][half] = _mm256_sub_epi16(_mm256_shuffle_epi8(hi, pa), offset);  // 8L + 4, 8L + 5
      w[4 * L + 3][half] = _mm256_sub_epi16(_mm256_shuffle_epi8(hi, pb), offset);  // 8L + 6, 8L + 7
    }
  }
}

// rows m0 .. m0 + R - 1 of x times block g (widened in w; its 16 scales and mins in fp32 in dm):
// acc[r] (16 fp32 sums) updated as the narrow kernel does
// (xv, xd, xs: block g's M rows of v, d and xs)
template <int T, int R>
inline void wide_rows_avx2(const __m256i (*w)[2], const float* dm, const float* xd, const float* xs,
                           const int16_t* xv, int64_t m0, float* acc) {
  using F = R16Format<T>;
  static_assert(R == 1 || R == 2 || R == 4, "in_row_chunks gives 4, 2 or 1 rows");
  // read the scales from memory after the products, as vmulps operands: g++ 12 otherwise keeps
  // them in two registers across the whole block, and with 4 rows' 8 sums one sum goes to the
  // stack, a load and a store every 16 multiply-adds
  __asm__("" : "+r"(dm));
  // the 8 sums as named variables, not an array: whether g++ 12 keeps an array of them in
  // registers depends on what else the caller inlines (a faster x rounding beside it sent all 8 to
  // the stack, half the speed)
  const __m256i z = _mm256_setzero_si256();
  __m256i a0 = z, b0 = z, a1 = z, b1 = z, a2 = z, b2 = z, a3 = z, b3 = z;
  for (int kp = 0; kp < 16; ++kp) {
    const __m256i w0 = _mm256_load_si256(&w[kp][0]), w1 = _mm256_load_si256(&w[kp][1]);
    auto row = [&](int r, __m256i& a, __m256i& b) {
      // v's pair (2 kp, 2 kp + 1) in every lane: vbroadcastss from memory is a load, where
      // vpbroadcastd from a register takes the shuffle port the adds need
      const __m256i xb = bcast4_256(reinterpret_cast<const int8_t*>(xv + (m0 + r) * 32 + 2 * kp));
      add_into(a, _mm256_madd_epi16(w0, xb));
      add_into(b, _mm256_madd_epi16(w1, xb));
    };
    row(0, a0, b0);
    if (R > 1) row(1, a1, b1);
    if (R > 2) row(2, a2, b2), row(3, a3, b3);
  }
  auto scale = [&](int r, __m256i sa, __m256i sb) {
    const __m256 dx = _mm256_set1_ps(xd[m0 + r]);
    const __m256i sums[2] = {sa, sb};
    for (int half = 0; half < 2; ++half) {
      float* o = acc + (m0 + r) * 16 + 8 * half;
      __m256 a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[half]), _mm256_mul_ps(_mm256_load_ps(dm + 8 * half), dx),
                                 _mm256_loadu_ps(o));
      if (F::MIN) a = _mm256_fmadd_ps(_mm256_load_ps(dm + 16 + 8 * half), _mm256_set1_ps(xs[m0 + r]), a);
      _mm256_storeu_ps(o, a);
    }
  };
  scale(0, a0, b0);
  if (R > 1) scale(1, a1, b1);
  if (R > 2) scale(2, a2, b2), scale(3, a3, b3);
}

// y (M, N) = x W^T for 4-bit r16 blocks, M >= r16_wide_rows(): threads take groups of 16 rows; per
// group, each block is widened once and every row of x goes through it; the M x 16 fp32 sums
// stay in a per-thread buffer (L1/L2) until the group ends.
template <int T>
void r16_gemm_avx2_wide(const uint8_t* packed, int64_t N, int64_t G, const XInt15Blocks& xi, int64_t M, float* y) {
  using F = R16Format<T>;
  const int64_t groups = (N + 15) / 16;
  at::parallel_for(0, groups, 1, [&](int64_t t0, int64_t t1) {
    alignas(32) __m256i w[16][2];
    alignas(32) float dm[32];  // the block's 16 scales, then 16 mins, in fp32
    std::vector<float> acc(M * 16);
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* grp = packed + t * r16_group_bytes<T>(G);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t *b = r16_block<T>(grp, g), *head = r16_header<T>(grp, g);
        prefetch_block(b + PREFETCH_AHEAD * F::BYTES, F::BYTES + F::HEADER);
        widen_block_avx2<T>(b, w);
        for (int half = 0; half < 2; ++half) {
          _mm256_store_ps(dm + 8 * half, r16_params_avx2<T>(b, head, F::SCALES, half));
          if (F::MIN) _mm256_store_ps(dm + 16 + 8 * half, r16_params_avx2<T>(b, head, F::MINS, half));
        }
        const int16_t* xv = xi.v.data() + g * M * 32;
        const float *xd = xi.d.data() + g * M, *xs = xi.xs.data() + g * M;
        in_row_chunks(M, [&](auto rows, int64_t m) {
          wide_rows_avx2<T, decltype(rows)::value>(w, dm, xd, xs, xv, m, acc.data());
        });
      }
      const int64_t n0 = 16 * t, nn = std::min<int64_t>(16, N - n0);
      for (int64_t m = 0; m < M; ++m) std::copy_n(acc.data() + m * 16, nn, y + m * N + n0);
    }
  });
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
// u8 codes (16 rows x 4 k a lane) times 4 int8 values of x broadcast, summed into int32 lanes.
// Without VNNI only for 4-bit codes (vpmaddubsw's int16 pairs hold 15 * 128 * 2).
inline __m512i dot_u8_i8(__m512i acc, __m512i codes, const int8_t* x4) {
#if defined(__AVX512VNNI__) && defined(__GNUC__)
  // x's 4 bytes as the instruction's own broadcast operand (m32bcst): g++ 12 loads them into a
  // register with a vbroadcastss of their own, one more uop per 64 multiply-adds
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(codes), "m"(*reinterpret_cast<const int32_t*>(x4)));
  return acc;
#elif defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, codes, bcast4_512(x4));
#else
  const __m512i pairs = _mm512_maddubs_epi16(codes, bcast4_512(x4));
  return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
#endif
}

template <int T, int R, bool X8>
inline void r16_group_avx512(const uint8_t* grp, int64_t G, const XInt15& x, int64_t m0, float (*out)[16]) {
  using F = R16Format<T>;
  const int64_t K = x.K;
  const __m512i mask = _mm512_set1_epi8(15);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t *b = r16_block<T>(grp, g), *head = r16_header<T>(grp, g);
    prefetch_block(b + PREFETCH_AHEAD * F::BYTES, F::BYTES + F::HEADER);
    __m512i sh[R], sl[R];  // the codes times h and times l: two chains a row
    for (int r = 0; r < R; ++r) sh[r] = sl[r] = _mm512_setzero_si512();
    // the block's first row in h and l, the others a constant stride on (32 bytes tiled): unrolled,
    // g++ reaches every row through these two pointers instead of an induction variable a row
    const int64_t at0 = x.at<R16_TILED>(m0, R, 0, g), stride = R16_TILED ? 32 : K;
    const int8_t *xh = x.h.data() + at0, *xl = X8 ? xh : x.l.data() + at0;
    if (F::FOUR) {
#pragma GCC unroll 4
      for (int L = 0; L < 4; ++L) {
        const __m512i v = _mm512_loadu_si512(b + 64 * L);
        const __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const int64_t at = stride * r + 8 * L;
          sh[r] = dot_u8_i8(dot_u8_i8(sh[r], lo, xh + at), hi, xh + at + 4);
          if (!X8) sl[r] = dot_u8_i8(dot_u8_i8(sl[r], lo, xl + at), hi, xl + at + 4);
        }
      }
    } else {
#pragma GCC unroll 8
      for (int L = 0; L < 8; ++L) {
        const __m512i v = _mm512_loadu_si512(b + 64 * L);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const int64_t at = stride * r + 4 * L;
          sh[r] = dot_u8_i8(sh[r], v, xh + at);
          if (!X8) sl[r] = dot_u8_i8(sl[r], v, xl + at);
        }
      }
    }
    __m512 d, m = _mm512_setzero_ps();
    if (F::CODED_SCALE) {  // r16_param: the codes times the header's d and -dmin
      auto coded = [&](int64_t at, int64_t h) {
        return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(head + h))),
                             _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + at)))));
      };
      d = coded(F::SCALES, 0);
      m = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(coded(F::MINS, 32)), _mm512_set1_epi32(INT32_MIN)));
    } else if (F::F32_SCALE) {
      d = _mm512_loadu_ps(b + F::SCALES);
    } else {
      d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + F::SCALES)));
    }
    if (F::MIN && !F::CODED_SCALE) {
      m = F::F32_SCALE ? _mm512_loadu_ps(b + F::MINS)
                       : _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + F::MINS)));
    }
    for (int r = 0; r < R; ++r) {
      const int64_t gi = x.block<R16_TILED>(m0, R, r, g);
      const __m512i hl = X8 ? sh[r] : _mm512_add_epi32(_mm512_slli_epi32(sh[r], 7), sl[r]);
      const __m512i isum = _mm512_add_epi32(hl, _mm512_set1_epi32(-F::OFFSET * x.s[gi]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, _mm512_set1_ps(x.d[gi])), acc[r]);
      if (F::MIN) acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.xs[gi]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[r], acc[r]);
}
#endif

template <int T, int R, bool X8>
inline void r16_group(const uint8_t* grp, int64_t G, const XInt15& x, int64_t m0, float (*out)[16], bool portable) {
  if (!portable) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    return r16_group_avx512<T, R, X8>(grp, G, x, m0, out);
#elif defined(__AVX512F__) && defined(__AVX512BW__)
    if (R16Format<T>::FOUR) return r16_group_avx512<T, R, X8>(grp, G, x, m0, out);
    return r16_group_avx2<T, R, X8>(grp, G, x, m0, out);
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    return r16_group_avx2<T, R, X8>(grp, G, x, m0, out);
#endif
  }
  r16_group_portable<T, R, X8>(grp, G, x, m0, out);
}

// ---------------------------------------------------------------- the GEMM

// y (M, N) = x (M, K) W^T for W in the r16 layout (packed: its bytes; N its true rows). Threads
// take groups of 16 rows; each group's blocks (K / 32 * 288 to 576 bytes) stay in cache while
// every row of x, R16_MAX_ROWS at a time (8 on AVX-512 VNNI, else 4), goes through them: one pass
// over the weights for any M.
// x8: x rounded to 8 bits (quantize_x_row) and one product a weight, for every M (the wide
// kernel keeps 15 bits, so it is not taken).
template <int T>
void r16_gemm_as(const uint8_t* packed, int64_t N, int64_t K, const float* x, int64_t M, float* y, bool portable,
                 bool x8) {
  const int64_t G = K / 32, groups = (N + 15) / 16, bb = r16_group_bytes<T>(G);
  // kept between calls, so a decode step's small layers pay no allocation; named through a local
  // reference, which the threads' lambda captures (a thread_local it named itself would be each
  // worker's own, empty one)
  static thread_local XInt15 buffer;
  XInt15& xi = buffer;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512BW__)
  if (R16Format<T>::FOUR && !portable && !x8 && M >= r16_wide_rows()) {
    static thread_local XInt15Blocks blocks;
    XInt15Blocks& xb = blocks;
    quantize_x15_v(x, M, K, xb, R16Format<T>::MIN);
    return r16_gemm_avx2_wide<T>(packed, N, G, xb, M, y);
  }
#endif
  quantize_x15(x, M, K, xi, x8, R16_TILED && !portable ? 8 : 0, R16Format<T>::MIN);
  // below ~16 KiB of weights a thread, waking the other costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (16 << 10) / (bb * std::max<int64_t>(1, M)));
  at::parallel_for(0, groups, grain, [&](int64_t t0, int64_t t1) {
    float out[R16_MAX_ROWS][16];
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* grp = packed + t * bb;
      const int64_t n0 = 16 * t, nn = std::min<int64_t>(16, N - n0);
      in_row_chunks<R16_MAX_ROWS>(M, [&](auto rows, int64_t m) {
        constexpr int R = decltype(rows)::value;
        if (x8) {
          r16_group<T, R, true>(grp, G, xi, m, out, portable);
        } else {
          r16_group<T, R, false>(grp, G, xi, m, out, portable);
        }
        for (int r = 0; r < R; ++r) std::copy_n(out[r], nn, y + (m + r) * N + n0);
      });
    }
  });
}

inline void r16_gemm(int type, const uint8_t* packed, int64_t N, int64_t K, const float* x, int64_t M, float* y,
                     bool portable = false, bool x8 = false) {
  switch (type) {
    case R16_Q4_0: return r16_gemm_as<R16_Q4_0>(packed, N, K, x, M, y, portable, x8);
    case R16_Q4_1: return r16_gemm_as<R16_Q4_1>(packed, N, K, x, M, y, portable, x8);
    case R16_Q8_0: return r16_gemm_as<R16_Q8_0>(packed, N, K, x, M, y, portable, x8);
    case R16_Q4_K: return r16_gemm_as<R16_Q4_K>(packed, N, K, x, M, y, portable, x8);
    default: return r16_gemm_as<R16_I8G>(packed, N, K, x, M, y, portable, x8);
  }
}

inline void repack_r16(int type, const uint8_t* src, const float* scales, int64_t N, int64_t K, uint8_t* out) {
  switch (type) {
    case R16_Q4_0: return repack_r16_as<R16_Q4_0>(src, scales, N, K, out);
    case R16_Q4_1: return repack_r16_as<R16_Q4_1>(src, scales, N, K, out);
    case R16_Q8_0: return repack_r16_as<R16_Q8_0>(src, scales, N, K, out);
    case R16_Q4_K: return repack_r16_as<R16_Q4_K>(src, scales, N, K, out);
    default: return repack_r16_as<R16_I8G>(src, scales, N, K, out);
  }
}

// The r16 type of a scheme name ("q4_0", "q4_1", "q8_0", "int8_group", "q4_k"), -1 for others.
inline int r16_type(const std::string& scheme) {
  const char* names[] = {"q4_0", "q4_1", "q8_0", "int8_group", "q4_k"};
  for (int i = 0; i < 5; ++i) {
    if (scheme == names[i]) return i;
  }
  return -1;
}
