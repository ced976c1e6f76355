// Fused CPU kernels of NMP-QAT's training step (mpqat.kernels; the reference is mpqat.quant.bits).
//
// One autograd node per QuantLinear layer with learned bits: the forward quantizes the layer input
// (per-feature power-of-two steps at the chosen candidate), the weight (per-row dyadic steps at the
// chosen candidate) and the bias (to the accumulator grid), then runs addmm; the backward runs the
// two matrix products of a linear layer and then the surrogate gradients of both quantizers
// (mpqat/quant/bits.py, _WeightSurrogate and _ActSurrogate) in single passes over the data.
// The forward is the reference's value bit for bit (same float operations in the same order; built
// with -ffp-contract=off so no multiply-add is fused); the backward sums in another order, so its
// gradients agree with the reference to float rounding.
//
// On a small model the Python step is set by the number of kernel launches, not by arithmetic: the
// reference runs ~60 tensor ops per layer and step, this runs one call forward and one backward.

#include <torch/extension.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

constexpr float kLn2 = 0.693147180559945309f;

// snapped_value of mpqat.quant.functional for float32: round |x| half up to 16 significant bits on
// the IEEE-754 representation (a carry moves into the exponent).
inline float snap16(float x) {
  int32_t raw;
  std::memcpy(&raw, &x, sizeof raw);
  raw = (raw + (1 << 7)) & ~((1 << 8) - 1);
  float out;
  std::memcpy(&out, &raw, sizeof out);
  return out;
}

// 2**e, the value of std::ldexp(1.0f, e), from the exponent bits where the result is a normal float
// (ldexp is a library call with range checks; the derived tensors need ~10 of these per feature).
inline float pow2i(int e) {
  if (e >= -126 && e <= 127) {
    const int32_t raw = (e + 127) << 23;
    float out;
    std::memcpy(&out, &raw, sizeof out);
    return out;
  }
  return std::ldexp(1.0f, e);
}

// bucketize(s, thresholds, right=True): how many thresholds are <= s.
inline int64_t hard_index(float s, const float* thr, int64_t n_thr) {
  int64_t h = 0;
  while (h < n_thr && thr[h] <= s) ++h;
  return h;
}

inline float sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

// Telescoping mixing weights of one strength: pi_k and dpi_k/ds, k = 0..K-1.
void mixing(float s, const float* thr, int64_t k, float inv_tau, float* pi, float* dpi) {
  float g_prev = 1.0f, h_prev = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    float g = 0.0f, h = 0.0f;
    if (j < k - 1) {
      g = sigmoid((s - thr[j]) * inv_tau);
      h = g - g * g;
    }
    pi[j] = g_prev - g;
    dpi[j] = (h_prev - h) * inv_tau;
    g_prev = g;
    h_prev = h;
  }
}

inline const float* fptr(const Tensor& t) { return t.data_ptr<float>(); }

// Optional inputs (a bias, a strength) arrive as empty tensors: the autograd node then has one input
// edge per argument, whatever is absent, so needs_input_grad(i) always means argument i.
inline bool present(const Tensor& t) { return t.numel() > 0; }

// ---- row kernels ---------------------------------------------------------------------------------
// The hot loops, eight floats at a time with AVX2 where the compiler targets it (GCC does not
// vectorise them on its own: min/max/compare become branches), then a scalar tail that computes the
// same values. mul and add stay separate instructions (no FMA), so forward values are the reference's.

#if defined(__AVX2__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256 floor_half_up(__m256 u) {  // floor(u + 0.5): round half up
  return _mm256_floor_ps(_mm256_add_ps(u, _mm256_set1_ps(0.5f)));
}
#endif

// dst = clamp(floor(x * inv + 0.5), lo, hi) * step, per element (activation rows: per-feature arrays).
void quantize_row(const float* x, const float* inv, const float* lo, const float* hi, const float* step, float* dst,
                  int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    const __m256 r = floor_half_up(_mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(inv + i)));
    const __m256 code = _mm256_min_ps(_mm256_max_ps(r, _mm256_loadu_ps(lo + i)), _mm256_loadu_ps(hi + i));
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(code, _mm256_loadu_ps(step + i)));
  }
#endif
  for (; i < n; ++i) {
    const float r = std::floor(x[i] * inv[i] + 0.5f);
    dst[i] = std::min(std::max(r, lo[i]), hi[i]) * step[i];
  }
}

// dst = clamp(floor(w * inv + 0.5), -q, q) * sc (a weight row at one candidate).
void quantize_weight_row(const float* w, float inv, float q, float sc, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 vinv = _mm256_set1_ps(inv), vq = _mm256_set1_ps(q), vnq = _mm256_set1_ps(-q), vsc = _mm256_set1_ps(sc);
  for (; i + 8 <= n; i += 8) {
    const __m256 r = floor_half_up(_mm256_mul_ps(_mm256_loadu_ps(w + i), vinv));
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_min_ps(_mm256_max_ps(r, vnq), vq), vsc));
  }
#endif
  for (; i < n; ++i) {
    const float r = std::floor(w[i] * inv + 0.5f);
    dst[i] = std::min(std::max(r, -q), q) * sc;
  }
}

// dst = sign(w) * sc with sign(0) = +1 (the 1-bit candidate).
void binary_weight_row(const float* w, float sc, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 pos = _mm256_set1_ps(sc), neg = _mm256_set1_ps(-sc), zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 ge = _mm256_cmp_ps(_mm256_loadu_ps(w + i), zero, _CMP_GE_OQ);
    _mm256_storeu_ps(dst + i, _mm256_blendv_ps(neg, pos, ge));
  }
#endif
  for (; i < n; ++i) dst[i] = (w[i] >= 0.0f ? 1.0f : -1.0f) * sc;
}

