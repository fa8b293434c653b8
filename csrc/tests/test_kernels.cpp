// C++ tests of the torch-free kernels (run by ctest): the shared row math and the CPU launchers
// against straightforward double-precision loops, and every analytic backward against central
// finite differences of an independent double-precision forward.
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "common/advantages_row.h"
#include "common/dtype.h"
#include "common/rl_math.h"
#include "cpu/kernels.h"

using namespace fastalign;
using Vec = std::vector<float>;
using DVec = std::vector<double>;

namespace {

int failures = 0;
std::mt19937 rng(12345);

void check(bool ok, const char* what, double got = 0, double want = 0) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
  }
}

// |got - want| <= tol * max(1, |want|) elementwise (absolute near 0, relative elsewhere).
void check_close(const Vec& got, const DVec& want, double tol, const char* what) {
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= tol * std::max(1.0, std::fabs(want[i])))) {
      check(false, what, got[i], want[i]);
      return;
    }
  }
}

Vec randn(size_t n, float scale = 1.0f, float shift = 0.0f) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  Vec v(n);
  for (auto& x : v) x = shift + scale * d(rng);
  return v;
}

Vec mask_with_holes(int64_t b, int64_t t) {
  std::bernoulli_distribution keep(0.7);
  Vec m(b * t);
  for (int64_t i = 0; i < b * t; ++i) m[i] = keep(rng) ? 1.0f : 0.0f;
  for (int64_t r = 0; r < b; ++r) m[r * t] = 1.0f;
  if (b > 1)
    for (int64_t i = 0; i < t; ++i) m[(b - 1) * t + i] = 0.0f;  // one all-masked row
  return m;
}

// Central differences of f at x (double), one coordinate at a time.
DVec numeric_grad(const std::function<double(const DVec&)>& f, DVec x, double h = 1e-6) {
  DVec g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double up = f(x);
    x[i] = x0 - h;
    const double down = f(x);
    x[i] = x0;
    g[i] = (up - down) / (2 * h);
  }
  return g;
}

DVec to_double(const Vec& v) { return DVec(v.begin(), v.end()); }

double dot(const DVec& a, const Vec& w) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * w[i];
  return s;
}

// ------------------------------------------------------------------------------ dtype conversion
void test_dtype_conversion() {
  const float values[] = {0.0f, -0.0f, 1.0f, -2.5f, 3.14159265f, 1e-3f, 65504.0f, 1e-6f, 6e-8f, 1e30f};
  for (float x : values) {
    const float b = to_float(from_float<bf16_t>(x));
    check(std::fabs(b - x) <= std::fabs(x) * (1.0f / 256.0f), "bf16 round trip", b, x);
    if (std::fabs(x) <= 65504.0f) {
      const float h = to_float(from_float<fp16_t>(x));
      // fp16: 11 significant bits, subnormals down to 2^-24.
      check(std::fabs(h - x) <= std::max(std::fabs(x) / 2048.0f, 3e-8f), "fp16 round trip", h, x);
    }
  }
  check(std::isinf(to_float(from_float<fp16_t>(1e6f))), "fp16 overflow -> inf");
  check(std::isnan(to_float(from_float<bf16_t>(NAN))), "bf16 NaN stays NaN");
  check(std::isnan(to_float(from_float<fp16_t>(NAN))), "fp16 NaN stays NaN");
  check(to_float(from_float<bf16_t>(1.00390625f)) == 1.0f, "bf16 ties round to even");
}

