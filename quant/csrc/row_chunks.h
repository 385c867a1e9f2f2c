// Rows of activations in chunks whose size the kernels know at compile time.
//
// Included by decode_cpu.cpp inside its anonymous namespace, before gguf_gemv.h and r16_gemm.h;
// like them it includes nothing itself and needs no torch, so tests/csrc/kernel_check.cpp can
// include all three with only <algorithm>, <cmath>, <cstring>, <string>, <type_traits>, <vector>
// and shims for at::parallel_for, TORCH_CHECK and c10's fp16 conversion.

// f(R, m) over rows m .. m + R - 1 of M, 4 rows at a time (or MAX = 8: 8, then 4), then 2, then
// 1; R is a compile-time constant (std::integral_constant) so that the kernels keep R rows' sums
// in registers.
template <int MAX = 4, typename F>
inline void in_row_chunks(int64_t M, F f) {
  static_assert(MAX == 4 || MAX == 8, "chunks of 8, 4, 2 or 1 rows");
  int64_t m = 0;
  if constexpr (MAX == 8) {
    for (; m + 8 <= M; m += 8) f(std::integral_constant<int, 8>{}, m);
  }
  for (; m + 4 <= M; m += 4) f(std::integral_constant<int, 4>{}, m);
  for (; m + 2 <= M; m += 2) f(std::integral_constant<int, 2>{}, m);
  for (; m < M; ++m) f(std::integral_constant<int, 1>{}, m);
}

// The chunk in_row_chunks<MAX>(M, ...) puts row m in: its first row and its size R.
template <int MAX = 4>
inline std::pair<int64_t, int> row_chunk_of(int64_t M, int64_t m) {
  int64_t c0 = 0;
  for (int R = MAX; R > 1; R /= 2) {
    const int64_t n = (M - c0) / R * R;  // past the MAX chunks fewer than 2 R rows are left: one chunk at most
    if (m < c0 + n) return {c0 + (m - c0) / R * R, R};
    c0 += n;
  }
  return {m, 1};
}