// One weight row at one candidate, backward: mix += mask * pi and the three row sums
// sum(code * g), sum(mask * g * w), sum(code * code). binary: the 1-bit candidate (code = sign(w),
// mask = |w * inv| <= 1); otherwise code = clamp(round(w * inv), -q, q), mask = [round(w * inv) in range].
void weight_row_candidate(const float* w, const float* g, float inv, float q, float pi, bool binary, float* mix,
                          int64_t n, float* sums) {
  float s_code_g = 0.0f, s_mask_gw = 0.0f, s_sq = 0.0f;
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 vinv = _mm256_set1_ps(inv), vq = _mm256_set1_ps(q), vnq = _mm256_set1_ps(-q), vpi = _mm256_set1_ps(pi);
  const __m256 one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f), zero = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 a1 = zero, a2 = zero, a3 = zero;
  for (; i + 8 <= n; i += 8) {
    const __m256 wv = _mm256_loadu_ps(w + i), gv = _mm256_loadu_ps(g + i);
    const __m256 u = _mm256_mul_ps(wv, vinv);
    __m256 code, mask;
    if (binary) {
      code = _mm256_blendv_ps(minus_one, one, _mm256_cmp_ps(wv, zero, _CMP_GE_OQ));
      mask = _mm256_and_ps(_mm256_cmp_ps(_mm256_and_ps(u, abs_mask), one, _CMP_LE_OQ), one);
    } else {
      const __m256 r = floor_half_up(u);
      code = _mm256_min_ps(_mm256_max_ps(r, vnq), vq);
      mask = _mm256_and_ps(_mm256_cmp_ps(r, code, _CMP_EQ_OQ), one);
    }
    _mm256_storeu_ps(mix + i, _mm256_add_ps(_mm256_loadu_ps(mix + i), _mm256_mul_ps(mask, vpi)));
    a1 = _mm256_add_ps(a1, _mm256_mul_ps(code, gv));
    a2 = _mm256_add_ps(a2, _mm256_mul_ps(mask, _mm256_mul_ps(gv, wv)));
    a3 = _mm256_add_ps(a3, _mm256_mul_ps(code, code));
  }
  s_code_g = hsum(a1);
  s_mask_gw = hsum(a2);
  s_sq = hsum(a3);
#endif
  for (; i < n; ++i) {
    float code, mask;
    if (binary) {
      code = w[i] >= 0.0f ? 1.0f : -1.0f;
      mask = std::fabs(w[i] * inv) <= 1.0f ? 1.0f : 0.0f;
    } else {
      const float r = std::floor(w[i] * inv + 0.5f);
      code = std::min(std::max(r, -q), q);
      mask = r == code ? 1.0f : 0.0f;
    }
    mix[i] += mask * pi;
    s_code_g += code * g[i];
    s_mask_gw += mask * (g[i] * w[i]);
    s_sq += code * code;
  }
  sums[0] = s_code_g;
  sums[1] = s_mask_gw;
  sums[2] = s_sq;
}

// One activation row, backward: clip_acc += g * code - pass * u, grad_x = pass (if given), where
// pass = g where round(u) is in range (the straight-through mask), u = x * inv.
void act_row_backward(const float* x, const float* g, const float* inv, const float* lo, const float* hi,
                      float* clip_acc, float* grad_x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 u = _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(inv + i));
    const __m256 r = floor_half_up(u);
    const __m256 code = _mm256_min_ps(_mm256_max_ps(r, _mm256_loadu_ps(lo + i)), _mm256_loadu_ps(hi + i));
    const __m256 pass = _mm256_and_ps(_mm256_cmp_ps(r, code, _CMP_EQ_OQ), gv);
    const __m256 term = _mm256_sub_ps(_mm256_mul_ps(gv, code), _mm256_mul_ps(pass, u));
    _mm256_storeu_ps(clip_acc + i, _mm256_add_ps(_mm256_loadu_ps(clip_acc + i), term));
    if (grad_x != nullptr) _mm256_storeu_ps(grad_x + i, pass);
  }
#endif
  for (; i < n; ++i) {
    const float u = x[i] * inv[i];
    const float r = std::floor(u + 0.5f);
    const float code = std::min(std::max(r, lo[i]), hi[i]);
    const float pass = r == code ? g[i] : 0.0f;
    clip_acc[i] += g[i] * code - pass * u;
    if (grad_x != nullptr) grad_x[i] = pass;
  }
}

// One activation row, one candidate's strength term: inner += clamp(round(x * inv_k), lo, hi) * g (in double).
void act_row_strength(const float* x, const float* g, const float* inv_k, float lo, float hi, double* inner,
                      int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  for (; i + 8 <= n; i += 8) {
    const __m256 r = floor_half_up(_mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(inv_k + i)));
    const __m256 prod = _mm256_mul_ps(_mm256_min_ps(_mm256_max_ps(r, vlo), vhi), _mm256_loadu_ps(g + i));
    _mm256_storeu_pd(inner + i, _mm256_add_pd(_mm256_loadu_pd(inner + i), _mm256_cvtps_pd(_mm256_castps256_ps128(prod))));
    _mm256_storeu_pd(inner + i + 4,
                     _mm256_add_pd(_mm256_loadu_pd(inner + i + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(prod, 1))));
  }
#endif
  for (; i < n; ++i) {
    const float code = std::min(std::max(std::floor(x[i] * inv_k[i] + 0.5f), lo), hi);
    inner[i] += static_cast<double>(code * g[i]);
  }
}

// ---- weight quantizer ----------------------------------------------------------------------------

struct WeightConsts {
  const float* thr;     // [K-1]
  const float* qmax;    // [K]
  const float* gscale;  // [K]  1 / sqrt(n * qmax)
  int64_t k;
  float inv_tau;
  bool binary_first;
};

struct WeightDerived {
  int64_t k = 1, s_rows = 1, r_rows = 1, out = 0;
  std::vector<float> sc, inv_sc;  // [K * S]
  std::vector<int64_t> h;         // [out]
  std::vector<float> sc_h;        // [out]
  std::vector<float> pi, dpi;     // [R * K] (only with a strength)
};

WeightDerived weight_derived(const Tensor& step, const Tensor& strength, const WeightConsts& c, int64_t out) {
  WeightDerived d;
  d.k = c.k;
  d.s_rows = step.size(1);
  d.out = out;
  const float* st = fptr(step);
  d.sc.resize(d.k * d.s_rows);
  d.inv_sc.resize(d.k * d.s_rows);
  for (int64_t i = 0; i < d.k * d.s_rows; ++i) {
    float a = std::max(std::fabs(st[i]), 1e-12f);
    d.sc[i] = snap16(a);
    d.inv_sc[i] = 1.0f / d.sc[i];
  }
  std::vector<int64_t> h_rows(1, 0);
  if (present(strength)) {
    d.r_rows = strength.numel();
    const float* s = fptr(strength);
    h_rows.resize(d.r_rows);
    d.pi.resize(d.r_rows * d.k);
    d.dpi.resize(d.r_rows * d.k);
    for (int64_t r = 0; r < d.r_rows; ++r) {
      h_rows[r] = hard_index(s[r], c.thr, d.k - 1);
      mixing(s[r], c.thr, d.k, c.inv_tau, &d.pi[r * d.k], &d.dpi[r * d.k]);
    }
  }
  d.h.resize(out);
  d.sc_h.resize(out);
  for (int64_t o = 0; o < out; ++o) {
    int64_t h = h_rows[d.r_rows == 1 ? 0 : o];
    d.h[o] = h;
    d.sc_h[o] = d.sc[h * d.s_rows + (d.s_rows == 1 ? 0 : o)];
  }
  return d;
}

