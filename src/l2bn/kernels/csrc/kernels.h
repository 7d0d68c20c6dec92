// L2BN CPU kernels: the computation behind the operators of l2bn_cpu.cpp (included there; one
// translation unit).
//
// The math is that of src/l2bn/kernels/algebra.py (read its module docstring first); this file
// computes the same quantities in the fewest memory sweeps:
//   train forward  one sweep for the per-(n, c) mean and variance (each row or sample is reread
//                  from cache for the centred variance), the O(N*C) algebra, one sweep y = x*A + B;
//   eval forward   one sweep per sample: its norm, then y = x*A + B while it is still in cache
//                  (samples up to half the L2 cache; larger ones, and batches smaller than the
//                  thread count, in chunks over all threads: x is then read twice);
//   backward       one sweep for the per-(n, c) sums of g and g*x, the algebra, one sweep
//                  dx = g*P + x*Q + R (P, Q, R formed per sample on the fly).
// Layouts: contiguous (N, C, M) rows, and (N, M, C) for channels_last inputs and for M == 1
// (an (N, C) input), where the inner loops run over channels. Any other layout is made
// contiguous first. float32 and float64 accumulate in their own dtype (as the Python backends
// do); float16 and bfloat16 are converted to float32 and back. Outputs keep the input's memory format.
//
// Scale safety (inputs whose squares overflow) is handled by the callers: kernels/autograd.py
// checks the returned norms and recomputes such batches with an exactly rescaled input; the
// single-call layer (layer.h) hands them to that Python path.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

namespace {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr int64_t kGrain = 16384;  // elements per parallel chunk

// bytes of the L2 cache of one core (512 KiB where the system does not say)
inline int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    long v = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)  // glibc; elsewhere the default
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? int64_t(v) : int64_t(512) * 1024;
  }();
  return bytes;
}

template <typename T>
inline T hsum(const Vec<T>& v) {
  alignas(64) T buf[Vec<T>::size()];
  v.store(buf);
  T s = 0;
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += buf[i];
  return s;
}

// ------------------------------------------------------------------ contiguous reductions

template <typename T>
inline T sum_of(const T* p, int64_t n) {
  constexpr int64_t L = Vec<T>::size();
  Vec<T> a0(T(0)), a1(T(0));
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    a0 = a0 + Vec<T>::loadu(p + i);
    a1 = a1 + Vec<T>::loadu(p + i + L);
  }
  T s = hsum<T>(a0 + a1);
  for (; i < n; ++i) s += p[i];
  return s;
}

template <typename T>
inline T centred_sumsq(const T* p, int64_t n, T mean) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> mv(mean);
  // four independent accumulators: the fma latency, not the load, bounds a long row
  Vec<T> a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    Vec<T> d0 = Vec<T>::loadu(p + i) - mv, d1 = Vec<T>::loadu(p + i + L) - mv;
    Vec<T> d2 = Vec<T>::loadu(p + i + 2 * L) - mv, d3 = Vec<T>::loadu(p + i + 3 * L) - mv;
    a0 = at::vec::fmadd(d0, d0, a0);
    a1 = at::vec::fmadd(d1, d1, a1);
    a2 = at::vec::fmadd(d2, d2, a2);
    a3 = at::vec::fmadd(d3, d3, a3);
  }
  for (; i + L <= n; i += L) {
    Vec<T> d0 = Vec<T>::loadu(p + i) - mv;
    a0 = at::vec::fmadd(d0, d0, a0);
  }
  T s = hsum<T>((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) {
    T d = p[i] - mean;
    s += d * d;
  }
  return s;
}

// sums of g and g*(x - shift) over n contiguous entries (the shift, mu / k of the row, makes the
// second sum the centred one that the weight gradient needs, without cancellation)
template <typename T>
inline void grad_sums_of(const T* g, const T* x, int64_t n, T shift, T& sg, T& sgx) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> shv(shift);
  Vec<T> a0(T(0)), a1(T(0)), b0(T(0)), b1(T(0));
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    Vec<T> g0 = Vec<T>::loadu(g + i), g1 = Vec<T>::loadu(g + i + L);
    a0 = a0 + g0;
    a1 = a1 + g1;
    b0 = at::vec::fmadd(g0, Vec<T>::loadu(x + i) - shv, b0);
    b1 = at::vec::fmadd(g1, Vec<T>::loadu(x + i + L) - shv, b1);
  }
  T s = hsum<T>(a0 + a1), t = hsum<T>(b0 + b1);
  for (; i < n; ++i) {
    s += g[i];
    t += g[i] * (x[i] - shift);
  }
  sg = s;
  sgx = t;
}

// y = x * a + b (scalars) over n entries
template <typename T>
inline void affine_row(T* y, const T* x, int64_t n, T a, T b) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> av(a), bv(b);
  int64_t i = 0;
  for (; i + L <= n; i += L) at::vec::fmadd(Vec<T>::loadu(x + i), av, bv).store(y + i);
  for (; i < n; ++i) y[i] = x[i] * a + b;
}

// y[c] = x[c] * a[c] + b[c]
template <typename T>
inline void affine_vec(T* y, const T* x, const T* a, const T* b, int64_t n) {
  constexpr int64_t L = Vec<T>::size();
  int64_t i = 0;
  for (; i + L <= n; i += L)
    at::vec::fmadd(Vec<T>::loadu(x + i), Vec<T>::loadu(a + i), Vec<T>::loadu(b + i)).store(y + i);
  for (; i < n; ++i) y[i] = x[i] * a[i] + b[i];
}