// ------------------------------------------------------------------------------ logprobs
template <typename T>
void test_logprobs(const char* name, double tol) {
  const int64_t n = 5, vocab = 37;
  const float temperature = 0.7f;
  const int64_t ignore = -100;
  Vec raw = randn(n * vocab, 3.0f);
  std::vector<T> logits(n * vocab);
  Vec as_float(n * vocab);
  for (int64_t i = 0; i < n * vocab; ++i) {
    logits[i] = from_float<T>(raw[i]);
    as_float[i] = to_float(logits[i]);  // the exact input the kernel sees
  }
  std::vector<int64_t> labels = {3, 0, ignore, 36, 17};
  Vec logp(n), entropy(n), lse(n);
  cpu::logprobs_forward<T>(logits.data(), labels.data(), n, vocab, temperature, ignore, logp.data(), entropy.data(),
                           lse.data());
  Vec g_logp = randn(n), g_ent = randn(n);
  std::vector<T> grad(n * vocab);
  cpu::logprobs_backward<T>(logits.data(), labels.data(), lse.data(), entropy.data(), g_logp.data(), g_ent.data(), n,
                            vocab, temperature, ignore, grad.data());
  for (int64_t r = 0; r < n; ++r) {
    const float* z = &as_float[r * vocab];
    double m = -1e300;
    for (int64_t j = 0; j < vocab; ++j) m = std::max(m, z[j] / (double)temperature);
    double s = 0;
    for (int64_t j = 0; j < vocab; ++j) s += std::exp(z[j] / (double)temperature - m);
    const double lse_d = m + std::log(s);
    double ent = 0;
    DVec p(vocab), lp(vocab);
    for (int64_t j = 0; j < vocab; ++j) {
      lp[j] = z[j] / (double)temperature - lse_d;
      p[j] = std::exp(lp[j]);
      ent -= p[j] * lp[j];
    }
    const bool ignored = labels[r] == ignore;
    const double want_logp = ignored ? 0.0 : lp[labels[r]];
    const double want_ent = ignored ? 0.0 : ent;
    check(std::fabs(logp[r] - want_logp) <= 1e-5 * std::max(1.0, std::fabs(want_logp)), name, logp[r], want_logp);
    check(std::fabs(entropy[r] - want_ent) <= 1e-5 * std::max(1.0, want_ent), name, entropy[r], want_ent);
    for (int64_t j = 0; j < vocab; ++j) {
      double want = 0;
      if (!ignored) {
        const double dx = g_logp[r] * ((j == labels[r]) - p[j]) - g_ent[r] * p[j] * (lp[j] + ent);
        want = dx / temperature;
      }
      const double got = to_float(grad[r * vocab + j]);
      if (std::fabs(got - want) > tol * std::max(1.0, std::fabs(want))) {
        check(false, name, got, want);
        break;
      }
    }
  }
}

// ------------------------------------------------------------------------------ advantages
double group_adv_double(const DVec& r, int64_t G, int scale, double eps, int64_t i) {
  const int64_t g0 = (i / G) * G;
  double mean = 0;
  for (int64_t k = 0; k < G; ++k) mean += r[g0 + k];
  mean /= G;
  double denom = 1;
  if (scale == kScaleGroup) {
    double sq = 0;
    for (int64_t k = 0; k < G; ++k) sq += (r[g0 + k] - mean) * (r[g0 + k] - mean);
    denom = (G > 1 ? std::sqrt(sq / (G - 1)) : 0.0) + eps;
  } else if (scale == kScaleBatch) {
    const int64_t n = r.size();
    double bm = 0, sq = 0;
    for (double x : r) bm += x;
    bm /= n;
    for (double x : r) sq += (x - bm) * (x - bm);
    denom = (n > 1 ? std::sqrt(sq / (n - 1)) : 0.0) + eps;
  }
  return (r[i] - mean) / denom;
}