// The chosen candidate's fake-quantized weight (the reference's forward value).
void weight_forward(const float* w, int64_t out, int64_t in, const WeightDerived& d, const WeightConsts& c,
                    float* wq) {
  for (int64_t o = 0; o < out; ++o) {
    const int64_t h = d.h[o];
    if (h == 0 && c.binary_first) {
      binary_weight_row(w + o * in, d.sc_h[o], wq + o * in, in);
    } else {
      quantize_weight_row(w + o * in, d.inv_sc[h * d.s_rows + (d.s_rows == 1 ? 0 : o)], c.qmax[h], d.sc_h[o],
                          wq + o * in, in);
    }
  }
}

#if defined(__AVX2__)
// weight_backward's pass over one row for K candidates, all of them in one sweep over the row: each
// eight-float chunk of the weights and their gradient is loaded once, the mixed straight-through
// factor is built in a register, and every candidate's three sums stay in registers. Each sum runs
// over the chunks in the order of weight_row_candidate (and its scalar tail after them), and the
// factor adds the candidates in index order from zero, so the results are that function's bit for
// bit. sums: [K][3] as weight_row_candidate writes them.
template <int K>
void weight_row_all_candidates(const float* w, const float* g, const float* inv, const float* q, const float* pi,
                               bool binary_first, float* gw, int64_t n, float* sums) {
  const __m256 one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f), zero = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 a1[K], a2[K], a3[K];
  for (int k = 0; k < K; ++k) a1[k] = a2[k] = a3[k] = zero;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 wv = _mm256_loadu_ps(w + i), gv = _mm256_loadu_ps(g + i);
    __m256 mix = zero;
    for (int k = 0; k < K; ++k) {
      const __m256 u = _mm256_mul_ps(wv, _mm256_set1_ps(inv[k]));
      __m256 code, mask;
      if (k == 0 && binary_first) {
        code = _mm256_blendv_ps(minus_one, one, _mm256_cmp_ps(wv, zero, _CMP_GE_OQ));
        mask = _mm256_and_ps(_mm256_cmp_ps(_mm256_and_ps(u, abs_mask), one, _CMP_LE_OQ), one);
      } else {
        const __m256 r = floor_half_up(u);
        code = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-q[k])), _mm256_set1_ps(q[k]));
        mask = _mm256_and_ps(_mm256_cmp_ps(r, code, _CMP_EQ_OQ), one);
      }
      mix = _mm256_add_ps(mix, _mm256_mul_ps(mask, _mm256_set1_ps(pi[k])));
      a1[k] = _mm256_add_ps(a1[k], _mm256_mul_ps(code, gv));
      a2[k] = _mm256_add_ps(a2[k], _mm256_mul_ps(mask, _mm256_mul_ps(gv, wv)));
      a3[k] = _mm256_add_ps(a3[k], _mm256_mul_ps(code, code));
    }
    _mm256_storeu_ps(gw + i, _mm256_mul_ps(gv, mix));
  }
  for (int k = 0; k < K; ++k) {
    sums[3 * k] = hsum(a1[k]);
    sums[3 * k + 1] = hsum(a2[k]);
    sums[3 * k + 2] = hsum(a3[k]);
  }
  for (; i < n; ++i) {
    float mix = 0.0f;
    for (int k = 0; k < K; ++k) {
      float code, mask;
      if (k == 0 && binary_first) {
        code = w[i] >= 0.0f ? 1.0f : -1.0f;
        mask = std::fabs(w[i] * inv[k]) <= 1.0f ? 1.0f : 0.0f;
      } else {
        const float r = std::floor(w[i] * inv[k] + 0.5f);
        code = std::min(std::max(r, -q[k]), q[k]);
        mask = r == code ? 1.0f : 0.0f;
      }
      mix += mask * pi[k];
      sums[3 * k] += code * g[i];
      sums[3 * k + 1] += mask * (g[i] * w[i]);
      sums[3 * k + 2] += code * code;
    }
    gw[i] = g[i] * mix;
  }
}
#endif

// Surrogate backward of the weight quantizer (reference: _WeightSurrogate.backward).
void weight_backward(const float* w, const float* g, int64_t out, int64_t in, const WeightDerived& d,
                     const WeightConsts& c, const float* step, float* grad_w, float* g_step, float* g_strength) {
  const int64_t k_n = d.k;
  std::vector<float> mix(in);
  std::vector<float> inner(k_n), norm(k_n), inv_k(k_n), pi_k(k_n), all_sums(3 * k_n);
  // Sums over rows (a per-layer step or strength) in double: the terms cancel.
  std::vector<double> step_acc(k_n * d.s_rows, 0.0);
  double strength_acc = 0.0;
  const bool has_pi = !d.pi.empty();
  for (int64_t o = 0; o < out; ++o) {
    const int64_t so = d.s_rows == 1 ? 0 : o;
    const int64_t ro = d.r_rows == 1 ? 0 : o;
    const float* row = w + o * in;
    const float* grow = g + o * in;
    float* gw = grad_w + o * in;
    for (int64_t k = 0; k < k_n; ++k) {
      inv_k[k] = d.inv_sc[k * d.s_rows + so];
      pi_k[k] = has_pi ? d.pi[ro * k_n + k] : 1.0f;
    }
    bool swept = false;  // all candidates' sums (and the row's gradient) done in one sweep
#if defined(__AVX2__)
    // One sweep for 1-4 candidates (their twelve sums fit in registers); more take the per-candidate passes.
    static constexpr decltype(&weight_row_all_candidates<1>) kSweeps[] = {
        nullptr, weight_row_all_candidates<1>, weight_row_all_candidates<2>, weight_row_all_candidates<3>,
        weight_row_all_candidates<4>};
    if (k_n < 5 && kSweeps[k_n] != nullptr) {
      kSweeps[k_n](row, grow, inv_k.data(), c.qmax, pi_k.data(), c.binary_first, gw, in, all_sums.data());
      swept = true;
    }
#endif
    if (!swept) {
      std::fill(mix.begin(), mix.end(), 0.0f);
      for (int64_t k = 0; k < k_n; ++k) {
        weight_row_candidate(row, grow, inv_k[k], c.qmax[k], pi_k[k], k == 0 && c.binary_first, mix.data(), in,
                             &all_sums[3 * k]);
      }
      for (int64_t i = 0; i < in; ++i) gw[i] = grow[i] * mix[i];
    }
    for (int64_t k = 0; k < k_n; ++k) {
      const float inv = inv_k[k];
      const float pi = pi_k[k];
      const float acc_inner = all_sums[3 * k], acc_masked = all_sums[3 * k + 1], acc_sq = all_sums[3 * k + 2];
      inner[k] = acc_inner;
      norm[k] = std::max(std::sqrt(acc_sq), 1e-12f);
      // LSQ: d(code * sc)/d sc = code - u * mask, times the gradient scale with the step's sign.
      const float st = step[k * d.s_rows + so];
      const float sign = st > 0.0f ? 1.0f : (st < 0.0f ? -1.0f : 0.0f);
      step_acc[k * d.s_rows + so] += static_cast<double>((acc_inner - acc_masked * inv) * (c.gscale[k] * sign) * pi);
    }
    if (g_strength != nullptr && has_pi) {
      // Scale-matched mixture: every candidate row rescaled to the chosen row's norm.
      const float chosen = norm[d.h[o]] * d.sc_h[o];
      float acc = 0.0f;
      for (int64_t k = 0; k < k_n; ++k) acc += d.dpi[ro * k_n + k] * (inner[k] / norm[k]);
      if (d.r_rows == 1) {
        strength_acc += static_cast<double>(acc * chosen);
      } else {
        g_strength[ro] += acc * chosen;
      }
    }
  }
  for (int64_t i = 0; i < k_n * d.s_rows; ++i) g_step[i] += static_cast<float>(step_acc[i]);
  if (g_strength != nullptr && has_pi && d.r_rows == 1) g_strength[0] += static_cast<float>(strength_acc);
}

