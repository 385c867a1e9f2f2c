// The plain C++ ("portable") kernels of quant/csrc against a scalar reference written here from
// gguf's formulas, with no torch and no Python: the check that runs on any host, and on ARM
// (cross-compiled with NEON, run under qemu-user) where no aarch64 torch is at hand.
//
// Built by tests/test_csrc_portable.py with the extension's own flags (quant/extension.py's
// BASE_FLAGS; -ffp-contract=off is what keeps a row's values independent of the rows beside it)
// and without -march, so every vector path of the headers is compiled out, as on ARM. Exit
// status 0: every check passed; 1: a mismatch, described on stderr.
//
// For random blocks of every type the kernels run, at 1, 3 and 7 activation rows:
//   dequantize  gguf_dequantize equals gguf's fp32 dequantization (ggml's formulas in their order);
//   gemv        block_gemv against the exact sum of w x (in double) within a bound on fp32
//               summation; with integer x and scales 1/2, 1, 2 every sum is exact, and so must be y;
//   r16         quantize_x15 gives v = round(x * 16319 / max|x|) per block as 128 h + l (with
//               x8, v = h = round(x * 127 / max|x|));
//               repack_r16 + r16_gemm against each block's exact integer dot product of codes and v,
//               scaled in double, within a bound on fp32 scaling;
//   batch       each row of a 3- or 7-row call equals the same row alone, bit for bit;
//   bounds      no kernel writes past its output.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#error "build without -march: this checks the plain C++ kernels; tests/test_decode_cpu.py checks the vector ones"
#endif

// ---------------------------------------------------------------- what the headers take from torch
namespace at {
// torch splits [begin, end) among its threads in pieces of at least `grain`; one thread here runs
// pieces of exactly `grain`, so the kernels still meet the seams between pieces
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  grain = std::max<int64_t>(1, grain);
  for (int64_t b = begin; b < end; b += grain) f(b, std::min(end, b + grain));
}
}  // namespace at

namespace c10::detail {
// IEEE binary16 to binary32, as c10 converts it where the CPU has no F16C (all of ARM here)
inline float fp16_ieee_to_fp32_value(uint16_t h) {
  const uint32_t exponent = (h >> 10) & 31, fraction = h & 1023;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(fraction), -24);  // subnormal
  } else if (exponent == 31) {
    magnitude = fraction ? NAN : INFINITY;
  } else {
    const uint32_t bits = ((exponent + 112) << 23) | (fraction << 13);
    std::memcpy(&magnitude, &bits, 4);
  }
  return (h & 0x8000) ? -magnitude : magnitude;
}
}  // namespace c10::detail

#define TORCH_CHECK(cond, ...)                                        \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "kernel_check: TORCH_CHECK(%s)\n", #cond); \
      std::exit(2);                                                   \
    }                                                                 \
  } while (0)

namespace {
#include "row_chunks.h"
#include "gguf_gemv.h"
#include "r16_gemm.h"
}  // namespace

