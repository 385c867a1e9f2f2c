// Q6_K rows, in the file's own layout, times activations as 15-bit integers (a few rows of x:
// decode steps, the server's batches, a short prompt).
//
// Included by decode_cpu.cpp inside its anonymous namespace, after r16_gemm.h (XInt15,
// quantize_x15, prefetch_block); sum8 is decode_cpu.cpp's.
//
// Why: gguf_gemv.h's Q6_K turns every 6-bit code into fp32 and meets x in an FMA, ~1.5 vector
// instructions a weight for one row of x; on a Q4_K_M file, whose head and half the layers'
// attn_v and ffn_down are Q6_K, those layers read their bytes at ~6.6 GB/s where the r16 kernels
// stream theirs at the DRAM's ~20 (43% of an 8B decode step for 18% of its bytes, measured on a
// Zen 3: docs/BENCHMARKS.md). Here 32 codes at a time become int8 values q - 32 and meet x's
// two int8 halves (v = 128 h + l, r16_gemm.h) in vpmaddubsw (|q - 32| times x with q's sign:
// pairs within 2 * 32 * 127), and vpmaddwd by the sub-blocks' int8 scales sums those pairs in
// int32 with each 16 values' scale applied: every lane's sum over its 4 values is exact (within
// 128 * 4 * 32 * 16319 < 2^28), then turned to fp32, scaled by d * dx and summed. Same rows as
// the file (no repacking, no extra memory); the values differ from the fp32 kernel's only by x's
// rounding (1/16319 of a block's largest value). A row's arithmetic does not depend on the rows
// of x beside it (batch invariance) nor on the threads. Each row of x costs ~16 vector uops per
// 32 weights (x's two halves), so past one row it gains little over the fp32 kernel; from
// Q6_K_WIDE_ROWS rows (a prompt) each weight row is widened to int16 once and every row of x
// meets it in vpmaddwd, the same integer sums at about half the work a row (docs/BENCHMARKS.md).

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// Q6_K blocks this far ahead (4 cache lines each) are asked for while one is multiplied: the
// rows follow one another, so the next row's first blocks come in at the end of a row
constexpr int64_t Q6_K_PREFETCH_AHEAD = 8;

// Half h of a block's 8 chunks of 32 codes (chunks 4 h .. 4 h + 3) as int8 q - 32, in [-32, 31].
// Chunk c = 4 h + i: ql bytes 64 h + 32 (i % 2), low nibbles for i < 2, high ones after; qh bytes
// 128 + 32 h, bits 2 i and 2 i + 1 (gguf_gemv.h's Q6_K reads the same).
inline void q6_k_codes_avx2(const uint8_t* b, int h, __m256i* q) {
  const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(3), c32 = _mm256_set1_epi8(32);
  const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h));
  const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32));
  const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
  // the 4 chunks' high bits, already at bit 4 (qh's bits 2i, 2i + 1 moved up by 4 - 2i)
  const __m256i high[4] = {_mm256_slli_epi16(_mm256_and_si256(qh, m2), 4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4),
                           _mm256_and_si256(qh, _mm256_set1_epi8(0x30)),
                           _mm256_and_si256(_mm256_srli_epi16(qh, 2), _mm256_set1_epi8(0x30))};
  const __m256i low[4] = {_mm256_and_si256(ql0, m4), _mm256_and_si256(ql1, m4),
                          _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                          _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4)};
  for (int i = 0; i < 4; ++i) q[i] = _mm256_sub_epi8(_mm256_or_si256(low[i], high[i]), c32);
}

