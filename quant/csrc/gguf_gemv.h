// GEMV over a GGUF file's own blocks (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K), fp32 activations.
//
// Included by decode_cpu.cpp inside its anonymous namespace, after its vector types (Avx512 or
// Avx2 as Vec, LLAMADESK_VEC); it includes nothing itself. quant/ggml.py documents the layouts.
//
// y[r, n] = sum_k W[n, k] x[r, k] for B activation rows x (B, K): each 32-value chunk of
// a weight row is decoded once into fp32 code vectors and multiplied into all B rows (up to 4 a
// pass), so B tokens cost one pass over the weights; codes times x are summed over each run of
// values sharing a scale, then scaled once, and a chunk's min enters through its sum of x.
// llama.cpp instead rounds x to Q8 and takes integer dot products; fp32 x keeps the exact
// dequantized values (quant.ggml), up to summation order.
//
// One kernel, three vector types: AVX-512 (16 floats), AVX2 (8), and Portable, plain C++ arrays
// of 8 floats that the compiler maps to whatever the target has (SSE2, NEON). Vector builds also
// carry the Portable one, which the tests run next to the vector one.

// ---------------------------------------------------------------- plain C++ vectors
struct Portable {
  struct V {
    float v[8];
  };
  static constexpr int W = 8;
  static V zero() { return set1(0.f); }
  static V set1(float x) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = x;
    return r;
  }
  static V add(V a, V b) {
    for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
  }
  static V mul(V a, V b) {
    for (int i = 0; i < W; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static V fma(V a, V b, V c) {
    for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static V load(const float* p) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = p[i];
    return r;
  }
  static void store(float* p, V a) {
    for (int i = 0; i < W; ++i) p[i] = a.v[i];
  }
  static float sum(V a) {
    float s = 0.f;
    for (int i = 0; i < W; ++i) s += a.v[i];
    return s;
  }
};

// Codes as fp32 vectors, W values at a time: (byte >> shift) & mask of W bytes; int8 bytes;
// bits from..from+W-1 of a 32-bit word (Q5_0's fifth bits).
template <class S>
struct Codes;

// Values 0-15 of a 32-value chunk from the low nibbles of 16 bytes, 16-31 from the high ones,
// minus `offset` (Q4_0's 8): through field(), for the vector types without a faster way.
template <class S>
inline void nibbles_by_field(const uint8_t* p, float offset, typename S::V* q) {
  for (int i = 0; i < 32 / S::W; ++i) {
    const int j = S::W * i;
    q[i] = S::add(Codes<S>::field(p + j % 16, j < 16 ? 0 : 4, 15), S::set1(-offset));
  }
}

template <>
struct Codes<Portable> {
  using V = Portable::V;
  static V field(const uint8_t* p, int shift, int mask) {
    V r;
    for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>((p[i] >> shift) & mask);
    return r;
  }
  static V int8(const uint8_t* p) {
    V r;
    for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(static_cast<int8_t>(p[i]));
    return r;
  }
  static V bits(uint32_t word, int from) {
    V r;
    for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>((word >> (from + i)) & 1u);
    return r;
  }
  static void nibbles(const uint8_t* p, float offset, V* q) { nibbles_by_field<Portable>(p, offset, q); }
};

#if defined(__AVX512F__)
template <>
struct Codes<Avx512> {
  using V = __m512;
  static __m512i widen(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // 0..15 minus offset, as fp32: vpermps reads only the low 4 bits of each index, so a table
  // permute turns a nibble into its value without a mask or a conversion
  static V nibble_table(float offset) {
    return _mm512_sub_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(offset));
  }
  static V field(const uint8_t* p, int shift, int mask) {
    const __m512i v = _mm512_srl_epi32(widen(p), _mm_cvtsi32_si128(shift));
    if (mask == 15) return _mm512_permutexvar_ps(v, nibble_table(0.f));
    return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(mask)));
  }
  static void nibbles(const uint8_t* p, float offset, V* q) {  // one load for both halves
    const __m512i v = widen(p);
    const V table = nibble_table(offset);
    q[0] = _mm512_permutexvar_ps(v, table);
    q[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
  }
  static V int8(const uint8_t* p) { return Avx512::load(reinterpret_cast<const int8_t*>(p)); }
  static V bits(uint32_t word, int from) {
    const __m512i at = _mm512_add_epi32(_mm512_set1_epi32(from),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i v = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), at);
    return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(1)));
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
template <>
struct Codes<Avx2> {
  using V = __m256;
  static __m256i widen(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static V field(const uint8_t* p, int shift, int mask) {
    const __m256i v = _mm256_srl_epi32(widen(p), _mm_cvtsi32_si128(shift));
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(mask)));
  }
  static V int8(const uint8_t* p) { return Avx2::load(reinterpret_cast<const int8_t*>(p)); }
  static V bits(uint32_t word, int from) {
    const __m256i at = _mm256_add_epi32(_mm256_set1_epi32(from), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), at);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(1)));
  }
  static void nibbles(const uint8_t* p, float offset, V* q) { nibbles_by_field<Avx2>(p, offset, q); }
};
#endif

