// One decode step (one token, batch 1) through every transformer block, on the CPU.
//
// The same arithmetic as model/model.py's blocks with quant/linear.py's layers, written as
// plain loops around the matmul kernels: for a 135M model, a Python decode step spends more
// time dispatching ~45 small ops per block than in the matmuls themselves. Here each block is
// four kernel calls and loops over fixed buffers, with no allocation but the kernels' outputs.
//
// Residual stream, norms, RoPE, the KV cache and attention are fp32, as in the eager model.
#include <torch/extension.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// The kinds quant/decode_cpu.py hands over, one per linear layer.
enum Kind : int64_t { DENSE = 0, INT4 = 1, INT8 = 2, FP16 = 3 };

struct Linear {
  int64_t kind;
  at::Tensor a, b;  // DENSE/FP16: weight (N, K); INT4: packed, scales_and_zeros; INT8: qweight, scales
  int64_t group;    // INT4's group size
  int64_t n_out;    // the kernel's output may hold padding rows past n_out
  int64_t k_in;
  at::Tensor x_in;  // (1, K) input buffer in the kernel's activation dtype

  // y[0:n_out] = W x, x and y fp32
  void apply(const float* x, float* y) {
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

using LinearSpec = std::tuple<int64_t, at::Tensor, at::Tensor, int64_t, int64_t, int64_t>;

Linear make_linear(const LinearSpec& s) {
  Linear l{std::get<0>(s), std::get<1>(s), std::get<2>(s), std::get<3>(s), std::get<4>(s), std::get<5>(s), {}};
  auto dtype = l.kind == DENSE ? at::kFloat : l.kind == FP16 ? at::kHalf : at::kBFloat16;
  l.x_in = at::empty({1, l.k_in}, at::TensorOptions().dtype(dtype));
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

class Decoder {
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
                 LinearSpec wqkv, LinearSpec wo, LinearSpec w13, LinearSpec w2) {
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
    const auto t = k_cache.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kChar, "KV cache dtype ", t, " is not supported");
    TORCH_CHECK(t != at::kChar || (k_scale && v_scale), "an int8 KV cache needs its scales");
    blocks_.push_back(Block{attention_norm.contiguous(), ffn_norm.contiguous(), k_cache, v_cache,
                            t == at::kChar ? *k_scale : at::Tensor(), t == at::kChar ? *v_scale : at::Tensor(),
                            make_linear(wqkv), make_linear(wo), make_linear(w13), make_linear(w2)});
  }

  // x: (1, 1, dim) fp32 hidden state of the token at `pos`; returns it after every block.
  at::Tensor step(at::Tensor x, int64_t pos) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() == dim_, "x must be (1, 1, dim) fp32");
    TORCH_CHECK(pos >= 0 && pos < rope_.size(0), "position ", pos, " is past the cache");
    at::Tensor h = x.contiguous().clone();
    float* hp = h.data_ptr<float>();
    const float* cs = rope_.data_ptr<float>() + pos * hd_;  // (hd/2, 2) cos, sin of this position
    for (auto& b : blocks_) {
      // attention: h += wo(attend(rope(q), rope(k), v))
      rms_norm(hp, b.attention_norm.data_ptr<float>(), xn_.data(), dim_, eps_);
      b.wqkv.apply(xn_.data(), qkv_.data());
      float* q = qkv_.data();
      float* k = q + nh_ * hd_;
      float* v = k + nkv_ * hd_;
      rope(q, cs, nh_ + nkv_, hd_);  // q and k sit next to each other
      switch (b.k_cache.scalar_type()) {
        case at::kFloat: attend_block<float>(b, q, k, v, pos); break;
        case at::kBFloat16: attend_block<at::BFloat16>(b, q, k, v, pos); break;
        default: attend_block<int8_t>(b, q, k, v, pos); break;
      }
      b.wo.apply(att_.data(), o_.data());
      for (int64_t i = 0; i < dim_; ++i) hp[i] += o_[i];
      // feed-forward: h += w2(silu(w1 x) * w3 x)
      rms_norm(hp, b.ffn_norm.data_ptr<float>(), xn_.data(), dim_, eps_);
      b.w13.apply(xn_.data(), h13_.data());
      const float* gate = h13_.data();
      const float* up = gate + hidden_;
#pragma omp simd
      for (int64_t i = 0; i < hidden_; ++i) act_[i] = gate[i] / (1.f + fast_exp(-gate[i])) * up[i];
      b.w2.apply(act_.data(), o_.data());
      for (int64_t i = 0; i < dim_; ++i) hp[i] += o_[i];
    }
    return h;
  }

 private:
  // Store this token's k, v (nkv * hd each) at `pos` as the cache holds them (as the Python
  // KVCache.update does), then attend; writes att_ (nh * hd).
  template <typename T>
  void attend_block(Block& b, const float* q, const float* k, const float* v, int64_t pos) {
    const int64_t S = b.k_cache.size(2);
    T* kc = b.k_cache.data_ptr<T>();
    T* vc = b.v_cache.data_ptr<T>();
    float* ks = b.k_scale.defined() ? b.k_scale.data_ptr<float>() : nullptr;
    float* vs = b.v_scale.defined() ? b.v_scale.data_ptr<float>() : nullptr;
    for (int64_t g = 0; g < nkv_; ++g) {
      const int64_t at_pos = g * S + pos;
      store(k + g * hd_, kc + at_pos * hd_, ks ? ks + at_pos : nullptr);
      store(v + g * hd_, vc + at_pos * hd_, vs ? vs + at_pos : nullptr);
    }
    if (std::is_same<T, float>::value && pos + 1 > kLoopKeys) {
      attend_matmul(q, b.k_cache, b.v_cache, pos + 1);
    } else {
      attend(q, kc, vc, ks, vs, S, pos + 1);
    }
  }

  // Up to this many keys of an fp32 cache, loops beat the matmul kernels' call overhead; past it,
  // the GEMV kernels win (2-core Zen 4, SmolLM2: at 576 keys 4.7 ms a step against 6.1 in loops,
  // whose cost is the per-key dot-product reductions). bf16 and int8 caches, chosen to save
  // memory, always run the loops, which read them without a converted copy.
  static constexpr int64_t kLoopKeys = 192;

  // Attention through the matmul and softmax kernels, as model/model.py's _decode_attention does it.
  void attend_matmul(const float* q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t L) {
    const int64_t rep = nh_ / nkv_;
    auto qg = at::from_blob(const_cast<float*>(q), {1, nkv_, rep, hd_}, at::kFloat);  // (B, nkv, n_rep, hd)
    auto k = k_cache.narrow(2, 0, L);                                                // (B, nkv, L, hd)
    auto v = v_cache.narrow(2, 0, L);
    auto scores = at::matmul(qg, k.transpose(-1, -2)).mul_(1.0 / std::sqrt(static_cast<double>(hd_)));
    auto y = at::matmul(at::softmax(scores, -1), v);  // (B, nkv, n_rep, hd)
    std::copy(y.data_ptr<float>(), y.data_ptr<float>() + nh_ * hd_, att_.data());
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
  void attend(const float* q, const T* kc, const T* vc, const float* ks, const float* vs, int64_t S, int64_t L) {
    const int64_t rep = nh_ / nkv_;
    const float scale = 1.f / std::sqrt(static_cast<float>(hd_));
    if (static_cast<int64_t>(scores_.size()) < nh_ * L) scores_.resize(nh_ * L);
    auto heads = [&](int64_t g0, int64_t g1) {
      std::vector<float> row(hd_);
      for (int64_t g = g0; g < g1; ++g) {
        const T* keys = kc + g * S * hd_;
        const T* vals = vc + g * S * hd_;
        float* p = scores_.data() + g * rep * L;  // (rep, L)
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
          float mx = -INFINITY;
          for (int64_t t = 0; t < L; ++t) mx = std::max(mx, pr[t]);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < L; ++t) {
            pr[t] = fast_exp(pr[t] - mx);
            sum += pr[t];
          }
          const float inv = 1.f / sum;
          for (int64_t t = 0; t < L; ++t) pr[t] *= inv * (vs ? vs[g * S + t] : 1.f);
          std::fill(att_.data() + (g * rep + r) * hd_, att_.data() + (g * rep + r + 1) * hd_, 0.f);
        }
        for (int64_t t = 0; t < L; ++t) {
          const T* vt = vals + t * hd_;
          for (int64_t d = 0; d < hd_; ++d) row[d] = as_float(vt[d]);
          for (int64_t r = 0; r < rep; ++r) {
            const float w = p[r * L + t];
            float* y = att_.data() + (g * rep + r) * hd_;
#pragma omp simd
            for (int64_t d = 0; d < hd_; ++d) y[d] += w * row[d];
          }
        }
      }
    };
    if (L >= kParallelKeys && nkv_ > 1) {
      at::parallel_for(0, nkv_, 1, heads);
    } else {
      heads(0, nkv_);
    }
  }

  // Past this many keys, splitting KV heads over threads pays for waking them.
  static constexpr int64_t kParallelKeys = 256;

  int64_t dim_, nh_, nkv_, hd_, hidden_;
  double eps_;
  at::Tensor rope_;  // (S, hd/2, 2) fp32
  std::vector<Block> blocks_;
  std::vector<float> xn_, qkv_, att_, o_, h13_, act_, scores_;
};