namespace {

// ---------------------------------------------------------------- the reference: gguf's formulas
// One weight as gguf defines it: scale * code + min (min 0 for the symmetric types). Scales and
// mins are products of an fp16 and a small integer, exact in float and in double.
struct Weight {
  double scale;
  int code;
  double min;
};

double half(const uint8_t* p) {  // little-endian IEEE binary16, from its definition
  const int h = p[0] | p[1] << 8, exponent = (h >> 10) & 31, fraction = h & 1023;
  const double magnitude = exponent == 0 ? std::ldexp(fraction, -24) : std::ldexp(1024 + fraction, exponent - 25);
  return (h & 0x8000) ? -magnitude : magnitude;
}

// ggml's get_scale_min_k4: the 6-bit scale and min of Q4_K's sub-block j
void q4k_scale_min(const uint8_t* s, int j, int& scale, int& min) {
  if (j < 4) {
    scale = s[j] & 63;
    min = s[j + 4] & 63;
  } else {
    scale = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

struct TypeInfo {
  GgufType type;
  const char* name;
  int qk, bytes;  // values and bytes a block (grouped int8: 32 codes, the scale apart)
};
const TypeInfo kTypes[] = {{GGUF_Q4_0, "q4_0", 32, 18}, {GGUF_Q4_1, "q4_1", 32, 20},  {GGUF_Q5_0, "q5_0", 32, 22},
                           {GGUF_Q8_0, "q8_0", 32, 34}, {GGUF_Q4_K, "q4_k", 256, 144}, {GGUF_Q6_K, "q6_k", 256, 210},
                           {INT8_GROUP32, "int8_group", 32, 32}};

// One block's values, after ggml's dequantize_row_* (ggml-quants.c); `scale`: grouped int8's.
void reference_block(GgufType type, const uint8_t* b, float scale, Weight* w) {
  switch (type) {
    case GGUF_Q4_0:
      for (int j = 0; j < 16; ++j) {
        w[j] = {half(b), (b[2 + j] & 15) - 8, 0.0};
        w[j + 16] = {half(b), (b[2 + j] >> 4) - 8, 0.0};
      }
      return;
    case GGUF_Q4_1:
      for (int j = 0; j < 16; ++j) {
        w[j] = {half(b), b[4 + j] & 15, half(b + 2)};
        w[j + 16] = {half(b), b[4 + j] >> 4, half(b + 2)};
      }
      return;
    case GGUF_Q5_0: {
      const uint32_t qh = b[2] | b[3] << 8 | b[4] << 16 | static_cast<uint32_t>(b[5]) << 24;
      for (int j = 0; j < 16; ++j) {
        const int xh0 = ((qh >> j) << 4) & 0x10, xh1 = (qh >> (j + 12)) & 0x10;
        w[j] = {half(b), ((b[6 + j] & 15) | xh0) - 16, 0.0};
        w[j + 16] = {half(b), ((b[6 + j] >> 4) | xh1) - 16, 0.0};
      }
      return;
    }
    case GGUF_Q8_0:
      for (int j = 0; j < 32; ++j) w[j] = {half(b), static_cast<int8_t>(b[2 + j]), 0.0};
      return;
    case INT8_GROUP32:
      for (int j = 0; j < 32; ++j) w[j] = {scale, static_cast<int8_t>(b[j]), 0.0};
      return;
    case GGUF_Q4_K: {
      const double d = half(b), dmin = half(b + 2);
      const uint8_t* q = b + 16;
      for (int i = 0; i < 4; ++i, q += 32) {  // 64 values: 32 low nibbles, then the same bytes' high ones
        int s1, m1, s2, m2;
        q4k_scale_min(b + 4, 2 * i, s1, m1);
        q4k_scale_min(b + 4, 2 * i + 1, s2, m2);
        for (int l = 0; l < 32; ++l) {
          w[64 * i + l] = {d * s1, q[l] & 15, -dmin * m1};
          w[64 * i + 32 + l] = {d * s2, q[l] >> 4, -dmin * m2};
        }
      }
      return;
    }
    case GGUF_Q6_K: {
      const double d = half(b + 208);
      const uint8_t *ql = b, *qh = b + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      for (int n = 0; n < 2; ++n, ql += 64, qh += 32, sc += 8) {  // 128 values
        for (int l = 0; l < 32; ++l) {
          const int is = l / 16;
          w[128 * n + l] = {d * sc[is], ((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32, 0.0};
          w[128 * n + l + 32] = {d * sc[is + 2], ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32, 0.0};
          w[128 * n + l + 64] = {d * sc[is + 4], ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32, 0.0};
          w[128 * n + l + 96] = {d * sc[is + 6], ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32, 0.0};
        }
      }
      return;
    }
    default:
      std::fprintf(stderr, "kernel_check: no reference for type %d\n", static_cast<int>(type));
      std::exit(2);
  }
}

// N rows of K weights
std::vector<Weight> reference_rows(const TypeInfo& t, const std::vector<uint8_t>& rows,
                                   const std::vector<float>& scales, int64_t N, int64_t K) {
  std::vector<Weight> w(N * K);
  const int64_t blocks = K / t.qk;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < blocks; ++i) {
      const float scale = scales.empty() ? 0.f : scales[n * blocks + i];
      reference_block(t.type, rows.data() + (n * blocks + i) * t.bytes, scale, w.data() + n * K + i * t.qk);
    }
  }
  return w;
}

// ggml's fp32 value: (q - 8) * d, q * d + m, d1 * q - m1, d * sc * q: one product, then the min
float ggml_fp32(const Weight& w) {
  const float product = static_cast<float>(w.scale) * static_cast<float>(w.code);
  return w.min == 0.0 ? product : product + static_cast<float>(w.min);
}

// ---------------------------------------------------------------- random blocks and activations
struct Random {
  std::mt19937_64 engine{20261201};
  uint64_t bits() { return engine(); }
  int integer(int lo, int hi) { return lo + static_cast<int>(bits() % static_cast<uint64_t>(hi - lo + 1)); }
  double uniform() { return static_cast<double>(bits() >> 11) * 0x1.0p-53; }  // [0, 1)
};

// a finite fp16 of either sign: 2^-6 .. 4 with a random mantissa, or (exact) +-1/2, 1, 2
uint16_t random_half(Random& rng, bool exact) {
  const uint16_t sign = rng.integer(0, 1) ? 0x8000 : 0;
  if (exact) return sign | (0x3800 + 0x400 * rng.integer(0, 2));
  return sign | static_cast<uint16_t>(rng.integer(9, 16) << 10) | static_cast<uint16_t>(rng.integer(0, 1023));
}

void put_half(uint8_t* p, uint16_t h) {
  p[0] = h & 0xFF;
  p[1] = h >> 8;
}

// N rows of K weights of type t: random codes, and scales as above. Grouped int8 gets its fp32
// scales in `scales`; its codes and Q8_0's stay within [-127, 127], as their quantizers write them.
void random_rows(const TypeInfo& t, int64_t N, int64_t K, bool exact, Random& rng, std::vector<uint8_t>& rows,
                 std::vector<float>& scales) {
  const int64_t blocks = N * (K / t.qk);
  rows.resize(blocks * t.bytes);
  for (auto& byte : rows) byte = static_cast<uint8_t>(rng.bits());
  scales.clear();
  for (int64_t i = 0; i < blocks; ++i) {
    uint8_t* b = rows.data() + i * t.bytes;
    switch (t.type) {
      case GGUF_Q4_0:
      case GGUF_Q5_0:
        put_half(b, random_half(rng, exact));
        break;
      case GGUF_Q4_1:
      case GGUF_Q4_K:  // d, m or d, dmin
        put_half(b, random_half(rng, exact));
        put_half(b + 2, random_half(rng, exact));
        break;
      case GGUF_Q8_0:
        put_half(b, random_half(rng, exact));
        for (int j = 0; j < 32; ++j) b[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(rng.integer(-127, 127)));
        break;
      case GGUF_Q6_K:
        for (int j = 0; j < 16; ++j) {
          const int scale = exact ? rng.integer(-8, 8) : rng.integer(-128, 127);
          b[192 + j] = static_cast<uint8_t>(static_cast<int8_t>(scale));
        }
        put_half(b + 208, random_half(rng, exact));
        break;
      default:  // grouped int8
        for (int j = 0; j < 32; ++j) b[j] = static_cast<uint8_t>(static_cast<int8_t>(rng.integer(-127, 127)));
        scales.push_back(exact ? (rng.integer(0, 1) ? -1.f : 1.f) * std::ldexp(1.f, rng.integer(-1, 1))
                               : static_cast<float>((rng.uniform() * 2 - 1) * 0.05));
        break;
    }
  }
}

// M rows of K activations. exact: integers in [-3, 3]. Otherwise spread over 2^-3 .. 2^3, with
// the cases the 15-bit rounding treats apart: row 0's second block all zeros (no step), and in
// every row one block with a single value 1000 times the others.
std::vector<float> random_x(int64_t M, int64_t K, bool exact, Random& rng) {
  std::vector<float> x(M * K);
  for (auto& v : x) {
    v = exact ? static_cast<float>(rng.integer(-3, 3))
              : static_cast<float>((rng.uniform() * 2 - 1) * std::ldexp(1.0, rng.integer(-3, 3)));
  }
  if (!exact) {
    std::fill_n(x.begin() + 32, 32, 0.f);
    for (int64_t m = 0; m < M; ++m) {
      float* block = x.data() + m * K + 32 * (K / 32 - 1);
      for (int i = 0; i < 32; ++i) block[i] *= 1e-3f;
      block[rng.integer(0, 31)] = 1.5f;
    }
  }
  return x;
}

// ---------------------------------------------------------------- checking
constexpr double kEps = 0x1.0p-24;         // fp32's unit roundoff
constexpr int kGuard = 64;                 // values (or bytes) past an output that must stay as set
constexpr uint32_t kSentinel = 0x7FC0DEAD;  // a NaN no kernel writes

struct Tally {
  int checks = 0, failed = 0;
  void report(bool ok, const std::string& what, const std::string& detail) {
    ++checks;
    if (!ok) ++failed;
    std::fprintf(ok ? stdout : stderr, "%s %s%s%s\n", ok ? "ok  " : "FAIL", what.c_str(), detail.empty() ? "" : ": ",
                 detail.c_str());
  }
};

std::vector<float> guarded(int64_t n) {
  std::vector<float> v(n + kGuard);
  for (auto& f : v) std::memcpy(&f, &kSentinel, 4);
  return v;
}

bool guard_intact(const std::vector<float>& v, int64_t n) {
  for (int64_t i = n; i < n + kGuard; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &v[i], 4);
    if (bits != kSentinel) return false;
  }
  return true;
}

// y (M, N) against want (M, N) within tol (M, N); the worst error as a fraction of its tolerance
bool within(const std::vector<float>& y, const std::vector<double>& want, const std::vector<double>& tol, int64_t N,
            std::string& detail) {
  double worst = 0.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(static_cast<double>(y[i]) - want[i]);
    if (!(err <= tol[i])) {  // NaN fails too
      char line[200];
      std::snprintf(line, sizeof line, "row %lld, out %lld: %.9g, want %.9g (tolerance %.3g)",
                    static_cast<long long>(i / N), static_cast<long long>(i % N), y[i], want[i], tol[i]);
      detail = line;
      return false;
    }
    if (tol[i] > 0) worst = std::max(worst, err / tol[i]);
  }
  if (std::all_of(tol.begin(), tol.end(), [](double t) { return t == 0; })) {
    detail = "equal to the exact sums";
  } else {
    char line[80];
    std::snprintf(line, sizeof line, "worst error %.3f of its tolerance", worst);
    detail = line;
  }
  return true;
}

// the rows of a multi-row result against each row run alone, bit for bit
template <class Run>
bool batch_invariant(const std::vector<float>& x, int64_t M, int64_t N, int64_t K, const std::vector<float>& y,
                     Run run, std::string& detail) {
  for (int64_t m = 0; m < M; ++m) {
    std::vector<float> alone = guarded(N);
    run(x.data() + m * K, 1, alone.data());
    if (std::memcmp(alone.data(), y.data() + m * N, N * sizeof(float)) != 0) {
      detail = "row " + std::to_string(m) + " of " + std::to_string(M) + " differs from the same row alone";
      return false;
    }
  }
  return true;
}

const int64_t kRows[] = {1, 3, 7};  // activation rows: in_row_chunks' 1; 2 + 1; 4 + 2 + 1
constexpr int64_t kMostRows = 7;

struct Expected {
  double value, tolerance;
};

// run(x, M, y) at 1, 3 and 7 rows of x against reference(m, n) -> Expected; then each
// row of the 3- and 7-row results against the same row run alone
template <class Run, class Reference>
void check_rows(const std::string& what, const std::vector<float>& x, int64_t N, int64_t K, Run run,
                Reference reference, Tally& tally) {
  std::vector<double> want(kMostRows * N), tol(kMostRows * N);
  for (int64_t m = 0; m < kMostRows; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      const Expected e = reference(m, n);
      want[m * N + n] = e.value;
      tol[m * N + n] = e.tolerance;
    }
  }
  for (const int64_t M : kRows) {
    std::vector<float> y = guarded(M * N);
    run(x.data(), M, y.data());
    std::string detail = "wrote past its output";
    const bool ok = guard_intact(y, M * N) &&
                    within(y, std::vector<double>(want.begin(), want.begin() + M * N),
                           std::vector<double>(tol.begin(), tol.begin() + M * N), N, detail);
    tally.report(ok, what + " rows=" + std::to_string(M), detail);
    if (M > 1) {
      std::string why;
      tally.report(batch_invariant(x, M, N, K, y, run, why), "batch " + what + " rows=" + std::to_string(M), why);
    }
  }
}