inline float gguf_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);  // one instruction where the bit-twiddling below is ~15, once per block
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// ---------------------------------------------------------------- one block type each
// A block decoder reads block i of a row (and of the row's own scales, for grouped int8) and its
// scales when built. For chunk c (values 32c..32c+31 of the block): codes(c, q) writes the codes
// as 32 / S::W fp32 vectors, offset included (q - 8 for Q4_0); scale(c, j) is the scale of its
// j-th run of SUB values; min(c) what every value adds (Q4_1's m, Q4_K's -m; 0 where the grid is
// symmetric, HAS_MIN false). A value is scale * code + min, gguf's own arithmetic. QK values in BYTES bytes, as
// gguf's GGML_QUANT_SIZES.
template <class S>
struct Q4_0 {
  static constexpr int QK = 32, BYTES = 18, SUB = 32;
  static constexpr bool HAS_MIN = false;
  using V = typename S::V;
  const uint8_t* b;
  float d;
  Q4_0(const uint8_t* row, const float*, int64_t i) : b(row + i * BYTES), d(gguf_f16(b)) {}
  void codes(int, V* q) const { Codes<S>::nibbles(b + 2, 8.f, q); }  // 0-15: low nibbles, 16-31: high
  float scale(int, int) const { return d; }
  float min(int) const { return 0.f; }
};

template <class S>
struct Q4_1 {
  static constexpr int QK = 32, BYTES = 20, SUB = 32;
  static constexpr bool HAS_MIN = true;
  using V = typename S::V;
  const uint8_t* b;
  float d, m;
  Q4_1(const uint8_t* row, const float*, int64_t i) : b(row + i * BYTES), d(gguf_f16(b)), m(gguf_f16(b + 2)) {}
  void codes(int, V* q) const { Codes<S>::nibbles(b + 4, 0.f, q); }
  float scale(int, int) const { return d; }
  float min(int) const { return m; }
};

template <class S>
struct Q5_0 {
  static constexpr int QK = 32, BYTES = 22, SUB = 32;
  static constexpr bool HAS_MIN = false;
  using V = typename S::V;
  const uint8_t* b;
  float d;
  uint32_t qh;  // bit j: the fifth bit of value j
  Q5_0(const uint8_t* row, const float*, int64_t i) : b(row + i * BYTES), d(gguf_f16(b)) { std::memcpy(&qh, b + 2, 4); }
  void codes(int, V* q) const {
    Codes<S>::nibbles(b + 6, 16.f, q);  // the low 4 bits minus 16, then the fifth bit's 16
    for (int i = 0; i < 32 / S::W; ++i) q[i] = S::add(q[i], S::mul(Codes<S>::bits(qh, S::W * i), S::set1(16.f)));
  }
  float scale(int, int) const { return d; }
  float min(int) const { return 0.f; }
};

template <class S>
struct Q8_0 {
  static constexpr int QK = 32, BYTES = 34, SUB = 32;
  static constexpr bool HAS_MIN = false;
  using V = typename S::V;
  const uint8_t* b;
  float d;
  Q8_0(const uint8_t* row, const float*, int64_t i) : b(row + i * BYTES), d(gguf_f16(b)) {}
  void codes(int, V* q) const {
    for (int i = 0; i < 32 / S::W; ++i) q[i] = Codes<S>::int8(b + 2 + S::W * i);
  }
  float scale(int, int) const { return d; }
  float min(int) const { return 0.f; }
};

