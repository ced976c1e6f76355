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
#include <vector>

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
    const float inv = d.inv_sc[h * d.s_rows + (d.s_rows == 1 ? 0 : o)];
    const float sc = d.sc_h[o];
    const float* row = w + o * in;
    float* dst = wq + o * in;
    if (h == 0 && c.binary_first) {
      for (int64_t i = 0; i < in; ++i) dst[i] = (row[i] >= 0.0f ? 1.0f : -1.0f) * sc;
      continue;
    }
    const float qmax = c.qmax[h], qmin = -c.qmax[h];
#pragma omp simd
    for (int64_t i = 0; i < in; ++i) {
      float r = std::floor(row[i] * inv + 0.5f);
      float code = std::min(std::max(r, qmin), qmax);
      dst[i] = code * sc;
    }
  }
}

// Surrogate backward of the weight quantizer (reference: _WeightSurrogate.backward).
void weight_backward(const float* w, const float* g, int64_t out, int64_t in, const WeightDerived& d,
                     const WeightConsts& c, const float* step, float* grad_w, float* g_step, float* g_strength) {
  const int64_t k_n = d.k;
  std::vector<float> mix(in);
  std::vector<float> inner(k_n), norm(k_n);
  // Sums over rows (a per-layer step or strength) in double: the terms cancel.
  std::vector<double> step_acc(k_n * d.s_rows, 0.0);
  double strength_acc = 0.0;
  const bool has_pi = !d.pi.empty();
  for (int64_t o = 0; o < out; ++o) {
    const int64_t so = d.s_rows == 1 ? 0 : o;
    const int64_t ro = d.r_rows == 1 ? 0 : o;
    const float* __restrict row = w + o * in;
    const float* __restrict grow = g + o * in;
    std::fill(mix.begin(), mix.end(), 0.0f);
    for (int64_t k = 0; k < k_n; ++k) {
      const float inv = d.inv_sc[k * d.s_rows + so];
      const float pi = has_pi ? d.pi[ro * k_n + k] : 1.0f;
      float acc_inner = 0.0f, acc_masked = 0.0f, acc_sq = 0.0f;
      float* __restrict mx = mix.data();
      if (k == 0 && c.binary_first) {
#pragma omp simd reduction(+ : acc_inner, acc_masked, acc_sq)
        for (int64_t i = 0; i < in; ++i) {
          const float code = row[i] >= 0.0f ? 1.0f : -1.0f;
          const float mask = std::fabs(row[i] * inv) <= 1.0f ? 1.0f : 0.0f;
          mx[i] += mask * pi;
          acc_inner += code * grow[i];
          acc_masked += mask * (grow[i] * row[i]);
          acc_sq += code * code;
        }
      } else {
        const float qmax = c.qmax[k], qmin = -c.qmax[k];
#pragma omp simd reduction(+ : acc_inner, acc_masked, acc_sq)
        for (int64_t i = 0; i < in; ++i) {
          const float r = std::floor(row[i] * inv + 0.5f);
          const float code = std::min(std::max(r, qmin), qmax);
          const float mask = r == code ? 1.0f : 0.0f;
          mx[i] += mask * pi;
          acc_inner += code * grow[i];
          acc_masked += mask * (grow[i] * row[i]);
          acc_sq += code * code;
        }
      }
      inner[k] = acc_inner;
      norm[k] = std::max(std::sqrt(acc_sq), 1e-12f);
      // LSQ: d(code * sc)/d sc = code - u * mask, times the gradient scale with the step's sign.
      const float st = step[k * d.s_rows + so];
      const float sign = st > 0.0f ? 1.0f : (st < 0.0f ? -1.0f : 0.0f);
      step_acc[k * d.s_rows + so] += static_cast<double>((acc_inner - acc_masked * inv) * (c.gscale[k] * sign) * pi);
    }
    float* gw = grad_w + o * in;
#pragma omp simd
    for (int64_t i = 0; i < in; ++i) gw[i] = grow[i] * mix[i];
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
    d.step[f] = std::ldexp(1.0f, static_cast<int>(e));
    d.inv_step[f] = std::ldexp(1.0f, -static_cast<int>(e));
    d.qmin[f] = c.qmin[h];
    d.qmax[f] = c.qmax[h];
    d.cgs[f] = d.step[f] * (c.gscale[h] * kLn2);
    if (has_strength) {
      const int64_t rf = d.r_rows == 1 ? 0 : f;
      for (int64_t k = 0; k < d.k; ++k) {
        const int ek = static_cast<int>(base - c.extra[k]);
        d.dpi_steps[k * features + f] = dpi[rf * d.k + k] * std::ldexp(1.0f, ek);
        d.inv_steps[k * features + f] = std::ldexp(1.0f, -ek);
      }
    }
  }
  d.min_step = std::ldexp(1.0f, static_cast<int>(e_min));
  return d;
}