// dx = g * p + x * q + r (scalars) over n entries
template <typename T>
inline void grad_row(T* dx, const T* g, const T* x, int64_t n, T p, T q, T r) {
  constexpr int64_t L = Vec<T>::size();
  const Vec<T> pv(p), qv(q), rv(r);
  int64_t i = 0;
  for (; i + L <= n; i += L)
    at::vec::fmadd(Vec<T>::loadu(g + i), pv, at::vec::fmadd(Vec<T>::loadu(x + i), qv, rv)).store(dx + i);
  for (; i < n; ++i) dx[i] = g[i] * p + (x[i] * q + r);
}

// k = s / max(r, l2_eps), at most the largest finite value (s / l2_eps overflows for an l2_eps
// below the dtype's range; an all-zero sample then still has u = 0 * k = 0, as the reference's 0 / l2_eps)
template <typename T>
inline T scale_of(T s, T r, T l2e) {
  return std::min(s / std::max(r, l2e), std::numeric_limits<T>::max());
}

// whether k^2 * b would overflow (or lose its sign to inf - inf) for the largest |b|
template <typename T>
inline bool big_k(T k, T bmax) {
  const T k2 = k * k, big = std::numeric_limits<T>::max() / T(16);
  return !(k2 < big) || !(k2 * bmax < big);
}

// dx = g * p + (x * k) * kb + (r - x * rad) over n entries: the form for a sample whose k^2
// would overflow (a tiny norm under a tiny l2_eps); x * k is at most s in magnitude
template <typename T>
inline void grad_row_big_k(T* dx, const T* g, const T* x, int64_t n, T p, T k, T kb, T rad, T r) {
  for (int64_t i = 0; i < n; ++i) dx[i] = g[i] * p + ((x[i] * k) * kb + (r - x[i] * rad));
}

// dx[c] = g[c] * p[c] + x[c] * q[c] + r[c]
template <typename T>
inline void grad_vec(T* dx, const T* g, const T* x, const T* p, const T* q, const T* r, int64_t n) {
  constexpr int64_t L = Vec<T>::size();
  int64_t i = 0;
  for (; i + L <= n; i += L)
    at::vec::fmadd(Vec<T>::loadu(g + i), Vec<T>::loadu(p + i),
                   at::vec::fmadd(Vec<T>::loadu(x + i), Vec<T>::loadu(q + i), Vec<T>::loadu(r + i)))
        .store(dx + i);
  for (; i < n; ++i) dx[i] = g[i] * p[i] + (x[i] * q[i] + r[i]);
}

// ---------------------------------------------------------------------------- layouts

struct Layout {
  int64_t n, c, m;
  bool nmc;  // (N, M, C) in memory: channels_last, or M == 1
  at::MemoryFormat format;
};

Layout layout_of(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "l2bn: expected an input of shape (N, C, *), got ", x.sizes());
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t m = (n * c == 0) ? 0 : x.numel() / (n * c);
  if (m == 1) return {n, c, m, true, at::MemoryFormat::Contiguous};
  if (x.is_contiguous()) return {n, c, m, false, at::MemoryFormat::Contiguous};
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return {n, c, m, true, at::MemoryFormat::ChannelsLast};
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return {n, c, m, true, at::MemoryFormat::ChannelsLast3d};
  return {n, c, m, false, at::MemoryFormat::Contiguous};
}

Tensor in_layout(const Tensor& t, const Layout& lay) {
  return t.contiguous(lay.format);
}

bool is_reduced(const Tensor& x) {
  return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
}

void check_input(const Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "l2bn native kernel: ", name, " must be on the CPU, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || is_reduced(x),
              "l2bn native kernel: ", name, " must be float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
}

// half and bfloat16 are computed in float32 (the accumulation dtype); the output is converted back
Tensor widen(const Tensor& x) {
  return is_reduced(x) ? x.to(at::kFloat) : x;
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(!t.defined() || t.device().is_cpu(), "l2bn native kernel: ", name, " must be on the CPU, got ",
              t.device());
}

Tensor vec_param(const std::optional<Tensor>& t, int64_t c, const Tensor& like) {
  if (!t.has_value() || !t->defined()) return Tensor();
  check_cpu(*t, "weight, bias and running statistics");
  TORCH_CHECK(t->numel() == c, "l2bn: expected a per-channel tensor of ", c, " entries, got ", t->sizes());
  return t->to(like.scalar_type()).contiguous();
}

// per-(n, c) mean and biased variance of x (N*C each)
template <typename T>
void row_stats(const T* x, const Layout& lay, T* mean, T* var) {
  const int64_t N = lay.n, C = lay.c, M = lay.m;
  if (!lay.nmc) {
    at::parallel_for(0, N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(M, 1)), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const T* p = x + row * M;
        T mu = sum_of(p, M) / T(M);
        mean[row] = mu;
        var[row] = centred_sumsq(p, M, mu) / T(M);
      }
    });
    return;
  }
  at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(M * C, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* p = x + i * M * C;
      T* mu = mean + i * C;
      T* v = var + i * C;
      std::fill(mu, mu + C, T(0));
      std::fill(v, v + C, T(0));
      for (int64_t s = 0; s < M; ++s) {
        const T* q = p + s * C;
        for (int64_t j = 0; j < C; ++j) mu[j] += q[j];
      }
      for (int64_t j = 0; j < C; ++j) mu[j] /= T(M);
      if (M == 1) continue;
      for (int64_t s = 0; s < M; ++s) {
        const T* q = p + s * C;
        for (int64_t j = 0; j < C; ++j) {
          T d = q[j] - mu[j];
          v[j] += d * d;
        }
      }
      for (int64_t j = 0; j < C; ++j) v[j] /= T(M);
    }
  });
}