// quant.linear's grouped int8: 32 int8 codes a group, the group's fp32 scale in its own array
// (Q8_0's values with the scale kept apart; a Q8_0 table's fp16 scales widen to it exactly).
template <class S>
struct Int8Group {
  static constexpr int QK = 32, BYTES = 32, SUB = 32;
  static constexpr bool HAS_MIN = false;
  using V = typename S::V;
  const uint8_t* b;
  float d;
  Int8Group(const uint8_t* row, const float* scales, int64_t i) : b(row + i * BYTES), d(scales[i]) {}
  void codes(int, V* q) const {
    for (int i = 0; i < 32 / S::W; ++i) q[i] = Codes<S>::int8(b + S::W * i);
  }
  float scale(int, int) const { return d; }
  float min(int) const { return 0.f; }
};

// Q4_K: 8 chunks of 32 values, each with its 6-bit scale and min times the block's fp16 d, dmin;
// chunk c reads the low (even c) or high (odd c) nibbles of bytes 32 (c / 2) ... of qs.
template <class S>
struct Q4_K {
  static constexpr int QK = 256, BYTES = 144, SUB = 32;
  static constexpr bool HAS_MIN = true;
  using V = typename S::V;
  const uint8_t* b;
  float dl[8], ml[8];
  Q4_K(const uint8_t* row, const float*, int64_t i) : b(row + i * BYTES) {
    const float d = gguf_f16(b), dmin = gguf_f16(b + 2);
    const uint8_t* s = b + 4;  // 12 bytes: eight 6-bit scales and eight 6-bit mins
    for (int j = 0; j < 4; ++j) {
      dl[j] = d * static_cast<float>(s[j] & 63);
      ml[j] = dmin * static_cast<float>(s[j + 4] & 63);
      dl[j + 4] = d * static_cast<float>((s[j + 8] & 15) | ((s[j] >> 2) & 0x30));
      ml[j + 4] = dmin * static_cast<float>((s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30));
    }
  }
  void codes(int c, V* q) const {
    const uint8_t* p = b + 16 + 32 * (c / 2);
    for (int i = 0; i < 32 / S::W; ++i) q[i] = Codes<S>::field(p + S::W * i, (c & 1) * 4, 15);
  }
  float scale(int c, int) const { return dl[c]; }
  float min(int c) const { return -ml[c]; }  // d q - m, as gguf rounds it
};

// Q6_K: 16 sub-blocks of 16 values with int8 scales times the fp16 d; value = 4 low bits from
// ql, 2 high bits from qh, minus 32. Chunk c = 4h + i reads ql bytes 64h + 32(i % 2) (low
// nibbles for i < 2, high ones after) and qh bytes 32h, bits 2i and 2i + 1.
template <class S>
struct Q6_K {
  static constexpr int QK = 256, BYTES = 210, SUB = 16;
  static constexpr bool HAS_MIN = false;
  using V = typename S::V;
  const uint8_t* b;
  float dl[16];
  Q6_K(const uint8_t* row, const float*, int64_t i) : b(row + i * BYTES) {
    const float d = gguf_f16(b + 208);
    for (int j = 0; j < 16; ++j) dl[j] = d * static_cast<float>(static_cast<int8_t>(b[192 + j]));
  }
  void codes(int c, V* q) const {
    const int h = c / 4, i4 = c % 4;
    const uint8_t* ql = b + 64 * h + 32 * (i4 % 2);
    const uint8_t* qh = b + 128 + 32 * h;
    for (int i = 0; i < 32 / S::W; ++i) {
      const int j = S::W * i;
      const V lo = Codes<S>::field(ql + j, (i4 / 2) * 4, 15);
      const V hi = Codes<S>::field(qh + j, 2 * i4, 3);
      q[i] = S::add(S::add(lo, S::mul(hi, S::set1(16.f))), S::set1(-32.f));
    }
  }
  float scale(int c, int j) const { return dl[2 * c + j]; }
  float min(int) const { return 0.f; }
};

// Values 32c..32c+31 of a block as fp32 vectors: scale * code + min, gguf's own arithmetic.
template <class S, class T>
inline void decode_chunk(const T& t, int c, typename S::V* w) {
  constexpr int VS = T::SUB / S::W;  // vectors a scale
  t.codes(c, w);
  const typename S::V m = S::set1(t.min(c));
  for (int i = 0; i < 32 / S::W; ++i) w[i] = S::add(S::mul(S::set1(t.scale(c, i / VS)), w[i]), m);
}