void act_forward(const float* x, int64_t batch, int64_t features, const ActDerived& d, bool is_signed, float* xq) {
  const float* inv = d.inv_step.data();
  const float* step = d.step.data();
  const float* lo = d.qmin.data();
  const float* hi = d.qmax.data();
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = x + b * features;
    float* dst = xq + b * features;
#pragma omp simd
    for (int64_t f = 0; f < features; ++f) {
      const float r = std::floor(row[f] * inv[f] + 0.5f);
      const float code = std::min(std::max(r, is_signed ? lo[f] : 0.0f), hi[f]);
      dst[f] = code * step[f];
    }
  }
}

// Surrogate backward of the activation quantizer (reference: _ActSurrogate.backward). One pass over
// the batch: each row of x and of the gradient is read from memory once, for the input/clip
// gradients and then (from L1) for every candidate's strength term.
void act_backward(const float* x, const float* g, int64_t batch, int64_t features, const ActDerived& d,
                  const ActConsts& c, float* grad_x, float* g_clip, float* g_strength) {
  const float* __restrict inv = d.inv_step.data();
  const float* __restrict hi = d.qmax.data();
  std::vector<float> lo(d.qmin);
  if (!c.is_signed) std::fill(lo.begin(), lo.end(), 0.0f);
  const float* __restrict lop = lo.data();
  std::vector<float> clip_acc(features, 0.0f);
  float* __restrict ca = clip_acc.data();
  const bool strength_terms = g_strength != nullptr && !d.dpi_steps.empty();
  // Double accumulators: the codes of the finer candidates are large (up to 2**16) and their
  // products with the gradient cancel over the batch.
  std::vector<double> inner(strength_terms ? d.k * features : 0, 0.0);
  std::vector<float> clo(d.k), chi(d.k);
  for (int64_t k = 0; k < d.k; ++k) {
    chi[k] = c.cqmax[k];
    clo[k] = c.is_signed ? -c.cqmax[k] : 0.0f;
  }
  for (int64_t b = 0; b < batch; ++b) {
    const float* __restrict row = x + b * features;
    const float* __restrict grow = g + b * features;
    if (grad_x != nullptr) {
      float* __restrict gx = grad_x + b * features;
#pragma omp simd
      for (int64_t f = 0; f < features; ++f) {
        const float u = row[f] * inv[f];
        const float r = std::floor(u + 0.5f);
        const float code = std::min(std::max(r, lop[f]), hi[f]);
        const float pass = r == code ? grow[f] : 0.0f;
        ca[f] += grow[f] * code - pass * u;
        gx[f] = pass;
      }
    } else {
#pragma omp simd
      for (int64_t f = 0; f < features; ++f) {
        const float u = row[f] * inv[f];
        const float r = std::floor(u + 0.5f);
        const float code = std::min(std::max(r, lop[f]), hi[f]);
        const float pass = r == code ? grow[f] : 0.0f;
        ca[f] += grow[f] * code - pass * u;
      }
    }
    if (!strength_terms) continue;
    for (int64_t k = 0; k < d.k; ++k) {
      const float* __restrict invk = d.inv_steps.data() + k * features;
      double* __restrict in = inner.data() + k * features;
      const float lo_k = clo[k], hi_k = chi[k];
#pragma omp simd
      for (int64_t f = 0; f < features; ++f) {
        const float code = std::min(std::max(std::floor(row[f] * invk[f] + 0.5f), lo_k), hi_k);
        in[f] += static_cast<double>(code * grow[f]);
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

WeightConsts weight_consts(const Tensor& thr, const Tensor& qmax, const Tensor& gscale, double inv_tau,
                           bool binary_first) {
  return WeightConsts{fptr(thr), fptr(qmax), fptr(gscale), qmax.numel(), static_cast<float>(inv_tau), binary_first};
}

ActConsts act_consts(const Tensor& thr, const Tensor& extra, const Tensor& qmin, const Tensor& qmax,
                     const Tensor& cqmax, const Tensor& gscale, double inv_tau, double log2_qmax0, bool is_signed) {
  return ActConsts{fptr(thr),  fptr(extra), fptr(qmin), fptr(qmax), fptr(cqmax), fptr(gscale),
                   qmax.numel(), static_cast<float>(inv_tau), static_cast<float>(log2_qmax0), is_signed};
}

// Argument order (forward and the gradients the backward returns):
//  0 x [B, in]   1 weight [out, in]   2 bias [out] or empty
//  3 w_step [K, S, 1]   4 w_strength [R, 1] or empty   5 a_log2_clip [C']   6 a_strength [R'] or empty
//  7.. constant tensors (weight: thresholds, qmax, grad_scale; activation: thresholds, extra bits, qmin,
//  qmax, common qmax, grad_scale) and scalars (1/tau of each, log2 qmax of the lowest activation
//  candidate, binary_first, signed).
struct NmpLinear : public torch::autograd::Function<NmpLinear> {
  static Tensor forward(AutogradContext* ctx, Tensor x, Tensor weight, Tensor bias, Tensor w_step, Tensor w_strength,
                        Tensor a_clip, Tensor a_strength, Tensor w_thr, Tensor w_qmax, Tensor w_gscale, Tensor a_thr,
                        Tensor a_extra, Tensor a_qmin, Tensor a_qmax, Tensor a_cqmax, Tensor a_gscale, double w_inv_tau,
                        double a_inv_tau, double a_log2_qmax0, bool binary_first, bool is_signed) {
    x = x.contiguous();
    weight = weight.contiguous();
    w_step = w_step.contiguous();
    const int64_t batch = x.size(0), in = x.size(1), out = weight.size(0);
    const WeightConsts wc = weight_consts(w_thr, w_qmax, w_gscale, w_inv_tau, binary_first);
    const ActConsts ac = act_consts(a_thr, a_extra, a_qmin, a_qmax, a_cqmax, a_gscale, a_inv_tau, a_log2_qmax0,
                                    is_signed);
    const WeightDerived wd = weight_derived(w_step, w_strength, wc, out);
    const ActDerived ad = act_derived(a_clip, a_strength, ac, in);

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
    ctx->save_for_backward({x, weight, xq, wq, w_step, w_strength, a_clip, a_strength, w_thr, w_qmax, w_gscale, a_thr,
                            a_extra, a_qmin, a_qmax, a_cqmax, a_gscale});
    ctx->saved_data["w_inv_tau"] = w_inv_tau;
    ctx->saved_data["a_inv_tau"] = a_inv_tau;
    ctx->saved_data["a_log2_qmax0"] = a_log2_qmax0;
    ctx->saved_data["binary_first"] = binary_first;
    ctx->saved_data["is_signed"] = is_signed;
    ctx->saved_data["has_bias"] = present(bias);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &xq = saved[2], &wq = saved[3], &w_step = saved[4],
                 &w_strength = saved[5], &a_clip = saved[6], &a_strength = saved[7];
    const WeightConsts wc = weight_consts(saved[8], saved[9], saved[10], ctx->saved_data["w_inv_tau"].toDouble(),
                                          ctx->saved_data["binary_first"].toBool());
    const ActConsts ac = act_consts(saved[11], saved[12], saved[13], saved[14], saved[15], saved[16],
                                    ctx->saved_data["a_inv_tau"].toDouble(), ctx->saved_data["a_log2_qmax0"].toDouble(),
                                    ctx->saved_data["is_signed"].toBool());
    const Tensor g = grads[0].contiguous();
    const int64_t batch = x.size(0), in = x.size(1), out = weight.size(0);
    const WeightDerived wd = weight_derived(w_step, w_strength, wc, out);
    const ActDerived ad = act_derived(a_clip, a_strength, ac, in);

    variable_list result(21);
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
                  Tensor a_clip, c10::optional<Tensor> a_strength, Tensor w_thr, Tensor w_qmax, Tensor w_gscale,
                  Tensor a_thr, Tensor a_extra, Tensor a_qmin, Tensor a_qmax, Tensor a_cqmax, Tensor a_gscale,
                  double w_inv_tau, double a_inv_tau, double a_log2_qmax0, bool binary_first, bool is_signed) {
  const Tensor none = at::empty({0}, x.options());
  return NmpLinear::apply(x, weight, bias.value_or(none).contiguous(), w_step, w_strength.value_or(none).contiguous(),
                          a_clip.contiguous(), a_strength.value_or(none).contiguous(), w_thr, w_qmax, w_gscale, a_thr, a_extra, a_qmin, a_qmax,
                          a_cqmax, a_gscale, w_inv_tau, a_inv_tau, a_log2_qmax0, binary_first, is_signed);
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nmp_linear", &nmp_linear, "NMP-QAT QuantLinear training forward (fused; autograd node with fused backward)");
  m.def("step_strength", &step_strength, "NMP-QAT strength update (in place)");
}