// y = x * (a[c] k[n]) + b[c]
template <typename T>
void apply_affine(const T* x, T* y, const Layout& lay, const T* a, const T* k, const T* bvec) {
  const int64_t N = lay.n, C = lay.c, M = lay.m;
  if (!lay.nmc) {
    at::parallel_for(0, N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(M, 1)), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t i = row / C, j = row % C;
        affine_row(y + row * M, x + row * M, M, a[j] * k[i], bvec[j]);
      }
    });
    return;
  }
  at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(M * C, 1)), [&](int64_t b, int64_t e) {
    std::vector<T> arow(C);
    for (int64_t i = b; i < e; ++i) {
      for (int64_t j = 0; j < C; ++j) arow[j] = a[j] * k[i];
      for (int64_t s = 0; s < M; ++s) {
        const int64_t off = (i * M + s) * C;
        affine_vec(y + off, x + off, arow.data(), bvec, C);
      }
    }
  });
}

// column sums over n of f(n, c), parallel over channel blocks
template <typename T, typename F>
void column_sums(int64_t N, int64_t C, T* out, const F& f) {
  at::parallel_for(0, C, std::max<int64_t>(1, kGrain / std::max<int64_t>(N, 1)), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) out[j] = T(0);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = b; j < e; ++j) out[j] += f(i, j);
  });
}


// Rows of an (N, C) array in fixed blocks (their size depends on C only, never on the thread
// count), each block in parallel: `block_fn(begin, end, acc)` adds `nacc` length-C vectors into
// the block's own slot; the slots are then summed in block order. The result is the same bits for
// any number of threads.
inline int64_t row_block(int64_t C) { return std::max<int64_t>(8, kGrain / std::max<int64_t>(C, 1)); }

template <typename T, typename F>
std::vector<T> block_slots(int64_t N, int64_t C, int64_t nacc, const F& block_fn) {
  const int64_t B = row_block(C), nb = (N + B - 1) / B;
  std::vector<T> slots(static_cast<size_t>(nb * nacc * C), T(0));
  at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk)
      block_fn(blk * B, std::min(N, (blk + 1) * B), slots.data() + blk * nacc * C);
  });
  return slots;
}

template <typename T, typename F>
std::vector<T> rows_with_column_sums(int64_t N, int64_t C, int64_t nacc, const F& row_fn) {
  std::vector<T> slots = block_slots<T>(N, C, nacc, [&](int64_t b, int64_t e, T* acc) {
    for (int64_t i = b; i < e; ++i) row_fn(i, acc);
  });
  const int64_t nb = static_cast<int64_t>(slots.size()) / std::max<int64_t>(nacc * C, 1);
  std::vector<T> total(slots.begin(), slots.begin() + nacc * C);
  for (int64_t blk = 1; blk < nb; ++blk)
    for (int64_t j = 0; j < nacc * C; ++j) total[j] += slots[blk * nacc * C + j];
  return total;
}

// ------------------------------------------------------------------------- operators

using TrainOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// (N, C) input (one entry per (n, c)): the row statistics would be as large as x, so none are
// formed. Rows go in fixed blocks (row_block): each block computes its rows' norms, then the
// mean and the centred sum of squares of u = k x over its rows (a second read, from cache), and
// the blocks are combined in order with Chan's formula — accurate for any mean/spread ratio, and
// the same bits for any thread count. Then one sweep y = x * (a_c k_n) + B_c.
template <typename T>
TrainOut train_rows1(const Tensor& x, const Tensor& w, const Tensor& bias, double eps, double l2_eps, double s_d,
                     at::IntArrayRef out_sizes) {
  const int64_t N = x.size(0), C = x.size(1);
  const auto opt = x.options();
  // allocated in the input's own shape ((N, C, 1)), not as a view of an (N, C) tensor: autograd
  // forbids in-place ops on views created inside a custom Function (ReLU(inplace=True) after it)
  Tensor y = at::empty(out_sizes, opt, at::MemoryFormat::Contiguous);
  Tensor r = at::empty({N}, opt), k = at::empty({N}, opt);
  Tensor mu = at::empty({C}, opt), var = at::empty({C}, opt), invstd = at::empty({C}, opt);
  const T s = T(s_d), l2e = T(l2_eps);
  const T* xp = x.const_data_ptr<T>();
  T* rp = r.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  const int64_t B = row_block(C);
  std::vector<T> slots = block_slots<T>(N, C, 2, [&](int64_t b, int64_t e, T* acc) {
    T* mean = acc;
    T* m2 = acc + C;
    for (int64_t i = b; i < e; ++i) {
      const T* p = xp + i * C;
      const T rs = std::sqrt(centred_sumsq(p, C, T(0)));
      const T kk = scale_of(s, rs, l2e);
      rp[i] = rs;
      kp[i] = kk;
      for (int64_t j = 0; j < C; ++j) mean[j] += kk * p[j];
    }
    const T inv = T(1) / T(e - b);
    for (int64_t j = 0; j < C; ++j) mean[j] *= inv;
    for (int64_t i = b; i < e; ++i) {
      const T* p = xp + i * C;
      const T kk = kp[i];
      for (int64_t j = 0; j < C; ++j) {
        const T d = kk * p[j] - mean[j];
        m2[j] += d * d;
      }
    }
  });
  T* mup = mu.data_ptr<T>();
  T* varp = var.data_ptr<T>();
  T* isp = invstd.data_ptr<T>();
  std::vector<T> m2(C);
  for (int64_t j = 0; j < C; ++j) {  // Chan et al.: merge the blocks in order
    T n_a = T(0), mean_a = T(0), m2_a = T(0);
    for (int64_t blk = 0, b = 0; b < N; ++blk, b += B) {
      const T n_b = T(std::min(N, b + B) - b), mean_b = slots[blk * 2 * C + j], m2_b = slots[blk * 2 * C + C + j];
      const T n = n_a + n_b, delta = mean_b - mean_a;
      mean_a += delta * (n_b / n);
      m2_a += m2_b + delta * delta * (n_a * n_b / n);
      n_a = n;
    }
    mup[j] = mean_a;
    m2[j] = m2_a;
  }
  const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
  const T* bp = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  std::vector<T> a(C), bvec(C);
  for (int64_t j = 0; j < C; ++j) {
    varp[j] = m2[j] / T(N);
    isp[j] = T(1) / std::sqrt(varp[j] + T(eps));
    a[j] = wp ? wp[j] * isp[j] : isp[j];
    bvec[j] = bp ? bp[j] - mup[j] * a[j] : -mup[j] * a[j];
  }
  const Layout lay{N, C, 1, true, at::MemoryFormat::Contiguous};
  apply_affine<T>(xp, y.data_ptr<T>(), lay, a.data(), kp, bvec.data());
  return {y, r, k, at::empty({0}, opt), at::empty({0}, opt), mu, var, invstd};
}