void test_group_advantages() {
  const float eps = 1e-4f;
  for (int scale : {kScaleGroup, kScaleBatch, kScaleNone}) {
    for (int64_t G : {1, 2, 5}) {
      const int64_t n = G * 4;
      // Equal rewards within every group: advantages exactly 0.
      Vec equal(n);
      for (int64_t i = 0; i < n; ++i) equal[i] = 0.1f * static_cast<float>(i / G) + 0.7f;
      Vec out(n, 1.0f);
      cpu::group_advantages(equal.data(), out.data(), n, G, scale, eps);
      for (float a : out) check(a == 0.0f, "group advantages of equal rewards are exactly 0", a, 0);

      Vec r = randn(n);
      cpu::group_advantages(r.data(), out.data(), n, G, scale, eps);
      DVec want(n);
      const DVec rd = to_double(r);
      for (int64_t i = 0; i < n; ++i) want[i] = group_adv_double(rd, G, scale, eps, i);
      check_close(out, want, 1e-5, "group advantages forward");

      Vec g = randn(n), dr(n);
      cpu::group_advantages_backward(r.data(), g.data(), dr.data(), n, G, scale, eps);
      auto f = [&](const DVec& x) {
        double s = 0;
        for (int64_t i = 0; i < n; ++i) s += g[i] * group_adv_double(x, G, scale, eps, i);
        return s;
      };
      check_close(dr, numeric_grad(f, rd), 1e-4, "group advantages backward");
    }
  }
  // RLOO: r_i minus the mean of the others; its backward is itself.
  const int64_t G = 4, n = 12;
  Vec r = randn(n), out(n);
  cpu::rloo_advantages(r.data(), out.data(), n, G);
  DVec want(n);
  for (int64_t i = 0; i < n; ++i) {
    double others = 0;
    for (int64_t k = (i / G) * G; k < (i / G + 1) * G; ++k) others += k == i ? 0 : r[k];
    want[i] = r[i] - others / (G - 1);
  }
  check_close(out, want, 1e-6, "rloo forward");
}

void gae_double(const DVec& r, const DVec& v, const Vec& m, int64_t B, int64_t T, double gamma, double lam, DVec& adv,
                DVec& ret) {
  adv.assign(B * T, 0.0);
  ret.assign(B * T, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    double running = 0, next_value = 0;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t i = b * T + t;
      if (m[i] == 0) continue;
      running = r[i] + gamma * next_value - v[i] + gamma * lam * running;
      adv[i] = running;
      ret[i] = running + v[i];
      next_value = v[i];
    }
  }
}

void test_gae() {
  const int64_t B = 3, T = 11;
  const float gamma = 0.99f, lam = 0.95f;
  Vec r = randn(B * T), v = randn(B * T), m = mask_with_holes(B, T);
  Vec adv(B * T), ret(B * T);
  cpu::gae(r.data(), v.data(), m.data(), adv.data(), ret.data(), B, T, gamma, gamma * lam);
  DVec want_adv, want_ret;
  gae_double(to_double(r), to_double(v), m, B, T, gamma, lam, want_adv, want_ret);
  check_close(adv, want_adv, 1e-5, "gae advantages (with holes)");
  check_close(ret, want_ret, 1e-5, "gae returns (with holes)");

  Vec ga = randn(B * T), gr = randn(B * T), d_r(B * T), d_v(B * T);
  cpu::gae_backward(ga.data(), gr.data(), m.data(), d_r.data(), d_v.data(), B, T, gamma, gamma * lam);
  auto objective = [&](const DVec& rr, const DVec& vv) {
    DVec a, rt;
    gae_double(rr, vv, m, B, T, gamma, lam, a, rt);
    return dot(a, ga) + dot(rt, gr);
  };
  const DVec rd = to_double(r), vd = to_double(v);
  check_close(d_r, numeric_grad([&](const DVec& x) { return objective(x, vd); }, rd), 1e-5, "gae backward rewards");
  check_close(d_v, numeric_grad([&](const DVec& x) { return objective(rd, x); }, vd), 1e-5, "gae backward values");
}