// ---------------------------------------------------------------- the GEMV
// Rows n0..n1-1 of W (row_bytes each; `scales`: K / 32 fp32 a row, grouped int8 only) against
// B rows of x (B, K): y (B, N). Per run of SUB values sharing a scale: the codes times x summed
// in a vector, then times the scale once; a chunk's min times the chunk's sum of x (xsum, B x
// K / 32) once. So a weight costs its decode and one FMA per row of x.
template <class S, template <class> class T, int B>
void gguf_rows(const uint8_t* W, const float* scales, int64_t row_bytes, const float* x, const float* xsum,
               int64_t K, int64_t N, int64_t n0, int64_t n1, float* y) {
  using V = typename S::V;
  constexpr int P = 32 / S::W;          // vectors a chunk
  constexpr int VS = T<S>::SUB / S::W;  // vectors a scale
  constexpr int C = T<S>::QK / 32;      // chunks a block
  const int64_t nblk = K / T<S>::QK;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = W + n * row_bytes;
    const float* row_scales = scales ? scales + n * (K / 32) : nullptr;
    V acc[B][P];
    float mins[B] = {0.f};
    for (int r = 0; r < B; ++r) {
      for (int i = 0; i < P; ++i) acc[r][i] = S::zero();
    }
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const T<S> t(row, row_scales, blk);
      for (int c = 0; c < C; ++c) {
        V q[P];
        t.codes(c, q);
        const int64_t k0 = blk * T<S>::QK + 32 * c;
        const float m = t.min(c);
        for (int r = 0; r < B; ++r) {
          const float* xc = x + r * K + k0;
          for (int j = 0; j < P / VS; ++j) {  // each run of SUB values: sum q x, then scale
            V dot = S::mul(q[j * VS], S::load(xc + S::W * j * VS));
            for (int v = 1; v < VS; ++v) dot = S::fma(q[j * VS + v], S::load(xc + S::W * (j * VS + v)), dot);
            const int a = (c * (P / VS) + j) % P;  // P independent sums: FMA latency hidden
            acc[r][a] = S::fma(dot, S::set1(t.scale(c, j)), acc[r][a]);
          }
          if (T<S>::HAS_MIN) mins[r] += m * xsum[r * (K / 32) + k0 / 32];
        }
      }
    }
    for (int r = 0; r < B; ++r) {
      V a = acc[r][0];
      for (int i = 1; i < P; ++i) a = S::add(a, acc[r][i]);
      y[r * N + n] = S::sum(a) + mins[r];
    }
  }
}

template <class S, template <class> class T>
void gguf_gemv_as(const uint8_t* W, const float* scales, const float* x, int64_t B, int64_t N, int64_t K,
                  float* y) {
  const int64_t row_bytes = K / T<S>::QK * T<S>::BYTES;
  std::vector<float> xsum(B * (K / 32));  // each chunk's sum of x, for the mins
  for (int64_t i = 0; i < B * (K / 32); ++i) {
    float sum = 0.f;
    for (int k = 0; k < 32; ++k) sum += x[i * 32 + k];
    xsum[i] = sum;
  }
  // below ~16 KiB of weights a thread, waking the other costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (16 << 10) / row_bytes);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    // up to 4 activation rows a pass over the weights (their sums fill the registers); more
    // rows in further passes
    for (int64_t r = 0; r < B; r += 4) {
      const float* xr = x + r * K;
      float* yr = y + r * N;
      switch (std::min<int64_t>(4, B - r)) {
        case 1: gguf_rows<S, T, 1>(W, scales, row_bytes, xr, xsum.data() + r * (K / 32), K, N, n0, n1, yr); break;
        case 2: gguf_rows<S, T, 2>(W, scales, row_bytes, xr, xsum.data() + r * (K / 32), K, N, n0, n1, yr); break;
        case 3: gguf_rows<S, T, 3>(W, scales, row_bytes, xr, xsum.data() + r * (K / 32), K, N, n0, n1, yr); break;
        default: gguf_rows<S, T, 4>(W, scales, row_bytes, xr, xsum.data() + r * (K / 32), K, N, n0, n1, yr); break;
      }
    }
  });
}

// The block types the step runs natively, in the order of quant.ggml's scheme names; INT8_GROUP
// is quant.linear's grouped int8 (codes and fp32 scales apart).
enum GgufType : int64_t { GGUF_Q4_0 = 0, GGUF_Q4_1, GGUF_Q5_0, GGUF_Q8_0, GGUF_Q4_K, GGUF_Q6_K, GGUF_NONE, INT8_GROUP32 };

inline GgufType gguf_type(const std::string& scheme) {
  const char* names[] = {"q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q6_k"};
  for (int i = 0; i < GGUF_NONE; ++i) {
    if (scheme == names[i]) return static_cast<GgufType>(i);
  }
  return GGUF_NONE;
}