template <typename T>
TrainOut train_forward_impl(const Tensor& x_in, const Tensor& w, const Tensor& bias, double eps,
                            double l2_eps, double s_d) {
  const Layout lay = layout_of(x_in);
  const Tensor x = in_layout(x_in, lay);
  const int64_t N = lay.n, C = lay.c, M = lay.m;
  if (M == 1 && N * C > 0) {  // before any allocation: the (N, C) path allocates its own outputs
    return train_rows1<T>(x.reshape({N, C}), w, bias, eps, l2_eps, s_d, x.sizes());
  }
  const auto opt = x.options();
  Tensor y = at::empty_like(x, lay.format);
  Tensor r = at::empty({N}, opt), k = at::empty({N}, opt);
  Tensor mk = at::empty({N, C}, opt), vk = at::empty({N, C}, opt);
  Tensor mu = at::empty({C}, opt), var = at::empty({C}, opt), invstd = at::empty({C}, opt);
  if (N * C * M == 0) {
    mu.zero_(); var.zero_(); invstd.fill_(1.0 / std::sqrt(eps));
    r.zero_(); k.fill_(s_d / l2_eps); mk.zero_(); vk.zero_();
    return {y, r, k, mk, vk, mu, var, invstd};
  }
  const T s = T(s_d), l2e = T(l2_eps);
  const T* xp = x.const_data_ptr<T>();
  T* mkp = mk.data_ptr<T>();
  T* vkp = vk.data_ptr<T>();
  row_stats<T>(xp, lay, mkp, vkp);  // mean and variance of x, scaled in place below
  T* rp = r.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  at::parallel_for(0, N, std::max<int64_t>(1, kGrain / C), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T* m = mkp + i * C;
      T* v = vkp + i * C;
      T ss = 0;
      for (int64_t j = 0; j < C; ++j) ss += v[j] + m[j] * m[j];
      const T rs = std::sqrt(ss * T(M));
      const T kk = scale_of(s, rs, l2e);
      rp[i] = rs;
      kp[i] = kk;
      for (int64_t j = 0; j < C; ++j) {
        m[j] *= kk;
        v[j] = (v[j] * kk) * kk;  // k^2 alone may overflow (a zero row under a tiny l2_eps)
      }
    }
  });
  T* mup = mu.data_ptr<T>();
  T* varp = var.data_ptr<T>();
  T* isp = invstd.data_ptr<T>();
  column_sums<T>(N, C, mup, [&](int64_t i, int64_t j) { return mkp[i * C + j]; });
  for (int64_t j = 0; j < C; ++j) mup[j] /= T(N);
  std::vector<T> vmean(C);
  column_sums<T>(N, C, vmean.data(), [&](int64_t i, int64_t j) { return vkp[i * C + j]; });
  column_sums<T>(N, C, varp, [&](int64_t i, int64_t j) {
    const T d = mkp[i * C + j] - mup[j];
    return d * d;
  });
  const T count = T(N * M);
  std::vector<T> a(C), bvec(C);
  const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
  const T* bp = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  for (int64_t j = 0; j < C; ++j) {
    const T m2 = (vmean[j] / T(N) + varp[j] / T(N)) * count;
    varp[j] = m2 / count;
    isp[j] = T(1) / std::sqrt(varp[j] + T(eps));
    a[j] = wp ? wp[j] * isp[j] : isp[j];
    bvec[j] = bp ? bp[j] - mup[j] * a[j] : -mup[j] * a[j];
  }
  apply_affine<T>(xp, y.data_ptr<T>(), lay, a.data(), kp, bvec.data());
  if (M == 1) {  // row statistics of u are k x and 0: the caller recomputes them (not returned)
    mk = at::empty({0}, opt);
    vk = at::empty({0}, opt);
  }
  return {y, r, k, mk, vk, mu, var, invstd};
}

TrainOut train_forward(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                       double eps, double l2_eps, double s) {
  check_input(x, "input");
  const int64_t c = x.size(1);
  const Tensor xw = widen(x);
  const Tensor w = vec_param(weight, c, xw), b = vec_param(bias, c, xw);
  TrainOut out = AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "l2bn_train_forward",
                                            [&] { return train_forward_impl<scalar_t>(xw, w, b, eps, l2_eps, s); });
  if (is_reduced(x)) std::get<0>(out) = std::get<0>(out).to(x.scalar_type());
  return out;
}

using EvalOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <typename T>
EvalOut eval_forward_impl(const Tensor& x_in, const Tensor& w, const Tensor& bias, const Tensor& mean,
                          const Tensor& var_in, double eps, double l2_eps, double s_d, bool copy_stats = true) {
  const Layout lay = layout_of(x_in);
  const Tensor x = in_layout(x_in, lay);
  const int64_t N = lay.n, C = lay.c, M = lay.m, D = C * M;
  const auto opt = x.options();
  // copies when they are kept for backward (the running statistics may change before it runs)
  Tensor mu = mean.to(x.scalar_type()).contiguous(), var = var_in.to(x.scalar_type()).contiguous();
  if (copy_stats) {
    mu = mu.clone();
    var = var.clone();
  }
  Tensor invstd = at::empty({C}, opt);
  Tensor y = at::empty_like(x, lay.format);
  Tensor r = at::empty({N}, opt), k = at::empty({N}, opt);
  const T* mup = mu.const_data_ptr<T>();
  const T* varp = var.const_data_ptr<T>();
  T* isp = invstd.data_ptr<T>();
  const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
  const T* bp = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  std::vector<T> a(C), bvec(C);
  for (int64_t j = 0; j < C; ++j) {
    isp[j] = T(1) / std::sqrt(varp[j] + T(eps));
    a[j] = wp ? wp[j] * isp[j] : isp[j];
    bvec[j] = bp ? bp[j] - mup[j] * a[j] : -mup[j] * a[j];
  }
  const T s = T(s_d), l2e = T(l2_eps);
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.data_ptr<T>();
  T* rp = r.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  // Each sample is cut into fixed chunks of whole units (channel rows of M entries, or spatial
  // positions of C entries in the (N, M, C) layout); the chunk size depends on the shape only, and
  // a sample's norm is the sum of its chunks' partial sums in order: the same bits for any thread
  // count and either path below.
  const int64_t unit = lay.nmc ? C : M, units = lay.nmc ? M : C;
  const int64_t per = std::max<int64_t>(1, kGrain / std::max<int64_t>(unit, 1));
  const int64_t nch = std::max<int64_t>(1, (units + per - 1) / per);
  auto apply_chunk = [&](int64_t i, int64_t u0, int64_t u1, T kk, T* arow) {
    const T* p = xp + i * D;
    T* q = yp + i * D;
    if (!lay.nmc) {
      for (int64_t j = u0; j < u1; ++j) affine_row(q + j * M, p + j * M, M, a[j] * kk, bvec[j]);
    } else {
      for (int64_t j = 0; j < C; ++j) arow[j] = a[j] * kk;
      for (int64_t sp = u0; sp < u1; ++sp) affine_vec(q + sp * C, p + sp * C, arow, bvec.data(), C);
    }
  };
  // Path (the bits do not depend on it): with at least a sample per thread and samples of at
  // most half the L2 cache, each thread takes whole samples — the norm, then the map while the
  // sample is in cache (x is read once from memory). Otherwise the chunks are spread over the
  // threads (batch-1 inference uses them all): partial sums, then the map, each chunk reread
  // from the cache of the core that summed it where it still holds it. (Summing the next
  // sample while writing the current one was measured too: no steady gain on 16-215 KB samples.)
  const int64_t bytes = D * int64_t(sizeof(T));
  if (N >= at::get_num_threads() && 2 * bytes <= l2_cache_bytes()) {
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
      std::vector<T> arow(lay.nmc ? C : 0);
      for (int64_t i = b; i < e; ++i) {
        T ss = 0;  // the chunks' partial sums in order, as the other path adds them
        for (int64_t u0 = 0; u0 < units; u0 += per)
          ss += centred_sumsq(xp + i * D + u0 * unit, (std::min(units, u0 + per) - u0) * unit, T(0));
        rp[i] = std::sqrt(ss);
        kp[i] = scale_of(s, rp[i], l2e);
        apply_chunk(i, 0, units, kp[i], arow.data());
      }
    });
  } else {
    std::vector<T> part(static_cast<size_t>(N * nch));
    at::parallel_for(0, N * nch, 1, [&](int64_t b, int64_t e) {
      for (int64_t idx = b; idx < e; ++idx) {
        const int64_t i = idx / nch, u0 = (idx % nch) * per, u1 = std::min(units, u0 + per);
        part[idx] = centred_sumsq(xp + i * D + u0 * unit, (u1 - u0) * unit, T(0));
      }
    });
    for (int64_t i = 0; i < N; ++i) {
      T ss = 0;
      for (int64_t ch = 0; ch < nch; ++ch) ss += part[i * nch + ch];
      rp[i] = std::sqrt(ss);
      kp[i] = scale_of(s, rp[i], l2e);
    }
    at::parallel_for(0, N * nch, 1, [&](int64_t b, int64_t e) {
      std::vector<T> arow(lay.nmc ? C : 0);
      for (int64_t idx = b; idx < e; ++idx) {
        const int64_t i = idx / nch, u0 = (idx % nch) * per;
        apply_chunk(i, u0, std::min(units, u0 + per), kp[i], arow.data());
      }
    });
  }
  return {y, r, k, mu, var, invstd};
}