void test_whiten() {
  const int64_t n = 40;
  Vec x = randn(n, 2.0f, 1.0f), m(n);
  for (int64_t i = 0; i < n; ++i) m[i] = (i % 3) ? 1.0f : 0.0f;
  for (bool shift : {true, false}) {
    auto f_all = [&](const DVec& xs, DVec& out) {
      double cnt = 0, sum = 0;
      for (int64_t i = 0; i < n; ++i) cnt += m[i], sum += xs[i] * m[i];
      const double mean = sum / cnt;
      double sq = 0;
      for (int64_t i = 0; i < n; ++i) sq += (xs[i] - mean) * (xs[i] - mean) * m[i];
      const double inv = 1 / std::sqrt(sq / (cnt - 1) + 1e-8);
      out.resize(n);
      for (int64_t i = 0; i < n; ++i) out[i] = ((xs[i] - mean) * inv + (shift ? 0 : mean)) * m[i];
    };
    Vec out(n), stats(4), dx(n), g = randn(n);
    cpu::whiten_forward(x.data(), m.data(), out.data(), stats.data(), n, shift, 1e-8f);
    DVec want;
    f_all(to_double(x), want);
    check_close(out, want, 1e-5, "whiten forward");
    cpu::whiten_backward(g.data(), x.data(), m.data(), stats.data(), dx.data(), n, shift);
    auto f = [&](const DVec& xs) {
      DVec o;
      f_all(xs, o);
      return dot(o, g);
    };
    check_close(dx, numeric_grad(f, to_double(x)), 1e-4, "whiten backward");
  }
}

// ------------------------------------------------------------------------------ losses
// sum_i w_i * token loss_i, with w = scale (per row, or per token) * mask.
double policy_double(const DVec& lp, const Vec& old, const Vec& adv, const Vec& w, const Vec& ref, int64_t B, int64_t T,
                     double clip_low, double clip_high, double beta, int kl_kind) {
  double total = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      const double ratio = std::exp(lp[i] - old[i]);
      const double clipped = std::min(std::max(ratio, 1 - clip_low), 1 + clip_high);
      double pt = -std::min(ratio * adv[b], clipped * adv[b]);
      if (beta > 0) {
        const double d = ref[i] - lp[i];
        const double kl = kl_kind == kKlK1 ? -d : kl_kind == kKlK2 ? 0.5 * d * d
                        : kl_kind == kKlK3 ? std::exp(d) - d - 1 : std::fabs(d);
        pt += beta * kl;
      }
      total += pt * w[i];
    }
  }
  return total;
}

void test_policy_tokens() {
  const int64_t B = 4, T = 9;
  for (bool scale_per_token : {false, true}) {
    for (int kl_kind : {kKlK1, kKlK2, kKlK3, kKlAbs}) {
      Vec lp = randn(B * T, 0.5f, -1.0f), old = randn(B * T, 0.5f, -1.0f), adv = randn(B);
      Vec ref = randn(B * T, 0.5f, -1.0f), m = mask_with_holes(B, T);
      Vec scale = scale_per_token ? randn(B * T, 0.1f, 0.3f) : randn(B, 0.1f, 0.3f), w(B * T);
      for (int64_t i = 0; i < B * T; ++i) w[i] = m[i] * (scale_per_token ? scale[i] : scale[i / T]);
      const PolicyConfig c{0.8f, 1.28f, 0.1f, kl_kind};
      float loss;
      Vec sums(B * 4), d_lp(B * T), d_adv(B);
      cpu::policy_tokens(lp.data(), old.data(), adv.data(), false, m.data(), ref.data(), scale.data(),
                         scale_per_token, B, T, c, &loss, sums.data(), d_lp.data(), d_adv.data(), nullptr, nullptr,
                         nullptr);
      const double want = policy_double(to_double(lp), old, adv, w, ref, B, T, 0.2, 0.28, 0.1, kl_kind);
      check(std::fabs(loss - want) <= 1e-5 * std::max(1.0, std::fabs(want)), "policy tokens loss", loss, want);
      auto f = [&](const DVec& x) { return policy_double(x, old, adv, w, ref, B, T, 0.2, 0.28, 0.1, kl_kind); };
      check_close(d_lp, numeric_grad(f, to_double(lp)), 1e-4, "policy tokens d logp");
    }
  }
}