// sum over groups j of s[j] * (q_j . x_j), 32 values a group
inline float group_dot(const float* x, const int8_t* q, const float* s, int64_t G) {
#ifdef __AVX512F__
  // the compiler's own vectorization picks 256-bit halves and two-step widening: ~2x slower
  // two groups an iteration: four independent sums hide the FMA latency
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t j = 0;
  auto one = [&](int64_t g, __m512& a0, __m512& a1) {
    const __m256i qg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + g * 32));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(qg)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(qg, 1)));
    const __m512 sg = _mm512_set1_ps(s[g]);
    a0 = _mm512_fmadd_ps(_mm512_mul_ps(lo, _mm512_loadu_ps(x + g * 32)), sg, a0);
    a1 = _mm512_fmadd_ps(_mm512_mul_ps(hi, _mm512_loadu_ps(x + g * 32 + 16)), sg, a1);
  };
  for (; j + 1 < G; j += 2) {
    one(j, acc[0], acc[1]);
    one(j + 1, acc[2], acc[3]);
  }
  if (j < G) one(j, acc[0], acc[1]);
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#else
  float acc[32] = {0.f};
  for (int64_t j = 0; j < G; ++j) {
    const float sj = s[j];
#pragma omp simd
    for (int64_t k = 0; k < 32; ++k) acc[k] += sj * (static_cast<float>(q[j * 32 + k]) * x[j * 32 + k]);
  }
  float sum = 0.f;
  for (int64_t k = 0; k < 32; ++k) sum += acc[k];
  return sum;