EvalOut eval_forward(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                     const Tensor& mean, const Tensor& var, double eps, double l2_eps, double s) {
  check_input(x, "input");
  check_cpu(mean, "running_mean");
  check_cpu(var, "running_var");
  const int64_t c = x.size(1);
  TORCH_CHECK(mean.numel() == c && var.numel() == c, "l2bn: running statistics must have ", c, " entries");
  const Tensor xw = widen(x);
  const Tensor w = vec_param(weight, c, xw), b = vec_param(bias, c, xw);
  EvalOut out = AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "l2bn_eval_forward", [&] {
    return eval_forward_impl<scalar_t>(xw, w, b, mean, var, eps, l2_eps, s);
  });
  if (is_reduced(x)) std::get<0>(out) = std::get<0>(out).to(x.scalar_type());
  return out;
}

using BackOut = std::tuple<Tensor, Tensor, Tensor>;

// (N, C) backward: one sweep for the column sums of g and k g x, then one sweep per row that
// forms its radial term and writes dx while the row is in cache (no (N, C) intermediates).
template <typename T>
BackOut backward_rows1(const Tensor& g, const Tensor& x, const Tensor& w, const T* kp, const T* rp, const T* mup,
                       const T* isp, double l2_eps, double s_d, bool batch_stats, bool need_dx,
                       at::IntArrayRef out_sizes) {
  const int64_t N = x.size(0), C = x.size(1);
  const auto opt = x.options();
  const T* xp = x.const_data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  std::vector<T> tot = rows_with_column_sums<T>(N, C, 2, [&](int64_t i, T* acc) {
    const T* gr = gp + i * C;
    const T* xr = xp + i * C;
    const T kk = kp[i];
    T* s1 = acc;
    T* s2 = acc + C;
    for (int64_t j = 0; j < C; ++j) {
      s1[j] += gr[j];
      s2[j] += gr[j] * (kk * xr[j] - mup[j]);  // centred: sum g (u - mu), no cancellation
    }
  });
  Tensor grad_w = at::empty({C}, opt), grad_b = at::empty({C}, opt);
  T* gwp = grad_w.data_ptr<T>();
  T* gbp = grad_b.data_ptr<T>();
  for (int64_t j = 0; j < C; ++j) {
    gbp[j] = tot[j];
    gwp[j] = tot[C + j] * isp[j];
  }
  if (!need_dx) return {at::empty({0}, opt), grad_w, grad_b};
  const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
  const T count = T(N), s = T(s_d), l2e = T(l2_eps), inv_s = T(1) / s;
  std::vector<T> a(C), bc(C, T(0)), cc(C, T(0));
  T bcmax = T(0);
  for (int64_t j = 0; j < C; ++j) {
    a[j] = wp ? wp[j] * isp[j] : isp[j];
    if (batch_stats) {
      const T h = tot[C + j] * isp[j];
      bc[j] = -a[j] * h * isp[j] / count;
      cc[j] = -a[j] * tot[j] / count - bc[j] * mup[j];
      bcmax = std::max(bcmax, std::abs(bc[j]));
    }
  }
  Tensor dx = at::empty(out_sizes, opt, at::MemoryFormat::Contiguous);  // the input's shape, not a view
  T* dxp = dx.data_ptr<T>();
  constexpr int64_t L = Vec<T>::size();
  at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* gr = gp + i * C;
      const T* xr = xp + i * C;
      const T kk = kp[i];
      const bool mask = rp[i] > l2e;  // at r == l2_eps no gradient through r (as the reference)
      const T rs = mask ? rp[i] : T(1), inv_rs = T(1) / rs;
      // t_n / r_n = sum_c a g x / r + (b u^2 + c u) / s, with u = k x
      Vec<T> acc1(T(0)), acc2(T(0));
      const Vec<T> kv(kk);
      int64_t j = 0;
      for (; j + L <= C; j += L) {
        const Vec<T> gv = Vec<T>::loadu(gr + j), xv = Vec<T>::loadu(xr + j);
        acc1 = at::vec::fmadd(Vec<T>::loadu(a.data() + j) * gv, xv, acc1);
        if (batch_stats) {
          const Vec<T> u = xv * kv;
          acc2 = at::vec::fmadd(at::vec::fmadd(Vec<T>::loadu(bc.data() + j), u, Vec<T>::loadu(cc.data() + j)), u, acc2);
        }
      }
      T t1 = hsum<T>(acc1), t2 = hsum<T>(acc2);
      for (; j < C; ++j) {
        t1 += a[j] * gr[j] * xr[j];
        if (batch_stats) {
          const T u = xr[j] * kk;
          t2 += (bc[j] * u + cc[j]) * u;
        }
      }
      const T t = t1 * inv_rs + t2 * inv_s;
      const T radial = mask ? (kk * inv_rs) * t : T(0);
      if (big_k(kk, bcmax)) {
        for (int64_t c = 0; c < C; ++c)
          dxp[i * C + c] = gr[c] * (kk * a[c]) + ((xr[c] * kk) * (kk * bc[c]) + (kk * cc[c] - xr[c] * radial));
        continue;
      }
      // dx = g (k a) + x (k^2 b - radial) + k c, the coefficients formed in registers (the same
      // operations as grad_vec on stored p, q, r: the same bits, without three C-long arrays)
      T* dr = dxp + i * C;
      const T k2 = kk * kk;
      const Vec<T> k2v(k2), radv(radial);
      int64_t c = 0;
      for (; c + L <= C; c += L) {
        const Vec<T> pv = Vec<T>::loadu(a.data() + c) * kv;
        const Vec<T> qv = Vec<T>::loadu(bc.data() + c) * k2v - radv;
        const Vec<T> rv = Vec<T>::loadu(cc.data() + c) * kv;
        at::vec::fmadd(Vec<T>::loadu(gr + c), pv, at::vec::fmadd(Vec<T>::loadu(xr + c), qv, rv)).store(dr + c);
      }
      for (; c < C; ++c) dr[c] = gr[c] * (kk * a[c]) + (xr[c] * (k2 * bc[c] - radial) + kk * cc[c]);
    }
  });
  return {dx, grad_w, grad_b};
}

