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
// 32 weights (x's two halves), so past one row it gains little over the fp32 kernel
// (docs/BENCHMARKS.md).

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// Q6_K blocks this far ahead (4 cache lines each) are asked for while one is multiplied: the
// rows follow one another, so the next row's first blocks come in at the end of a row
constexpr int64_t Q6_K_PREFETCH_AHEAD = 8;

// out[r] = weight row `row` (K / 256 blocks of 210 bytes) times rows m0 .. m0 + R - 1 of x.
// Chunk c = 4 h + i of a block: ql bytes 64 h + 32 (i % 2), low nibbles for i < 2, high ones
// after; qh bytes 128 + 32 h, bits 2 i and 2 i + 1 (gguf_gemv.h's Q6_K reads the same).
template <int R>
inline void q6_k_row_avx2(const uint8_t* row, const XInt15& x, int64_t m0, float* out) {
  const int64_t K = x.K, G = K / 32;
  const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(3), c32 = _mm256_set1_epi8(32);
  __m256 acc[R][2];  // even and odd chunks: consecutive FMAs of a row do not wait on each other
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < K / 256; ++blk) {
    const uint8_t* b = row + blk * 210;
    prefetch_block(b + Q6_K_PREFETCH_AHEAD * 210, 210);
    const float d = gguf_f16(b + 208);
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));  // 16 int8 scales
    for (int h = 0; h < 2; ++h) {
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
      for (int i = 0; i < 4; ++i) {
        const int c = 4 * h + i;
        const __m256i w = _mm256_sub_epi8(_mm256_or_si256(low[i], high[i]), c32);  // q - 32 in [-32, 31]
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
#endif

// y (M, N) = x (M, K) W^T for W as N rows of Q6_K blocks. `x15`: x as 15-bit integers through
// q6_k_row_avx2 where the build has AVX2; otherwise (and on the portable path, for tests) the
// fp32 GEMV of gguf_gemv.h. Threads take rows of W; each row meets every row of x, 4 at a time,
// while it is in cache.
inline void q6_k_gemm(const uint8_t* W, const float* x, int64_t M, int64_t N, int64_t K, float* y, bool x15,
                      bool portable) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  if (x15 && !portable) {
    static thread_local XInt15 buffer;  // kept between calls (see r16_gemm_as)
    XInt15& xi = buffer;
    quantize_x15(x, M, K, xi);
    const int64_t row_bytes = K / 256 * 210;
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
