// One decode step (one token, batch 1) through every transformer block, on the CPU.
//
// The same arithmetic as model/model.py's blocks with quant/linear.py's layers, written as
// plain loops around the matmul kernels: for a 135M model, a Python decode step spends more
// time dispatching ~45 small ops per block than in the matmuls themselves. Here each block is
// four kernel calls and loops over fixed buffers, with no allocation but the kernels' outputs.
//
// Residual stream, norms, RoPE, the KV cache and attention are fp32, as in the eager model.
#include <torch/extension.h>

#include <cmath>
#include <tuple>
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
  at::Tensor k_cache, v_cache;          // (1, n_kv, S, hd) fp32
  Linear wqkv, wo, w13, w2;
};

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
                 LinearSpec wqkv, LinearSpec wo, LinearSpec w13, LinearSpec w2) {
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "the fused decode step needs an fp32 KV cache");
    blocks_.push_back(Block{attention_norm.contiguous(), ffn_norm.contiguous(), k_cache, v_cache,
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
      const int64_t S = b.k_cache.size(2);
      float* kc = b.k_cache.data_ptr<float>();
      float* vc = b.v_cache.data_ptr<float>();
      for (int64_t g = 0; g < nkv_; ++g) {
        std::copy(k + g * hd_, k + (g + 1) * hd_, kc + (g * S + pos) * hd_);
        std::copy(v + g * hd_, v + (g + 1) * hd_, vc + (g * S + pos) * hd_);
      }
      if (pos + 1 <= kLoopAttention) {
        attend(q, kc, vc, S, pos + 1);
      } else {
        attend_matmul(q, b.k_cache, b.v_cache, pos + 1);
      }
      b.wo.apply(att_.data(), o_.data());
      for (int64_t i = 0; i < dim_; ++i) hp[i] += o_[i];
      // feed-forward: h += w2(silu(w1 x) * w3 x)
      rms_norm(hp, b.ffn_norm.data_ptr<float>(), xn_.data(), dim_, eps_);
      b.w13.apply(xn_.data(), h13_.data());
      const float* gate = h13_.data();
      const float* up = gate + hidden_;
      for (int64_t i = 0; i < hidden_; ++i) act_[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
      b.w2.apply(act_.data(), o_.data());
      for (int64_t i = 0; i < dim_; ++i) hp[i] += o_[i];
    }
    return h;
  }

 private:
  // Up to this many keys, loops beat the matmul kernels' call overhead; past it, their
  // vectorized exp and GEMV win (measured on a 2-core Zen 4: 2000 keys, 9 ms a token in loops).
  static constexpr int64_t kLoopAttention = 192;

  // One query per head against keys 0..L-1 of its KV head, in loops; writes att_ (nh * hd).
  void attend(const float* q, const float* kc, const float* vc, int64_t S, int64_t L) {
    const int64_t rep = nh_ / nkv_;
    const float scale = 1.f / std::sqrt(static_cast<float>(hd_));
    std::vector<float>& p = scores_;
    p.resize(L);
    for (int64_t h = 0; h < nh_; ++h) {
      const float* qh = q + h * hd_;
      const float* keys = kc + (h / rep) * S * hd_;
      const float* vals = vc + (h / rep) * S * hd_;
      float mx = -INFINITY;
      for (int64_t t = 0; t < L; ++t) {
        const float* kt = keys + t * hd_;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < hd_; ++d) s += qh[d] * kt[d];
        p[t] = s * scale;
        mx = std::max(mx, p[t]);
      }
      float sum = 0.f;
      for (int64_t t = 0; t < L; ++t) {
        p[t] = std::exp(p[t] - mx);
        sum += p[t];
      }
      float* y = att_.data() + h * hd_;
      std::fill(y, y + hd_, 0.f);
      const float inv = 1.f / sum;
      for (int64_t t = 0; t < L; ++t) {
        const float w = p[t] * inv;
        const float* vt = vals + t * hd_;
#pragma omp simd
        for (int64_t d = 0; d < hd_; ++d) y[d] += w * vt[d];
      }
    }
  }

  // The same with the matmul and softmax kernels, as model/model.py's _decode_attention does it.
  void attend_matmul(float* q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t L) {
    const int64_t rep = nh_ / nkv_;
    auto qg = at::from_blob(q, {1, nkv_, rep, hd_}, at::kFloat);  // (B, nkv, n_rep, hd)
    auto k = k_cache.narrow(2, 0, L);                             // (B, nkv, L, hd)
    auto v = v_cache.narrow(2, 0, L);
    auto scores = at::matmul(qg, k.transpose(-1, -2)).mul_(1.0 / std::sqrt(static_cast<double>(hd_)));
    auto y = at::matmul(at::softmax(scores, -1), v);  // (B, nkv, n_rep, hd)
    std::copy(y.data_ptr<float>(), y.data_ptr<float>() + nh_ * hd_, att_.data());
  }

  int64_t dim_, nh_, nkv_, hd_, hidden_;
  double eps_;
  at::Tensor rope_;  // (S, hd/2, 2) fp32
  std::vector<Block> blocks_;
  std::vector<float> xn_, qkv_, att_, o_, h13_, act_, scores_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, at::Tensor>())
      .def("add_block", &Decoder::add_block)
      .def("step", &Decoder::step, py::call_guard<py::gil_scoped_release>());
}