void check_dequantize(const TypeInfo& t, int64_t N, int64_t K, Random& rng, Tally& tally) {
  std::vector<uint8_t> rows;
  std::vector<float> scales;
  random_rows(t, N, K, false, rng, rows, scales);
  const std::vector<Weight> w = reference_rows(t, rows, scales, N, K);
  std::vector<float> got = guarded(N * K);
  gguf_dequantize(t.type, rows.data(), K, 0, N, got.data());
  std::string detail;
  bool ok = guard_intact(got, N * K);
  if (!ok) detail = "wrote past its output";
  for (int64_t i = 0; ok && i < N * K; ++i) {
    if (!(got[i] == ggml_fp32(w[i]))) {  // as numbers: gguf's (q - 8) d may be -0 where ours is +0
      char line[160];
      std::snprintf(line, sizeof line, "row %lld, value %lld: %.9g, gguf %.9g", static_cast<long long>(i / K),
                    static_cast<long long>(i % K), got[i], ggml_fp32(w[i]));
      detail = line;
      ok = false;
    }
  }
  tally.report(ok, std::string("dequantize ") + t.name, detail);
}

// Each output sums K products w x and a min per 32 values, each rounded once or twice, in some
// order: fp32 errs by at most (K + 64) u times the sum of the terms' magnitudes (Higham, recursive
// summation), counting a value's scale * code and its min apart.
void check_gemv(const TypeInfo& t, int64_t N, int64_t K, bool exact, Random& rng, Tally& tally) {
  std::vector<uint8_t> rows;
  std::vector<float> scales;
  random_rows(t, N, K, exact, rng, rows, scales);
  const std::vector<Weight> w = reference_rows(t, rows, scales, N, K);
  const std::vector<float> x = random_x(kMostRows, K, exact, rng);
  auto run = [&](const float* xs, int64_t M, float* y) {
    block_gemv(t.type, rows.data(), scales.empty() ? nullptr : scales.data(), xs, M, N, K, y, true);
  };
  check_rows(std::string("gemv ") + t.name + (exact ? " exact" : ""), x, N, K, run, [&](int64_t m, int64_t n) {
    double sum = 0.0, magnitude = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const Weight& v = w[n * K + k];
      const double xk = x[m * K + k];
      sum += (v.scale * v.code + v.min) * xk;
      magnitude += (std::fabs(v.scale * v.code) + std::fabs(v.min)) * std::fabs(xk);
    }
    return Expected{sum, exact ? 0.0 : (K + 64) * kEps * magnitude};
  }, tally);
}