template <class S>
void block_gemv_with(GgufType type, const uint8_t* W, const float* scales, const float* x, int64_t B, int64_t N,
                     int64_t K, float* y) {
  switch (type) {
    case GGUF_Q4_0: return gguf_gemv_as<S, Q4_0>(W, scales, x, B, N, K, y);
    case GGUF_Q4_1: return gguf_gemv_as<S, Q4_1>(W, scales, x, B, N, K, y);
    case GGUF_Q5_0: return gguf_gemv_as<S, Q5_0>(W, scales, x, B, N, K, y);
    case GGUF_Q8_0: return gguf_gemv_as<S, Q8_0>(W, scales, x, B, N, K, y);
    case GGUF_Q4_K: return gguf_gemv_as<S, Q4_K>(W, scales, x, B, N, K, y);
    case GGUF_Q6_K: return gguf_gemv_as<S, Q6_K>(W, scales, x, B, N, K, y);
    case INT8_GROUP32: return gguf_gemv_as<S, Int8Group>(W, scales, x, B, N, K, y);
    default: TORCH_CHECK(false, "no native kernel for this block type");
  }
}

// y (B, N) = x (B, K) W^T. W: N rows of `type` blocks, (N, K / QK * BYTES) bytes; for
// INT8_GROUP32 (N, K) int8 codes and `scales` (N, K / 32) fp32. `portable` runs the plain C++
// vectors on a vector build (tests).
inline void block_gemv(GgufType type, const uint8_t* W, const float* scales, const float* x, int64_t B, int64_t N,
                       int64_t K, float* y, bool portable = false) {
#ifdef LLAMADESK_VEC
  if (!portable) return block_gemv_with<Vec>(type, W, scales, x, B, N, K, y);
#endif
  (void)portable;
  block_gemv_with<Portable>(type, W, scales, x, B, N, K, y);
}

// Rows n0..n1-1 of W as fp32 values (out: (n1 - n0, K)): the same decoders as the GEMV, for
// prefill, where a tile of dequantized rows and a matmul beat a weight pass per 4 rows.
template <class S, template <class> class T>
void dequantize_rows_as(const uint8_t* W, int64_t K, int64_t n0, int64_t n1, float* out) {
  using V = typename S::V;
  constexpr int P = 32 / S::W;
  const int64_t row_bytes = K / T<S>::QK * T<S>::BYTES;
  at::parallel_for(n0, n1, 1, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      for (int64_t blk = 0; blk < K / T<S>::QK; ++blk) {
        const T<S> t(W + n * row_bytes, nullptr, blk);
        for (int c = 0; c < T<S>::QK / 32; ++c) {
          V w[P];
          decode_chunk<S>(t, c, w);
          float* o = out + (n - n0) * K + blk * T<S>::QK + 32 * c;
          for (int i = 0; i < P; ++i) S::store(o + S::W * i, w[i]);
        }
      }
    }
  });
}

inline void gguf_dequantize(GgufType type, const uint8_t* W, int64_t K, int64_t n0, int64_t n1, float* out) {
#ifdef LLAMADESK_VEC
  using S = Vec;
#else
  using S = Portable;
#endif
  switch (type) {
    case GGUF_Q4_0: return dequantize_rows_as<S, Q4_0>(W, K, n0, n1, out);
    case GGUF_Q4_1: return dequantize_rows_as<S, Q4_1>(W, K, n0, n1, out);
    case GGUF_Q5_0: return dequantize_rows_as<S, Q5_0>(W, K, n0, n1, out);
    case GGUF_Q8_0: return dequantize_rows_as<S, Q8_0>(W, K, n0, n1, out);
    case GGUF_Q4_K: return dequantize_rows_as<S, Q4_K>(W, K, n0, n1, out);
    case GGUF_Q6_K: return dequantize_rows_as<S, Q6_K>(W, K, n0, n1, out);
    default: TORCH_CHECK(false, "no native kernel for this GGUF type");
  }
}

// Bytes of one K-long row of `type`, or -1 when K is not a whole number of its blocks.
inline int64_t block_row_bytes(GgufType type, int64_t K) {
  const int qk[] = {32, 32, 32, 32, 256, 256}, bytes[] = {18, 20, 22, 34, 144, 210};
  if (type == INT8_GROUP32) return K % 32 ? -1 : K;
  if (type >= GGUF_NONE || K % qk[type]) return -1;
  return K / qk[type] * bytes[type];
}