// ---- activation quantizer ------------------------------------------------------------------------

struct ActConsts {
  const float* thr;     // [K-1]
  const float* extra;   // [K]  b_k - b_1
  const float* qmin;    // [K]
  const float* qmax;    // [K]
  const float* cqmax;   // [K]  qmax(b_1) * 2**(b_k - b_1): every candidate clipped at the lowest range
  const float* gscale;  // [K]
  int64_t k;
  float inv_tau, log2_qmax0;
  bool is_signed;
};

struct ActDerived {
  int64_t k = 1, features = 0, clip_n = 1, r_rows = 1;
  std::vector<float> base;                                // [clip_n]
  std::vector<float> step, inv_step, qmin, qmax, cgs;     // [features]
  std::vector<float> dpi_steps, inv_steps;                // [K * features] (only with a strength)
  float min_step = 1.0f;
};

ActDerived act_derived(const Tensor& log2_clip, const Tensor& strength, const ActConsts& c, int64_t features) {
  ActDerived d;
  d.k = c.k;
  d.features = features;
  d.clip_n = log2_clip.numel();
  const float* clip = fptr(log2_clip);
  d.base.resize(d.clip_n);
  for (int64_t i = 0; i < d.clip_n; ++i) d.base[i] = std::floor((clip[i] - c.log2_qmax0) + 0.5f);
  std::vector<int64_t> h_rows(1, 0);
  std::vector<float> dpi;
  const bool has_strength = present(strength);
  if (has_strength) {
    d.r_rows = strength.numel();
    const float* s = fptr(strength);
    h_rows.resize(d.r_rows);
    std::vector<float> pi(d.k);
    dpi.resize(d.r_rows * d.k);
    for (int64_t r = 0; r < d.r_rows; ++r) {
      h_rows[r] = hard_index(s[r], c.thr, d.k - 1);
      mixing(s[r], c.thr, d.k, c.inv_tau, pi.data(), &dpi[r * d.k]);
    }
    d.dpi_steps.resize(d.k * features);
    d.inv_steps.resize(d.k * features);
  }
  d.step.resize(features);
  d.inv_step.resize(features);
  d.qmin.resize(features);
  d.qmax.resize(features);
  d.cgs.resize(features);
  float e_min = INFINITY;
  for (int64_t f = 0; f < features; ++f) {
    const float base = d.base[d.clip_n == 1 ? 0 : f];
    const int64_t h = h_rows[d.r_rows == 1 ? 0 : f];
    const float e = base - c.extra[h];
    e_min = std::min(e_min, e);
    d.step[f] = pow2i(static_cast<int>(e));
    d.inv_step[f] = pow2i(-static_cast<int>(e));
    d.qmin[f] = c.qmin[h];
    d.qmax[f] = c.qmax[h];
    d.cgs[f] = d.step[f] * (c.gscale[h] * kLn2);
    if (has_strength) {
      const int64_t rf = d.r_rows == 1 ? 0 : f;
      for (int64_t k = 0; k < d.k; ++k) {
        const int ek = static_cast<int>(base - c.extra[k]);
        d.dpi_steps[k * features + f] = dpi[rf * d.k + k] * pow2i(ek);
        d.inv_steps[k * features + f] = pow2i(-ek);
      }
    }
  }
  d.min_step = pow2i(static_cast<int>(e_min));
  return d;
}

void act_forward(const float* x, int64_t batch, int64_t features, const ActDerived& d, bool is_signed, float* xq) {
  std::vector<float> lo(d.qmin);
  if (!is_signed) std::fill(lo.begin(), lo.end(), 0.0f);
  for (int64_t b = 0; b < batch; ++b) {
    quantize_row(x + b * features, d.inv_step.data(), lo.data(), d.qmax.data(), d.step.data(), xq + b * features,
                 features);
  }
}