// Issue 12's options at the token level (two-sided clip delta, dual clip c, KL bias correction, token
// weights tw): the same loss in double, differentiated numerically.
double policy_ext_double(const DVec& lp, const Vec& old, const Vec& adv, const Vec& w, const Vec& ref, const Vec& tw,
                         int64_t B, int64_t T, double clip_low, double clip_high, double beta, double delta,
                         double dual) {
  double total = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      const double ratio = std::exp(lp[i] - old[i]);
      const double clipped = std::min(std::max(ratio, 1 - clip_low), 1 + clip_high);
      double pt = -std::min(std::min(ratio, delta) * adv[b], clipped * adv[b]);
      if (adv[b] < 0) pt = std::min(pt, -dual * adv[b]);
      pt *= tw[i];
      const double d = ref[i] - lp[i];
      pt += beta * (std::exp(d) - d - 1) * ratio;
      total += pt * w[i];
    }
  }
  return total;
}

void test_policy_tokens_ext() {
  const int64_t B = 5, T = 9;
  Vec lp = randn(B * T, 0.5f, -1.0f), old = randn(B * T, 0.5f, -1.0f), adv = randn(B);
  Vec ref = randn(B * T, 0.5f, -1.0f), m = mask_with_holes(B, T), tw = randn(B * T, 0.3f, 0.5f);
  Vec scale = randn(B, 0.1f, 0.3f), w(B * T);
  for (int64_t i = 0; i < B * T; ++i) w[i] = m[i] * scale[i / T];
  PolicyConfig c{0.8f, 1.28f, 0.1f, kKlK3};
  c.delta = 1.6f;
  c.dual_clip = 1.4f;
  c.kl_bias_correction = true;
  float loss;
  Vec sums(B * 4), d_lp(B * T), d_adv(B), d_row(B);
  cpu::policy_tokens(lp.data(), old.data(), adv.data(), false, m.data(), ref.data(), scale.data(), false, B, T, c,
                     &loss, sums.data(), d_lp.data(), d_adv.data(), nullptr, tw.data(), d_row.data());
  auto f = [&](const DVec& x) {
    return policy_ext_double(x, old, adv, w, ref, tw, B, T, 0.2, 0.28, 0.1, 1.6, 1.4);
  };
  const double want = f(to_double(lp));
  check(std::fabs(loss - want) <= 1e-5 * std::max(1.0, std::fabs(want)), "policy tokens ext loss", loss, want);
  check_close(d_lp, numeric_grad(f, to_double(lp)), 1e-4, "policy tokens ext d logp");
  for (int64_t r = 0; r < B; ++r) check(d_row[r] == 0.0f, "policy tokens ext d_row at level token", d_row[r], 0);
}

void test_value_loss() {
  const int64_t n = 30;
  const float clip = 0.2f;
  Vec v = randn(n), old = randn(n, 0.3f), ret = randn(n), m = mask_with_holes(3, 10);
  for (int64_t i = 0; i < n; ++i) old[i] += v[i];
  auto f = [&](const DVec& x) {
    double s = 0, c = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double vc = old[i] + std::min(std::max(x[i] - old[i], -(double)clip), (double)clip);
      s += std::max((x[i] - ret[i]) * (x[i] - ret[i]), (vc - ret[i]) * (vc - ret[i])) * m[i];
      c += m[i];
    }
    return 0.5 * s / std::max(c, 1.0);
  };
  float loss;
  Vec metrics(2), dv(n);
  cpu::value_loss_forward(v.data(), old.data(), ret.data(), m.data(), n, clip, &loss, metrics.data());
  check(std::fabs(loss - f(to_double(v))) <= 1e-5 * std::max(1.0, f(to_double(v))), "value loss forward", loss,
        f(to_double(v)));
  const float one = 1.0f;
  cpu::value_loss_backward(&one, v.data(), old.data(), ret.data(), m.data(), n, clip, dv.data());
  check_close(dv, numeric_grad(f, to_double(v)), 1e-4, "value loss backward");
}