#endif
}

// y (M, N) = x (M, K) @ W^T with W = q (N, K) int8 times scales (N, K / g) fp32, one scale per
// group of g along each row: a GGUF Q8_0 table, exactly. PyTorch's int8 kernel takes one scale
// per row, which re-rounds such a table (+0.3% perplexity on SmolLM2's head); fp16 holds it to
// 2^-11 in twice the bytes. Rows go to threads; lanes run along a group, so a row sums its
// groups into one vector and reduces it once.
at::Tensor int8_group_linear(at::Tensor x, at::Tensor q, at::Tensor scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be (M, K) fp32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be contiguous (N, K) int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "scales must be contiguous fp32");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = scales.size(1);
  TORCH_CHECK(q.size(1) == K && scales.size(0) == N && G > 0 && K % G == 0, "shapes do not match");
  const int64_t g = K / G;
  TORCH_CHECK(g == 32, "int8_group_linear takes groups of 32, not ", g);
  x = x.contiguous();
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = xp + m * K;
      for (int64_t n = n0; n < n1; ++n) {
        yp[m * N + n] = group_dot(xm, qp + n * K, sp + n * G, G);
      }
    }
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, at::Tensor>())
      .def("add_block", &Decoder::add_block)
      .def("step", &Decoder::step, py::call_guard<py::gil_scoped_release>());
  m.def("int8_group_linear", &int8_group_linear, py::call_guard<py::gil_scoped_release>());
}