#if defined(__AVX2__)
// act_backward's pass for K strength candidates (K = 0: no strength terms), eight features at a time:
// each feature block walks the batch with its clip and strength sums in registers, instead of
// reading and writing them once per row. Every sum runs over the batch in the same order as the
// row-wise pass (from zero, row after row), so the results are that pass's bit for bit; features
// past the last full block take the scalar formulas below. Returns the first feature not done.
template <int K>
int64_t act_backward_blocks(const float* x, const float* g, int64_t batch, int64_t features, const float* inv,
                            const float* lo, const float* hi, const float* inv_steps, const float* clo,
                            const float* chi, float* clip_acc, double* inner, float* grad_x) {
  int64_t f0 = 0;
  for (; f0 + 8 <= features; f0 += 8) {
    const __m256 vinv = _mm256_loadu_ps(inv + f0), vlo = _mm256_loadu_ps(lo + f0), vhi = _mm256_loadu_ps(hi + f0);
    __m256 vinv_k[K > 0 ? K : 1], vclo[K > 0 ? K : 1], vchi[K > 0 ? K : 1];
    __m256d in_lo[K > 0 ? K : 1], in_hi[K > 0 ? K : 1];
    for (int k = 0; k < K; ++k) {
      vinv_k[k] = _mm256_loadu_ps(inv_steps + k * features + f0);
      vclo[k] = _mm256_set1_ps(clo[k]);
      vchi[k] = _mm256_set1_ps(chi[k]);
      in_lo[k] = _mm256_setzero_pd();
      in_hi[k] = _mm256_setzero_pd();
    }
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < batch; ++b) {
      const __m256 xv = _mm256_loadu_ps(x + b * features + f0), gv = _mm256_loadu_ps(g + b * features + f0);
      const __m256 u = _mm256_mul_ps(xv, vinv);
      const __m256 r = floor_half_up(u);
      const __m256 code = _mm256_min_ps(_mm256_max_ps(r, vlo), vhi);
      const __m256 pass = _mm256_and_ps(_mm256_cmp_ps(r, code, _CMP_EQ_OQ), gv);
      acc = _mm256_add_ps(acc, _mm256_sub_ps(_mm256_mul_ps(gv, code), _mm256_mul_ps(pass, u)));
      if (grad_x != nullptr) _mm256_storeu_ps(grad_x + b * features + f0, pass);
      for (int k = 0; k < K; ++k) {
        const __m256 rk = floor_half_up(_mm256_mul_ps(xv, vinv_k[k]));
        const __m256 prod = _mm256_mul_ps(_mm256_min_ps(_mm256_max_ps(rk, vclo[k]), vchi[k]), gv);
        in_lo[k] = _mm256_add_pd(in_lo[k], _mm256_cvtps_pd(_mm256_castps256_ps128(prod)));
        in_hi[k] = _mm256_add_pd(in_hi[k], _mm256_cvtps_pd(_mm256_extractf128_ps(prod, 1)));
      }
    }
    _mm256_storeu_ps(clip_acc + f0, acc);
    for (int k = 0; k < K; ++k) {
      _mm256_storeu_pd(inner + k * features + f0, in_lo[k]);
      _mm256_storeu_pd(inner + k * features + f0 + 4, in_hi[k]);
    }
  }
  return f0;
}
#endif

// The scalar formulas of act_row_backward / act_row_strength for features [f_begin, features), each
// summed over the batch row after row.
void act_backward_scalar_features(const float* x, const float* g, int64_t batch, int64_t features, int64_t f_begin,
                                  const float* inv, const float* lo, const float* hi, const float* inv_steps,
                                  const float* clo, const float* chi, int64_t k_terms, float* clip_acc,
                                  double* inner, float* grad_x) {
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = x + b * features;
    const float* grow = g + b * features;
    for (int64_t f = f_begin; f < features; ++f) {
      const float u = row[f] * inv[f];
      const float r = std::floor(u + 0.5f);
      const float code = std::min(std::max(r, lo[f]), hi[f]);
      const float pass = r == code ? grow[f] : 0.0f;
      clip_acc[f] += grow[f] * code - pass * u;
      if (grad_x != nullptr) grad_x[b * features + f] = pass;
      for (int64_t k = 0; k < k_terms; ++k) {
        const float ck = std::min(std::max(std::floor(row[f] * inv_steps[k * features + f] + 0.5f), clo[k]), chi[k]);
        inner[k * features + f] += static_cast<double>(ck * grow[f]);
      }
    }
  }
}

// Surrogate backward of the activation quantizer (reference: _ActSurrogate.backward). One pass over
// the batch: each row of x and of the gradient is read from memory once, for the input/clip
// gradients and then (from L1) for every candidate's strength term.
void act_backward(const float* x, const float* g, int64_t batch, int64_t features, const ActDerived& d,
                  const ActConsts& c, float* grad_x, float* g_clip, float* g_strength) {
  const float* inv = d.inv_step.data();
  const float* hi = d.qmax.data();
  std::vector<float> lo(d.qmin);
  if (!c.is_signed) std::fill(lo.begin(), lo.end(), 0.0f);
  const float* lop = lo.data();
  std::vector<float> clip_acc(features, 0.0f);
  float* ca = clip_acc.data();
  const bool strength_terms = g_strength != nullptr && !d.dpi_steps.empty();
  // Double accumulators: the codes of the finer candidates are large (up to 2**16) and their
  // products with the gradient cancel over the batch.
  std::vector<double> inner(strength_terms ? d.k * features : 0, 0.0);
  std::vector<float> clo(d.k), chi(d.k);
  for (int64_t k = 0; k < d.k; ++k) {
    chi[k] = c.cqmax[k];
    clo[k] = c.is_signed ? -c.cqmax[k] : 0.0f;
  }
  const int64_t k_terms = strength_terms ? d.k : 0;
  int64_t blocked = -1;  // features done by the blocked pass (-1: not taken)
#if defined(__AVX2__)
  const float* isteps = strength_terms ? d.inv_steps.data() : nullptr;
  // The blocked pass for 0 (no strength terms) and 2-4 candidates: their sums fit in registers.
  static constexpr decltype(&act_backward_blocks<0>) kBlocks[] = {act_backward_blocks<0>, nullptr, act_backward_blocks<2>,
                                                                  act_backward_blocks<3>, act_backward_blocks<4>};
  if (k_terms < 5 && kBlocks[k_terms] != nullptr) {
    blocked = kBlocks[k_terms](x, g, batch, features, inv, lop, hi, isteps, clo.data(), chi.data(), ca, inner.data(),
                               grad_x);
  }
#endif
  if (blocked >= 0) {
    act_backward_scalar_features(x, g, batch, features, blocked, inv, lop, hi, strength_terms ? d.inv_steps.data() : nullptr,
                                 clo.data(), chi.data(), k_terms, ca, inner.data(), grad_x);
  } else {  // row by row (no AVX2, or more candidates than the blocked pass is built for)
    for (int64_t b = 0; b < batch; ++b) {
      const float* row = x + b * features;
      const float* grow = g + b * features;
      act_row_backward(row, grow, inv, lop, hi, ca, grad_x != nullptr ? grad_x + b * features : nullptr, features);
      for (int64_t k = 0; k < k_terms; ++k) {
        act_row_strength(row, grow, d.inv_steps.data() + k * features, clo[k], chi[k], inner.data() + k * features,
                         features);
      }
    }
  }
  // Per-layer sums over features in double: the terms cancel, and float would add visible round-off.
  if (d.clip_n == 1) {
    double total = 0.0;
    for (int64_t f = 0; f < features; ++f) total += static_cast<double>(clip_acc[f] * d.cgs[f]);
    g_clip[0] += static_cast<float>(total);
  } else {
    for (int64_t f = 0; f < features; ++f) g_clip[f] += clip_acc[f] * d.cgs[f];
  }
  if (!strength_terms) return;
  std::vector<double> per_feature(features, 0.0);
  for (int64_t k = 0; k < d.k; ++k) {
    const float* dps = d.dpi_steps.data() + k * features;
    const double* in = inner.data() + k * features;
    for (int64_t f = 0; f < features; ++f) per_feature[f] += static_cast<double>(dps[f]) * in[f];
  }
  if (d.r_rows == 1) {
    double total = 0.0;
    for (int64_t f = 0; f < features; ++f) total += per_feature[f];
    g_strength[0] += static_cast<float>(total);
  } else {
    for (int64_t f = 0; f < features; ++f) g_strength[f] += static_cast<float>(per_feature[f]);
  }
}