double log_sigmoid_d(double x) { return std::min(x, 0.0) - std::log1p(std::exp(-std::fabs(x))); }

void test_dpo_simpo_bt() {
  const int64_t n = 16;
  const float beta = 0.3f, ls = 0.1f;
  Vec pc = randn(n, 3.0f, -20.0f), pr = randn(n, 3.0f, -20.0f), rc = randn(n, 3.0f, -20.0f), rr = randn(n, 3.0f, -20.0f);
  for (int type : {kDpoSigmoid, kDpoHinge, kDpoIpo, kDpoRobust}) {
    auto loss_of = [&](double delta) {
      const double x = beta * delta;
      if (type == kDpoSigmoid) return -(1 - ls) * log_sigmoid_d(x) - ls * log_sigmoid_d(-x);
      if (type == kDpoHinge) return std::max(0.0, 1 - x);
      if (type == kDpoIpo) return (delta - 1 / (2.0 * beta)) * (delta - 1 / (2.0 * beta));
      return (-(1 - ls) * log_sigmoid_d(x) + ls * log_sigmoid_d(-x)) / (1 - 2 * ls);
    };
    Vec losses(n), cr(n), rj(n), d(n), g = randn(n);
    cpu::dpo_forward(pc.data(), pr.data(), rc.data(), rr.data(), n, beta, type, ls, losses.data(), cr.data(), rj.data());
    cpu::dpo_backward(g.data(), pc.data(), pr.data(), rc.data(), rr.data(), n, beta, type, ls, d.data());
    DVec want(n), want_grad(n);
    for (int64_t i = 0; i < n; ++i) {
      const double delta = ((double)pc[i] - rc[i]) - ((double)pr[i] - rr[i]);
      want[i] = loss_of(delta);
      want_grad[i] = g[i] * (loss_of(delta + 1e-6) - loss_of(delta - 1e-6)) / 2e-6;
    }
    check_close(losses, want, 1e-5, "dpo forward");
    check_close(d, want_grad, 1e-4, "dpo backward");
  }
  // SimPO
  Vec c = randn(n), r = randn(n), losses(n), cr(n), rj(n), d(n), g = randn(n);
  const float gamma = 0.5f;
  cpu::simpo_forward(c.data(), r.data(), n, 2.0f, gamma, ls, losses.data(), cr.data(), rj.data());
  cpu::simpo_backward(g.data(), c.data(), r.data(), n, 2.0f, gamma, ls, d.data());
  DVec want(n), want_grad(n);
  for (int64_t i = 0; i < n; ++i) {
    auto l = [&](double cw) {
      const double z = 2.0 * (cw - r[i]) - gamma;
      return -(1 - ls) * log_sigmoid_d(z) - ls * log_sigmoid_d(-z);
    };
    want[i] = l(c[i]);
    want_grad[i] = g[i] * (l(c[i] + 1e-6) - l(c[i] - 1e-6)) / 2e-6;
  }
  check_close(losses, want, 1e-5, "simpo forward");
  check_close(d, want_grad, 1e-4, "simpo backward");
  // Bradley-Terry with a margin and centering
  const float margin = 0.3f, center = 0.01f;
  auto bt = [&](const DVec& cw, const DVec& rl) {
    double s = 0, sq = 0;
    for (int64_t i = 0; i < n; ++i) {
      s -= log_sigmoid_d(cw[i] - rl[i] - margin);
      sq += (cw[i] + rl[i]) * (cw[i] + rl[i]);
    }
    return s / n + center * sq / n;
  };
  float loss;
  Vec metrics(2), dc(n), drj(n);
  cpu::bradley_terry_forward(c.data(), r.data(), nullptr, margin, n, center, &loss, metrics.data());
  const DVec cd = to_double(c), rd = to_double(r);
  check(std::fabs(loss - bt(cd, rd)) <= 1e-5 * std::max(1.0, bt(cd, rd)), "bradley-terry forward", loss, bt(cd, rd));
  const float one = 1.0f;
  cpu::bradley_terry_backward(&one, c.data(), r.data(), nullptr, margin, n, center, dc.data(), drj.data());
  check_close(dc, numeric_grad([&](const DVec& x) { return bt(x, rd); }, cd), 1e-4, "bradley-terry backward chosen");
  check_close(drj, numeric_grad([&](const DVec& x) { return bt(cd, x); }, rd), 1e-4, "bradley-terry backward rejected");
}