// out[r] = weight row `row` (K / 256 blocks of 210 bytes) times rows m0 .. m0 + R - 1 of x.
template <int R>
inline void q6_k_row_avx2(const uint8_t* row, const XInt15& x, int64_t m0, float* out) {
  const int64_t K = x.K, G = K / 32;
  __m256 acc[R][2];  // even and odd chunks: consecutive FMAs of a row do not wait on each other
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < K / 256; ++blk) {
    const uint8_t* b = row + blk * 210;
    prefetch_block(b + Q6_K_PREFETCH_AHEAD * 210, 210);
    const float d = gguf_f16(b + 208);
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));  // 16 int8 scales
    for (int h = 0; h < 2; ++h) {
      __m256i q[4];
      q6_k_codes_avx2(b, h, q);
      for (int i = 0; i < 4; ++i) {
        const int c = 4 * h + i;
        const __m256i w = q[i];
        const __m256i aw = _mm256_abs_epi8(w);
        // vpmaddubsw's 16 pairs: 8 from values 0-15 (sub-block 2c), 8 from 16-31 (2c + 1)
        const __m256i scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, _mm_set_epi64x(
            0x0101010101010101LL * (2 * c + 1), 0x0101010101010101LL * (2 * c))));
        const int64_t k0 = 256 * blk + 32 * c;
        for (int r = 0; r < R; ++r) {
          const int64_t at = (m0 + r) * K + k0;
          const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.h.data() + at));
          const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.l.data() + at));
          const __m256i sh = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xh, w)), scale);
          const __m256i sl = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xl, w)), scale);
          const __m256i isum = _mm256_add_epi32(_mm256_slli_epi32(sh, 7), sl);
          acc[r][i & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * x.d[(m0 + r) * G + k0 / 32]),
                                          acc[r][i & 1]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = sum8(_mm256_add_ps(acc[r][0], acc[r][1]));
}

// ---------------------------------------------------------------- many rows of x (a prompt)
// From this many rows of x, each weight row is widened once to int16 codes times their scales
// (sc (q - 32), within 128 * 32) and every row of x meets it as v itself in vpmaddwd: ~8 vector
// uops a row and 32 weights where q6_k_row_avx2 takes ~16 (x's two halves). The integer sum of
// each lane is the same 4 values' as q6_k_row_avx2's (its vpmaddubsw/vpmaddwd lanes hold values
// 4i .. 4i + 3 of a chunk: here pairs 2i of the A half and 2i + 1 of the B half), the same
// exact integer, and the fp32 steps are the same in the same order: a row's outputs are bit for
// bit the narrow kernel's (batch invariance across the two).
constexpr int64_t Q6_K_WIDE_ROWS = 4;

// 32 int16 values (lo: 0-15, hi: 16-31) in the pair order the wide kernel multiplies: A holds
// the pairs (2p, 2p + 1) of even p, B of odd p
inline void q6_k_pair_order(__m256i lo, __m256i hi, __m256i* a, __m256i* b) {
  const __m256i even_odd = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i t0 = _mm256_permutevar8x32_epi32(lo, even_odd), t1 = _mm256_permutevar8x32_epi32(hi, even_odd);
  *a = _mm256_permute2x128_si256(t0, t1, 0x20);
  *b = _mm256_permute2x128_si256(t0, t1, 0x31);
}

// x's v = 128 h + l (M, K) as int16 in pair order, 32 values a chunk: A then B
inline void q6_k_x_pairs(const XInt15& x, int64_t M, std::vector<int16_t>& out) {
  const int64_t K = x.K;
  out.resize(M * K);
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0 * K; i < m1 * K; i += 32) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.h.data() + i));
      const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.l.data() + i));
      auto v16 = [&](int half) {
        const __m256i h16 = _mm256_cvtepi8_epi16(half ? _mm256_extracti128_si256(h, 1) : _mm256_castsi256_si128(h));
        const __m256i l16 = _mm256_cvtepi8_epi16(half ? _mm256_extracti128_si256(l, 1) : _mm256_castsi256_si128(l));
        return _mm256_add_epi16(_mm256_slli_epi16(h16, 7), l16);
      };
      __m256i a, b;
      q6_k_pair_order(v16(0), v16(1), &a, &b);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.data() + i), a);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.data() + i + 16), b);
    }
  });
}