// ---- the fused layer -----------------------------------------------------------------------------

// The constants arrive packed in one float tensor per quantizer (built once in Python, see
// mpqat.quant.bits): weight [thresholds (K-1) | qmax (K) | grad_scale (K)]; activation
// [thresholds (K-1) | extra bits | qmin | qmax | common qmax | grad_scale (K each)].
WeightConsts weight_consts(const Tensor& packed, double inv_tau, bool binary_first) {
  const int64_t k = (packed.numel() + 1) / 3;
  const float* p = fptr(packed);
  return WeightConsts{p, p + (k - 1), p + (2 * k - 1), k, static_cast<float>(inv_tau), binary_first};
}

ActConsts act_consts(const Tensor& packed, double inv_tau, double log2_qmax0, bool is_signed) {
  const int64_t k = (packed.numel() + 1) / 6;
  const float* p = fptr(packed);
  const float* rows = p + (k - 1);
  return ActConsts{p,        rows,         rows + k, rows + 2 * k, rows + 3 * k, rows + 4 * k,
                   k,        static_cast<float>(inv_tau), static_cast<float>(log2_qmax0), is_signed};
}

// What the forward derived from the quantizer parameters, kept for the backward (the saved
// parameters are version-checked, so recomputing it there would give the same values).
struct DerivedHolder : torch::CustomClassHolder {
  WeightDerived wd;
  ActDerived ad;
};

// Argument order (forward and the gradients the backward returns):
//  0 x [B, in]   1 weight [out, in]   2 bias [out] or empty
//  3 w_step [K, S, 1]   4 w_strength [R, 1] or empty   5 a_log2_clip [C']   6 a_strength [R'] or empty
//  7 the weight quantizer's packed constants   8 the activation quantizer's, then scalars (1/tau of
//  each, log2 qmax of the lowest activation candidate, binary_first, signed).
struct NmpLinear : public torch::autograd::Function<NmpLinear> {
  static constexpr int kArgs = 14;

  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor weight, Tensor bias, Tensor w_step, Tensor w_strength,
                        Tensor a_clip, Tensor a_strength, Tensor w_packed, Tensor a_packed, double w_inv_tau,
                        double a_inv_tau, double a_log2_qmax0, bool binary_first, bool is_signed) {
    x = x.contiguous();
    weight = weight.contiguous();
    w_step = w_step.contiguous();
    const int64_t batch = x.size(0), in = x.size(1), out = weight.size(0);
    const WeightConsts wc = weight_consts(w_packed, w_inv_tau, binary_first);
    const ActConsts ac = act_consts(a_packed, a_inv_tau, a_log2_qmax0, is_signed);
    auto derived = c10::make_intrusive<DerivedHolder>();
    derived->wd = weight_derived(w_step, w_strength, wc, out);
    derived->ad = act_derived(a_clip, a_strength, ac, in);
    const WeightDerived& wd = derived->wd;
    const ActDerived& ad = derived->ad;

    Tensor xq = at::empty_like(x);
    act_forward(fptr(x), batch, in, ad, is_signed, xq.data_ptr<float>());
    Tensor wq = at::empty_like(weight);
    weight_forward(fptr(weight), out, in, wd, wc, wq.data_ptr<float>());
    Tensor y;
    if (present(bias)) {
      // The bias on the accumulator grid: unit = w_scale_o * 2**min(k), round half up.
      Tensor bq = at::empty({out}, x.options());
      const float* b = fptr(bias);
      float* dst = bq.data_ptr<float>();
      for (int64_t o = 0; o < out; ++o) {
        const float unit = wd.sc_h[o] * ad.min_step;
        dst[o] = std::floor(b[o] / unit + 0.5f) * unit;
      }
      y = at::addmm(bq, xq, wq.t());
    } else {
      y = at::mm(xq, wq.t());
    }
    ctx->save_for_backward({x, weight, xq, wq, w_step, w_strength, a_clip, a_strength});
    ctx->saved_data["w_packed"] = w_packed;  // buffers: no gradient, nothing to version-check
    ctx->saved_data["a_packed"] = a_packed;
    ctx->saved_data["w_inv_tau"] = w_inv_tau;
    ctx->saved_data["a_inv_tau"] = a_inv_tau;
    ctx->saved_data["a_log2_qmax0"] = a_log2_qmax0;
    ctx->saved_data["binary_first"] = binary_first;
    ctx->saved_data["is_signed"] = is_signed;
    ctx->saved_data["has_bias"] = present(bias);
    ctx->saved_data["derived"] = c10::IValue::make_capsule(derived);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &xq = saved[2], &wq = saved[3], &w_step = saved[4],
                 &w_strength = saved[5], &a_clip = saved[6], &a_strength = saved[7];
    const Tensor w_packed = ctx->saved_data["w_packed"].toTensor(), a_packed = ctx->saved_data["a_packed"].toTensor();
    const WeightConsts wc = weight_consts(w_packed, ctx->saved_data["w_inv_tau"].toDouble(),
                                          ctx->saved_data["binary_first"].toBool());
    const ActConsts ac = act_consts(a_packed, ctx->saved_data["a_inv_tau"].toDouble(),
                                    ctx->saved_data["a_log2_qmax0"].toDouble(), ctx->saved_data["is_signed"].toBool());
    const Tensor g = grads[0].contiguous();
    const int64_t batch = x.size(0), in = x.size(1), out = weight.size(0);
    const auto derived = c10::static_intrusive_pointer_cast<DerivedHolder>(ctx->saved_data["derived"].toCapsule());
    const WeightDerived& wd = derived->wd;
    const ActDerived& ad = derived->ad;

    variable_list result(kArgs);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) result[2] = g.sum(0);

    const bool need_w = ctx->needs_input_grad(1) || ctx->needs_input_grad(3) || ctx->needs_input_grad(4);
    if (need_w) {
      const Tensor g_wq = at::mm(g.t(), xq).contiguous();  // dL/dWq [out, in]
      Tensor grad_w = at::empty_like(weight);
      Tensor g_step = at::zeros_like(w_step);
      Tensor g_strength;
      float* gs_ptr = nullptr;
      if (present(w_strength) && ctx->needs_input_grad(4)) {
        g_strength = at::zeros_like(w_strength);
        gs_ptr = g_strength.data_ptr<float>();
      }
      weight_backward(fptr(weight), fptr(g_wq), out, in, wd, wc, fptr(w_step), grad_w.data_ptr<float>(),
                      g_step.data_ptr<float>(), gs_ptr);
      result[1] = grad_w;
      result[3] = g_step;
      result[4] = g_strength;
    }
    const bool need_a = ctx->needs_input_grad(0) || ctx->needs_input_grad(5) || ctx->needs_input_grad(6);
    if (need_a) {
      const Tensor g_xq = at::mm(g, wq).contiguous();  // dL/dxq [B, in]
      Tensor grad_x;
      float* gx_ptr = nullptr;
      if (ctx->needs_input_grad(0)) {
        grad_x = at::empty_like(x);
        gx_ptr = grad_x.data_ptr<float>();
      }
      Tensor g_clip = at::zeros_like(a_clip);
      Tensor g_strength;
      float* gs_ptr = nullptr;
      if (present(a_strength) && ctx->needs_input_grad(6)) {
        g_strength = at::zeros_like(a_strength);
        gs_ptr = g_strength.data_ptr<float>();
      }
      act_backward(fptr(x), fptr(g_xq), batch, in, ad, ac, gx_ptr, g_clip.data_ptr<float>(), gs_ptr);
      result[0] = grad_x;
      result[5] = g_clip;
      result[6] = g_strength;
    }
    return result;
  }
};