template <typename T>
BackOut backward_impl(const Tensor& g_in, const Tensor& x_in, const Tensor& w, const Tensor& k_t, const Tensor& r_t,
                      const Tensor& mk_t, const Tensor& vk_t, const Tensor& mu_t, const Tensor& is_t, double l2_eps,
                      double s_d, bool batch_stats, bool need_dx) {
  const Layout lay = layout_of(x_in);
  const Tensor x = in_layout(x_in, lay);
  const Tensor g = in_layout(g_in.to(x.scalar_type()), lay);
  const int64_t N = lay.n, C = lay.c, M = lay.m;
  const auto opt = x.options();
  const Tensor kc = k_t.to(x.scalar_type()).contiguous(), rc = r_t.to(x.scalar_type()).contiguous();
  const Tensor muc = mu_t.to(x.scalar_type()).contiguous(), isc = is_t.to(x.scalar_type()).contiguous();
  const T* kp = kc.const_data_ptr<T>();
  const T* rp = rc.const_data_ptr<T>();
  const T* mup = muc.const_data_ptr<T>();
  const T* isp = isc.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  if (M == 1 && N * C > 0) {
    return backward_rows1<T>(g.reshape({N, C}), x.reshape({N, C}), w, kp, rp, mup, isp, l2_eps, s_d,
                             batch_stats, need_dx, x.sizes());
  }
  Tensor grad_w = at::empty({C}, opt), grad_b = at::empty({C}, opt);
  // The row statistics of u (mk, vk) when the forward did not keep them (a caller saving less
  // than N*C*2 values per M*N*C): recomputed here, as the forward computed them — in the
  // contiguous layout from each row while the gradient sweep has it in cache (no extra pass from
  // memory); channels_last in a pass of its own.
  const bool have_mk = mk_t.defined() && mk_t.numel() == N * C;
  const bool recompute = batch_stats && need_dx && !have_mk && M > 1;  // only dx reads them
  Tensor mkc = have_mk ? mk_t.to(x.scalar_type()).contiguous() : (recompute ? at::empty({N, C}, opt) : Tensor());
  Tensor vkc = have_mk && vk_t.defined() ? vk_t.to(x.scalar_type()).contiguous()
                                         : (recompute ? at::empty({N, C}, opt) : Tensor());
  if (recompute && lay.nmc) {
    T* m = mkc.data_ptr<T>();
    T* v = vkc.data_ptr<T>();
    row_stats<T>(xp, lay, m, v);
    for (int64_t i = 0; i < N * C; ++i) {
      const T kk = kp[i / C];
      m[i] *= kk;
      v[i] = (v[i] * kk) * kk;
    }
  }
  // per-(n, c) sums of g and g*x
  Tensor G = at::empty({N, C}, opt), X = at::empty({N, C}, opt);
  T* Gp = G.data_ptr<T>();
  T* Xp = X.data_ptr<T>();
  // Xp holds the centred sums sum_s g (x - mu_c / k_n): k_n times them is sum g (u - mu)
  if (!lay.nmc) {
    T* rm = recompute ? mkc.data_ptr<T>() : nullptr;
    T* rv = recompute ? vkc.data_ptr<T>() : nullptr;
    at::parallel_for(0, N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(M, 1)), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const T* p = xp + row * M;
        const T kk = kp[row / C];
        grad_sums_of(gp + row * M, p, M, mup[row % C] / kk, Gp[row], Xp[row]);
        if (rm) {  // as row_stats and the scaling in train_forward_impl, the same bits
          const T mu = sum_of(p, M) / T(M);
          rm[row] = mu * kk;
          rv[row] = ((centred_sumsq(p, M, mu) / T(M)) * kk) * kk;
        }
      }
    });
  } else {
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(M * C, 1)), [&](int64_t b, int64_t e) {
      std::vector<T> shift(C);
      for (int64_t i = b; i < e; ++i) {
        T* gs = Gp + i * C;
        T* xs = Xp + i * C;
        std::fill(gs, gs + C, T(0));
        std::fill(xs, xs + C, T(0));
        for (int64_t j = 0; j < C; ++j) shift[j] = mup[j] / kp[i];
        for (int64_t sp = 0; sp < M; ++sp) {
          const int64_t off = (i * M + sp) * C;
          for (int64_t j = 0; j < C; ++j) {
            gs[j] += gp[off + j];
            xs[j] += gp[off + j] * (xp[off + j] - shift[j]);
          }
        }
      }
    });
  }
  T* gwp = grad_w.data_ptr<T>();
  T* gbp = grad_b.data_ptr<T>();
  std::vector<T> su(C);
  column_sums<T>(N, C, gbp, [&](int64_t i, int64_t j) { return Gp[i * C + j]; });
  column_sums<T>(N, C, su.data(), [&](int64_t i, int64_t j) { return kp[i] * Xp[i * C + j]; });
  for (int64_t j = 0; j < C; ++j) gwp[j] = su[j] * isp[j];  // su is centred: sum g (u - mu)
  if (!need_dx || N * C * M == 0) {
    Tensor dx = need_dx ? at::zeros_like(x, lay.format) : at::empty({0}, opt);
    return {dx, grad_w, grad_b};
  }
  const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
  const T* mkp = mkc.defined() ? mkc.const_data_ptr<T>() : nullptr;
  const T* vkp = vkc.defined() ? vkc.const_data_ptr<T>() : nullptr;
  const T count = T(N * M), s = T(s_d), l2e = T(l2_eps), msp_s = T(M) / s;
  std::vector<T> a(C), bc(C, T(0)), cc(C, T(0));
  T bcmax = T(0);
  for (int64_t j = 0; j < C; ++j) {
    a[j] = wp ? wp[j] * isp[j] : isp[j];
    if (batch_stats) {
      const T h = su[j] * isp[j];
      bc[j] = -a[j] * h * isp[j] / count;
      cc[j] = -a[j] * gbp[j] / count - bc[j] * mup[j];
      bcmax = std::max(bcmax, std::abs(bc[j]));
    }
  }
  // radial term per sample
  std::vector<T> radial(N);
  at::parallel_for(0, N, std::max<int64_t>(1, kGrain / C), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const bool mask = rp[i] > l2e;  // at r == l2_eps no gradient through r (as the reference)
      const T rs = mask ? rp[i] : T(1);
      const T* X = Xp + i * C;  // centred: X_j + (mu_j / k) G_j is sum_s g x
      const T* Gr = Gp + i * C;
      const T inv_k = T(1) / kp[i];
      T t = 0;
      if (batch_stats) {
        for (int64_t j = 0; j < C; ++j) {
          T mkv, vkv;
          if (mkp) {
            mkv = mkp[i * C + j];
            vkv = vkp ? vkp[i * C + j] : T(0);
          } else {  // M == 1: u = k x, no spread within a row
            mkv = xp[i * C + j] * kp[i];
            vkv = T(0);
          }
          t += a[j] * (X[j] + mup[j] * inv_k * Gr[j]) / rs + (bc[j] * (vkv + mkv * mkv) + cc[j] * mkv) * msp_s;
        }
      } else {
        for (int64_t j = 0; j < C; ++j) t += a[j] * (X[j] + mup[j] * inv_k * Gr[j]);
        t /= rs;
      }
      radial[i] = mask ? (kp[i] / rs) * t : T(0);
    }
  });
  Tensor dx = at::empty_like(x, lay.format);
  T* dxp = dx.data_ptr<T>();
  if (!lay.nmc) {
    at::parallel_for(0, N * C, std::max<int64_t>(1, kGrain / std::max<int64_t>(M, 1)), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t i = row / C, j = row % C;
        const T kk = kp[i];
        if (big_k(kk, bcmax))
          grad_row_big_k(dxp + row * M, gp + row * M, xp + row * M, M, kk * a[j], kk, kk * bc[j], radial[i], kk * cc[j]);
        else
          grad_row(dxp + row * M, gp + row * M, xp + row * M, M, kk * a[j], kk * kk * bc[j] - radial[i], kk * cc[j]);
      }
    });
  } else {
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(M * C, 1)), [&](int64_t b, int64_t e) {
      std::vector<T> p(C), q(C), rr(C);
      for (int64_t i = b; i < e; ++i) {
        const T kk = kp[i];
        if (big_k(kk, bcmax)) {
          for (int64_t sp = 0; sp < M; ++sp) {
            const int64_t off = (i * M + sp) * C;
            for (int64_t j = 0; j < C; ++j)
              dxp[off + j] = gp[off + j] * (kk * a[j]) +
                             ((xp[off + j] * kk) * (kk * bc[j]) + (kk * cc[j] - xp[off + j] * radial[i]));
          }
          continue;
        }
        for (int64_t j = 0; j < C; ++j) {
          p[j] = kk * a[j];
          q[j] = kk * kk * bc[j] - radial[i];
          rr[j] = kk * cc[j];
        }
        for (int64_t sp = 0; sp < M; ++sp) {
          const int64_t off = (i * M + sp) * C;
          grad_vec(dxp + off, gp + off, xp + off, p.data(), q.data(), rr.data(), C);
        }
      }
    });
  }
  return {dx, grad_w, grad_b};
}