// one weight row (K / 256 blocks) as int16 sc (q - 32) in pair order, 32 values a chunk, and
// each block's d
inline void q6_k_widen_row(const uint8_t* row, int64_t K, int16_t* w, float* d) {
  for (int64_t blk = 0; blk < K / 256; ++blk) {
    const uint8_t* b = row + blk * 210;
    d[blk] = gguf_f16(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int h = 0; h < 2; ++h) {
      __m256i q[4];
      q6_k_codes_avx2(b, h, q);
      for (int i = 0; i < 4; ++i) {
        const int c = 4 * h + i;
        const __m256i lo = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(q[i])),
                                              _mm256_set1_epi16(sc[2 * c]));
        const __m256i hi = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(q[i], 1)),
                                              _mm256_set1_epi16(sc[2 * c + 1]));
        __m256i a, bb;
        q6_k_pair_order(lo, hi, &a, &bb);
        int16_t* o = w + 256 * blk + 32 * c;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), a);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), bb);
      }
    }
  }
}

// out[r] = the widened row (w, d) times rows m0 .. m0 + R - 1 of x (xv: q6_k_x_pairs), in
// q6_k_row_avx2's fp32 steps
template <int R>
inline void q6_k_wide_rows(const int16_t* w, const float* d, const int16_t* xv, const XInt15& x, int64_t m0,
                           float* out) {
  const int64_t K = x.K, G = K / 32;
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * g));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * g + 16));
    const float db = d[g / 8];
    for (int r = 0; r < R; ++r) {
      const int16_t* v = xv + (m0 + r) * K + 32 * g;
      const __m256i isum = _mm256_add_epi32(
          _mm256_madd_epi16(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v))),
          _mm256_madd_epi16(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16))));
      acc[r][g & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(db * x.d[(m0 + r) * G + g]),
                                      acc[r][g & 1]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = sum8(_mm256_add_ps(acc[r][0], acc[r][1]));
}
#endif

// y (M, N) = x (M, K) W^T for W as N rows of Q6_K blocks. `x15`: x as 15-bit integers through
// q6_k_row_avx2 (from Q6_K_WIDE_ROWS rows, each weight row widened once: q6_k_wide_rows) where
// the build has AVX2; otherwise (and on the portable path, for tests) the fp32 GEMV of
// gguf_gemv.h. Threads take rows of W; each row meets every row of x, 4 at a time, while it is
// in cache.
inline void q6_k_gemm(const uint8_t* W, const float* x, int64_t M, int64_t N, int64_t K, float* y, bool x15,
                      bool portable) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  if (x15 && !portable) {
    static thread_local XInt15 buffer;  // kept between calls (see r16_gemm_as)
    XInt15& xi = buffer;
    quantize_x15(x, M, K, xi, false, 0, false);  // no mins: no sum of x
    const int64_t row_bytes = K / 256 * 210;
    if (M >= Q6_K_WIDE_ROWS) {
      static thread_local std::vector<int16_t> pairs;
      std::vector<int16_t>& xv = pairs;
      q6_k_x_pairs(xi, M, xv);
      at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
        std::vector<int16_t> w(K);  // this thread's widened row
        std::vector<float> d(K / 256);
        float out[4];
        for (int64_t n = n0; n < n1; ++n) {
          q6_k_widen_row(W + n * row_bytes, K, w.data(), d.data());
          in_row_chunks(M, [&](auto rows, int64_t m) {
            constexpr int R = decltype(rows)::value;
            q6_k_wide_rows<R>(w.data(), d.data(), xv.data(), xi, m, out);
            for (int r = 0; r < R; ++r) y[(m + r) * N + n] = out[r];
          });
        }
      });
      return;
    }
    // below ~16 KiB of weights a thread, waking the other costs more than it saves
    const int64_t grain = std::max<int64_t>(1, (16 << 10) / row_bytes);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      float out[4];
      for (int64_t n = n0; n < n1; ++n) {
        in_row_chunks(M, [&](auto rows, int64_t m) {
          constexpr int R = decltype(rows)::value;
          q6_k_row_avx2<R>(W + n * row_bytes, xi, m, out);
          for (int r = 0; r < R; ++r) y[(m + r) * N + n] = out[r];
        });
      }
    });
    return;
  }
#endif
  (void)x15;
  block_gemv(GGUF_Q6_K, W, nullptr, x, M, N, K, y, portable);
}