// x as r16 documents it: per block of 32, step d = max|x| / 16319 and v = round(x * 16319 / max|x|)
// (fp32, rounding half to even); quantize_x_row must hold exactly these v as 128 h + l. With
// x8, 8-bit x: v = h = round(x * 127 / max|x|), d = max|x| / 127.
struct X15 {
  std::vector<int32_t> v;
  std::vector<double> d, sum;  // a block's step, and its exact sum of x
};

X15 reference_x15(const std::vector<float>& x, int64_t M, int64_t K, bool x8 = false) {
  X15 r{std::vector<int32_t>(M * K), std::vector<double>(M * K / 32), std::vector<double>(M * K / 32)};
  for (int64_t g = 0; g < M * K / 32; ++g) {
    const float* xb = x.data() + 32 * g;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) {
      amax = std::max(amax, std::fabs(xb[i]));
      r.sum[g] += xb[i];
    }
    const float top = x8 ? 127.f : 16319.f, inv = amax > 0.f ? top / amax : 0.f;
    for (int i = 0; i < 32; ++i) r.v[32 * g + i] = static_cast<int32_t>(std::nearbyint(xb[i] * inv));
    r.d[g] = amax / top;
  }
  return r;
}

void check_x15(const std::vector<float>& x, int64_t M, int64_t K, const X15& want, bool x8, Tally& tally) {
  XInt15 got;
  quantize_x15(x.data(), M, K, got, x8);
  std::string detail;
  for (int64_t i = 0; i < M * K && detail.empty(); ++i) {
    const int h = got.h[i], l = x8 ? 0 : got.l[i];
    if (h < -127 || h > 127 || l < -64 || l > 63 || (x8 ? h : 128 * h + l) != want.v[i])
      detail = "value " + std::to_string(i) + ": h " + std::to_string(h) + ", l " + std::to_string(l) + ", want v " +
               std::to_string(want.v[i]);
  }
  for (int64_t g = 0; g < M * K / 32 && detail.empty(); ++g) {
    int32_t s = 0;
    for (int i = 0; i < 32; ++i) s += want.v[32 * g + i];
    if (got.d[g] != static_cast<float>(want.d[g]) || got.s[g] != s)
      detail = "block " + std::to_string(g) + ": step or sum of v";
  }
  tally.report(detail.empty(), x8 ? "x as 8-bit integers" : "x as 15-bit integers", detail);

  // tiled for in_row_chunks<8>'s chunks (what AVX-512 VNNI's kernel reads), on 15 rows (8 + 4 +
  // 2 + 1) made of these: the values row by row gives, each where XInt15::at and ::block say
  const int64_t M15 = 15, G = K / 32;
  std::vector<float> x15(M15 * K);
  for (int64_t m = 0; m < M15; ++m)
    for (int64_t k = 0; k < K; ++k) x15[m * K + k] = x[(m % M) * K + k] * static_cast<float>(1 + m);
  XInt15 rows15, tiled;
  quantize_x15(x15.data(), M15, K, rows15, x8);
  quantize_x15(x15.data(), M15, K, tiled, x8, 8);
  detail.clear();
  in_row_chunks<8>(M15, [&](auto rows, int64_t m0) {
    constexpr int R = decltype(rows)::value;
    for (int r = 0; r < R; ++r) {
      for (int64_t g = 0; g < G && detail.empty(); ++g) {
        const int64_t a = tiled.at<true>(m0, R, r, g), b = tiled.block<true>(m0, R, r, g), row = (m0 + r) * K + 32 * g;
        const bool same = std::memcmp(&tiled.h[a], &rows15.h[row], 32) == 0 &&
                          (x8 || std::memcmp(&tiled.l[a], &rows15.l[row], 32) == 0) &&
                          tiled.d[b] == rows15.d[(m0 + r) * G + g] && tiled.s[b] == rows15.s[(m0 + r) * G + g];
        if (!same) detail = "row " + std::to_string(m0 + r) + ", block " + std::to_string(g) + " tiled";
      }
    }
  });
  tally.report(detail.empty(), x8 ? "8-bit x tiled in 8-row chunks" : "15-bit x tiled in 8-row chunks", detail);
}