BackOut backward(const Tensor& g, const Tensor& x, const std::optional<Tensor>& weight, const Tensor& k,
                 const Tensor& r, const std::optional<Tensor>& mk, const std::optional<Tensor>& vk, const Tensor& mu,
                 const Tensor& invstd, double l2_eps, double s, bool batch_stats, bool need_dx) {
  check_input(x, "input");
  check_cpu(g, "grad_output");
  for (const Tensor* t : {&k, &r, &mu, &invstd}) check_cpu(*t, "the saved statistics");
  if (mk.has_value()) check_cpu(*mk, "the saved statistics");
  if (vk.has_value()) check_cpu(*vk, "the saved statistics");
  TORCH_CHECK(g.sizes() == x.sizes(), "l2bn backward: grad_output shape ", g.sizes(), " != input shape ", x.sizes());
  const int64_t c = x.size(1);
  const Tensor xw = widen(x);
  const Tensor w = vec_param(weight, c, xw);
  const Tensor mkt = mk.has_value() ? *mk : Tensor(), vkt = vk.has_value() ? *vk : Tensor();
  BackOut out = AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "l2bn_backward", [&] {
    return backward_impl<scalar_t>(g, xw, w, k, r, mkt, vkt, mu, invstd, l2_eps, s, batch_stats, need_dx);
  });
  if (is_reduced(x) && need_dx) std::get<0>(out) = std::get<0>(out).to(x.scalar_type());
  return out;
}

}  // namespace