Tensor nmp_linear(Tensor x, Tensor weight, c10::optional<Tensor> bias, Tensor w_step, c10::optional<Tensor> w_strength,
                  Tensor a_clip, c10::optional<Tensor> a_strength, Tensor w_packed, Tensor a_packed, double w_inv_tau,
                  double a_inv_tau, double a_log2_qmax0, bool binary_first, bool is_signed) {
  TORCH_CHECK(w_packed.is_contiguous() && a_packed.is_contiguous() && (w_packed.numel() + 1) % 3 == 0 &&
                  (a_packed.numel() + 1) % 6 == 0,
              "nmp_linear: malformed packed quantizer constants");
  const Tensor none = at::empty({0}, x.options());
  return NmpLinear::apply(x, weight, bias.value_or(none).contiguous(), w_step, w_strength.value_or(none).contiguous(),
                          a_clip.contiguous(), a_strength.value_or(none).contiguous(), w_packed, a_packed, w_inv_tau,
                          a_inv_tau, a_log2_qmax0, binary_first, is_signed);
}

// The strength update of _LearnedBits.step_strength (momentum over the gradient normalised by the
// root of its running mean square over the whole quantizer), then the clamp to [0, 1] and, unless
// allow_shrink, to the no-shrink floor (the lower edge of the highest bucket reached).
void step_strength(Tensor strength, Tensor grad, Tensor momentum, Tensor sq, Tensor updates, Tensor floor_,
                   Tensor edges, Tensor thresholds, double lr, double beta1, double beta2, bool allow_shrink) {
  TORCH_CHECK(strength.is_contiguous() && grad.is_contiguous() && momentum.is_contiguous() && floor_.is_contiguous(),
              "step_strength: contiguous tensors expected");
  at::NoGradGuard no_grad;
  const int64_t n = strength.numel();
  float* s = strength.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = momentum.data_ptr<float>();
  float* v = sq.data_ptr<float>();
  float* fl = floor_.data_ptr<float>();
  const float* ed = edges.data_ptr<float>();
  const float* thr = thresholds.data_ptr<float>();
  const int64_t n_thr = thresholds.numel();
  int64_t* t_ptr = updates.data_ptr<int64_t>();
  const int64_t t = ++(*t_ptr);
  const float w1 = static_cast<float>(1.0 - beta1), w2 = static_cast<float>(1.0 - beta2);
  float mean_sq = 0.0f;
  for (int64_t i = 0; i < n; ++i) mean_sq += g[i] * g[i];
  mean_sq /= static_cast<float>(n);
  *v += w2 * (mean_sq - *v);
  const float denom = std::sqrt(*v / static_cast<float>(1.0 - std::pow(beta2, static_cast<double>(t)))) + 1e-12f;
  const float rate = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(t))));
  for (int64_t i = 0; i < n; ++i) {
    m[i] += w1 * (g[i] - m[i]);
    float si = s[i] - rate * (m[i] / denom);
    if (allow_shrink) {
      si = std::min(std::max(si, 0.0f), 1.0f);
    } else {
      si = std::max(std::min(si, 1.0f), fl[i]);
      fl[i] = ed[hard_index(si, thr, n_thr)];
    }
    s[i] = si;
  }
  // The Python caches of mpqat.quant.bits are keyed by version counters: tell them what changed.
  for (const Tensor* t_changed : {&strength, &momentum, &sq, &updates, &floor_}) {
    torch::autograd::impl::bump_version(*t_changed);
  }
}

// step_strength for several quantizers in one call: each entry is [strength, grad, momentum, sq, updates,
// floor, edges, thresholds] (one Python call instead of one per quantizer).
void step_strengths(const std::vector<std::vector<Tensor>>& entries, double lr, double beta1, double beta2,
                    bool allow_shrink) {
  for (const auto& e : entries) {
    TORCH_CHECK(e.size() == 8, "step_strengths: every entry needs 8 tensors");
    step_strength(e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7], lr, beta1, beta2, allow_shrink);
  }
}