// Per block the kernel's integer sum is exact; then fp32: the scale times x's step, that times the
// sum, the blocks added up, and Q4_1's min times x's fp32 sum (31 roundings): within (G + 40) u of
// the terms' magnitudes.
void check_r16(const TypeInfo& t, int r16, int64_t N, int64_t K, bool x8, Random& rng, Tally& tally) {
  std::vector<uint8_t> rows;
  std::vector<float> scales;
  random_rows(t, N, K, false, rng, rows, scales);
  const std::vector<Weight> w = reference_rows(t, rows, scales, N, K);
  const int64_t G = K / 32, bytes = r16_bytes(r16, N, K);
  std::vector<uint8_t> packed(bytes + kGuard, 0xA5);
  repack_r16(r16, rows.data(), scales.empty() ? nullptr : scales.data(), N, K, packed.data());
  const bool packed_in_bounds = std::all_of(packed.begin() + bytes, packed.end(), [](uint8_t b) { return b == 0xA5; });
  tally.report(packed_in_bounds, std::string("r16 repack ") + t.name, packed_in_bounds ? "" : "wrote past its output");

  const std::vector<float> x = random_x(kMostRows, K, false, rng);
  const X15 xq = reference_x15(x, kMostRows, K, x8);
  if (r16 == R16_Q4_0) check_x15(x, kMostRows, K, xq, x8, tally);
  auto run = [&](const float* xs, int64_t M, float* y) { r16_gemm(r16, packed.data(), N, K, xs, M, y, true, x8); };
  check_rows(std::string(x8 ? "r16 x8 " : "r16 ") + t.name, x, N, K, run, [&](int64_t m, int64_t n) {
    double sum = 0.0, magnitude = 0.0;
    for (int64_t g = 0; g < G; ++g) {
      int64_t dot = 0;  // codes times v: exact
      double abs_x = 0.0;
      for (int i = 0; i < 32; ++i) {
        dot += static_cast<int64_t>(w[n * K + 32 * g + i].code) * xq.v[m * K + 32 * g + i];
        abs_x += std::fabs(x[m * K + 32 * g + i]);
      }
      const Weight& v = w[n * K + 32 * g];  // one scale and min a block of 32
      const double dx = xq.d[m * G + g];
      sum += v.scale * dx * static_cast<double>(dot) + v.min * xq.sum[m * G + g];
      magnitude += std::fabs(v.scale * dx * static_cast<double>(dot)) + std::fabs(v.min) * abs_x;
    }
    return Expected{sum, (G + 40) * kEps * magnitude};
  }, tally);
}

}  // namespace

int main() {
  Random rng;
  Tally tally;
  // N: rows no multiple of 16 (r16's last group is partial); K: two Q4_K / Q6_K blocks
  const int64_t N = 37, K = 512;
  for (const TypeInfo& t : kTypes) {
    if (t.type != INT8_GROUP32) check_dequantize(t, N, K, rng, tally);
    check_gemv(t, N, K, false, rng, tally);
    check_gemv(t, N, K, true, rng, tally);
  }
  const int r16_types[][2] = {
      {GGUF_Q4_0, R16_Q4_0}, {GGUF_Q4_1, R16_Q4_1}, {GGUF_Q8_0, R16_Q8_0}, {INT8_GROUP32, R16_I8G}, {GGUF_Q4_K, R16_Q4_K}};
  for (const auto& [gguf, r16] : r16_types) {
    for (const TypeInfo& t : kTypes) {
      if (t.type == gguf) {
        check_r16(t, r16, N, K, false, rng, tally);
        check_r16(t, r16, N, K, true, rng, tally);
      }
    }
  }
  std::printf("%d of %d checks passed\n", tally.checks - tally.failed, tally.checks);
  return tally.failed ? 1 : 0;
}