void test_kl_and_sequence_sums() {
  const int64_t B = 3, T = 7, n = B * T;
  Vec lp = randn(n, 1.0f, -2.0f), ref = randn(n, 1.0f, -2.0f), out(n), d(n), g = randn(n);
  for (int kind : {kKlK1, kKlK2, kKlK3, kKlAbs}) {
    cpu::kl_forward(lp.data(), ref.data(), out.data(), n, kind);
    cpu::kl_backward(g.data(), lp.data(), ref.data(), d.data(), n, kind);
    DVec want(n), want_grad(n);
    for (int64_t i = 0; i < n; ++i) {
      auto kl = [&](double x) {
        const double dd = (double)ref[i] - x;
        return kind == kKlK1 ? -dd : kind == kKlK2 ? 0.5 * dd * dd : kind == kKlK3 ? std::expm1(dd) - dd : std::fabs(dd);
      };
      want[i] = kl(lp[i]);
      want_grad[i] = g[i] * (kl(lp[i] + 1e-6) - kl(lp[i] - 1e-6)) / 2e-6;
    }
    check_close(out, want, 1e-5, "kl forward");
    check_close(d, want_grad, 1e-4, "kl backward");
  }
  // k3 keeps its relative precision for a tiny d, where exp(d) - d - 1 in float cancels.
  const float tiny = 1e-3f;
  const double want_tiny = std::expm1((double)tiny) - tiny;
  check(std::fabs(kl_value(tiny, kKlK3) - want_tiny) <= 1e-6 * want_tiny, "k3 near 0", kl_value(tiny, kKlK3), want_tiny);

  Vec m = mask_with_holes(B, T), seq(B), gs = randn(B), dseq(n);
  for (bool average : {false, true}) {
    const int64_t rows = average ? B - 1 : B;  // the all-masked last row has no mean
    cpu::sequence_logprobs_forward(lp.data(), m.data(), seq.data(), rows, T, average);
    cpu::sequence_logprobs_backward(gs.data(), m.data(), dseq.data(), rows, T, average);
    for (int64_t b = 0; b < rows; ++b) {
      double s = 0, c = 0;
      for (int64_t t = 0; t < T; ++t) s += lp[b * T + t] * m[b * T + t], c += m[b * T + t];
      const double want = average ? s / c : s;
      check(std::fabs(seq[b] - want) <= 1e-5 * std::max(1.0, std::fabs(want)), "sequence sum", seq[b], want);
      for (int64_t t = 0; t < T; ++t) {
        const double wg = gs[b] * m[b * T + t] / (average ? c : 1.0);
        check(std::fabs(dseq[b * T + t] - wg) <= 1e-6, "sequence sum backward", dseq[b * T + t], wg);
      }
    }
  }
}

}  // namespace

int main() {
  test_dtype_conversion();
  test_logprobs<float>("logprobs fp32", 1e-5);
  test_logprobs<bf16_t>("logprobs bf16", 1e-2);
  test_logprobs<fp16_t>("logprobs fp16", 2e-3);
  test_group_advantages();
  test_gae();
  test_whiten();
  test_policy_tokens();
  test_policy_tokens_ext();
  test_value_loss();
  test_dpo_simpo_bt();
  test_kl_and_sequence_sums();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all kernel checks passed\n");
  return 0;
}