// The "bits" cost term of NMP-QAT's regularizer over several quantizers, and its gradient:
// cost = sum_q sum_r coef_q[r] * sum_k pi_k(s_qr) b_qk, with the telescoping sigmoid weights of
// mixing() (the values of mpqat.quant.bits.mixing_weights). coef_q holds one coefficient per strength
// or one for all. Returns the cost (summed in double) and d cost / d s_q for every quantizer.
std::tuple<double, std::vector<Tensor>> expected_bits_cost(const std::vector<Tensor>& strengths,
                                                          const std::vector<Tensor>& thresholds,
                                                          const std::vector<Tensor>& candidates,
                                                          const std::vector<Tensor>& coefs,
                                                          const std::vector<double>& inv_taus) {
  const size_t n_q = strengths.size();
  TORCH_CHECK(thresholds.size() == n_q && candidates.size() == n_q && coefs.size() == n_q && inv_taus.size() == n_q,
              "expected_bits_cost: one threshold, candidate, coefficient tensor and 1/tau per strength");
  double total = 0.0;
  std::vector<Tensor> grads;
  grads.reserve(n_q);
  std::vector<float> pi, dpi;
  for (size_t q = 0; q < n_q; ++q) {
    const Tensor s_t = strengths[q].contiguous(), thr_t = thresholds[q].contiguous(),
                 b_t = candidates[q].contiguous(), c_t = coefs[q].contiguous();
    const int64_t n = s_t.numel(), k = b_t.numel();
    TORCH_CHECK(thr_t.numel() == k - 1 && (c_t.numel() == 1 || c_t.numel() == n),
                "expected_bits_cost: malformed thresholds or coefficients");
    const float *s = fptr(s_t), *thr = fptr(thr_t), *b = fptr(b_t), *coef = fptr(c_t);
    const bool one_coef = c_t.numel() == 1;
    Tensor grad = at::empty_like(s_t);
    float* gr = grad.data_ptr<float>();
    pi.resize(k);
    dpi.resize(k);
    for (int64_t r = 0; r < n; ++r) {
      mixing(s[r], thr, k, static_cast<float>(inv_taus[q]), pi.data(), dpi.data());
      float e = 0.0f, de = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        e += pi[j] * b[j];
        de += dpi[j] * b[j];
      }
      const float c = coef[one_coef ? 0 : r];
      total += static_cast<double>(c) * static_cast<double>(e);
      gr[r] = c * de;
    }
    grads.push_back(grad.view(strengths[q].sizes()));
  }
  return {total, grads};
}

// Adam / AdamW for many small tensors in one call (mpqat.optim: quantizer steps and clips), on
// torch.optim.Adam's state (exp_avg, exp_avg_sq, a float32 step count) so that either can continue
// the other's run. Per tensor: its group's lr, betas, eps, weight decay and whether the decay is
// decoupled (AdamW) or added to the gradient (Adam). The update is torch's
// single-tensor Adam written out (lerp for the first moment, bias corrections in double); it agrees
// with it to float rounding.
void adam_small_tensors(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                        const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                        const std::vector<Tensor>& steps, const std::vector<double>& lrs,
                        const std::vector<double>& beta1s, const std::vector<double>& beta2s,
                        const std::vector<double>& epss, const std::vector<double>& weight_decays,
                        const std::vector<bool>& decoupled) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n &&
                  lrs.size() == n && beta1s.size() == n && beta2s.size() == n && epss.size() == n &&
                  weight_decays.size() == n && decoupled.size() == n,
              "adam_small_tensors: one grad, state and option set per parameter");
  at::NoGradGuard no_grad;
  for (size_t t = 0; t < n; ++t) {
    const Tensor &p_t = params[t], &m_t = exp_avgs[t], &v_t = exp_avg_sqs[t], &s_t = steps[t];
    const Tensor g_t = grads[t].contiguous();
    TORCH_CHECK(p_t.is_contiguous() && m_t.is_contiguous() && v_t.is_contiguous() && p_t.numel() == g_t.numel() &&
                    m_t.numel() == p_t.numel() && v_t.numel() == p_t.numel() && s_t.numel() == 1,
                "adam_small_tensors: contiguous float32 parameters and states of matching sizes expected");
    float* p = p_t.data_ptr<float>();
    float* m = m_t.data_ptr<float>();
    float* v = v_t.data_ptr<float>();
    const float* g = g_t.data_ptr<float>();
    float* step = s_t.data_ptr<float>();
    *step += 1.0f;
    const double lr = lrs[t], beta1 = beta1s[t], beta2 = beta2s[t], wd = weight_decays[t];
    const double count = static_cast<double>(*step);
    const double bias1 = 1.0 - std::pow(beta1, count), bias2 = 1.0 - std::pow(beta2, count);
    const float step_size = static_cast<float>(lr / bias1), bias2_sqrt = static_cast<float>(std::sqrt(bias2));
    const float w1 = static_cast<float>(1.0 - beta1), b2 = static_cast<float>(beta2), w2 = static_cast<float>(1.0 - beta2);
    const float eps = static_cast<float>(epss[t]), decay = static_cast<float>(wd), shrink = static_cast<float>(1.0 - lr * wd);
    const int64_t numel = p_t.numel();
    const bool decoupled_t = decoupled[t];
    for (int64_t i = 0; i < numel; ++i) {
      float gi = g[i];
      if (wd != 0.0) {
        if (decoupled_t) {
          p[i] *= shrink;
        } else {
          gi = gi + decay * p[i];
        }
      }
      m[i] = m[i] + w1 * (gi - m[i]);
      v[i] = v[i] * b2 + w2 * (gi * gi);
      const float denom = std::sqrt(v[i]) / bias2_sqrt + eps;
      p[i] = p[i] - step_size * (m[i] / denom);
    }
    // In-place updates that autograd and mpqat's caches (keyed by version counters) must see.
    for (const Tensor* changed : {&p_t, &m_t, &v_t, &s_t}) torch::autograd::impl::bump_version(*changed);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nmp_linear", &nmp_linear, "NMP-QAT QuantLinear training forward (fused; autograd node with fused backward)");
  m.def("step_strength", &step_strength, "NMP-QAT strength update (in place)");
  m.def("step_strengths", &step_strengths, "NMP-QAT strength updates of several quantizers (in place)");
  m.def("adam_small_tensors", &adam_small_tensors, "Adam/AdamW update of many small float32 tensors (in place)");
  m.def("expected_bits_cost", &expected_bits_cost, "NMP-QAT expected-bits cost of several quantizers and its gradient");
}
