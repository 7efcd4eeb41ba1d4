"""C++ source of the fused CPU sparse-attention kernel (compiled at first use by
:mod:`fibo.attention.backends.cpu_sparse` with :func:`torch.utils.cpp_extension.load_inline`).

Kept as a Python string so it ships with the package without package-data configuration.

Data layout: ``q, k, v`` are ``(B, H, L, d)`` with any strides over B, H, L and stride 1 over d.
The pattern is a CSR table over the ``H * L`` rows ``r = h * L + query``: keys of row ``r`` are
``cols[row_ptr[r] : row_ptr[r + 1]]`` (int32 key indices in ``[0, L)``). The ``L x L`` matrix and
gathered keys are never materialised.

Forward, per query row (parallel over all ``B H L`` rows): the row's scores (a buffer of ``|row|``
floats), their max, ``p = exp(s - max)`` (vectorised), ``out = sum p v / sum p`` and the row's
log-sum-exp, which is saved for the backward.

Backward (FlashAttention-2 style, one pass): ``delta = dO . O`` per row, then per query row
``p = exp(s - lse)``, ``dp = dO . v``, ``ds = p (dp - delta)``; ``dq += ds k`` in registers and
``dk[key] += ds q``, ``dv[key] += p dO`` straight into the key rows. The ``(b, h)`` slice (or, when
there are fewer slices than ``4 x`` threads, a block of its queries with a private ``dk``/``dv``
buffer summed at the end) belongs to one thread, so there are no atomics and no races. Every
``(query, key)`` pair costs 2 dot products and 3 axpys of length ``d`` (the forward: 1 and 1), and
q, k, v, out, dout are read once and dq, dk, dv written once per slice.

Inner loops: for fp32 with ``d`` a multiple of 8 (16, 32, 64, 128 compiled in) and an AVX2+FMA
build (``-march=native``), AVX2 intrinsics with ``d`` known at compile time (four dot products at
a time, a Cephes-style ``exp`` accurate to ~2 ulp); otherwise plain loops (``#pragma omp simd``)
with ``std::exp`` (fp64 is exact to rounding).
"""

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FIBO_AVX2 1
#endif

namespace {
// ---------------------------------------------------------------- vector ops on rows of length D

template <typename T>
struct GenericOps {  // any dtype, any D (runtime)
  int64_t D;
  explicit GenericOps(int64_t d) : D(d) {}
  inline T dot(const T* __restrict a, const T* __restrict b) const {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < D; ++i) s += a[i] * b[i];
    return s;
  }
  // out[0..3] = a . b_r
  inline void dot4(const T* a, const T* b0, const T* b1, const T* b2, const T* b3, T* out) const {
    out[0] = dot(a, b0); out[1] = dot(a, b1); out[2] = dot(a, b2); out[3] = dot(a, b3);
  }
  // out[r] = a_r . b_r (four independent pairs)
  inline void dot4x(const T* a0, const T* b0, const T* a1, const T* b1, const T* a2, const T* b2, const T* a3,
                    const T* b3, T* out) const {
    out[0] = dot(a0, b0); out[1] = dot(a1, b1); out[2] = dot(a2, b2); out[3] = dot(a3, b3);
  }
  inline void axpy(T alpha, const T* __restrict x, T* __restrict y) const {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) y[i] += alpha * x[i];
  }
  // y = alpha * x
  inline void scale_to(T alpha, const T* __restrict x, T* __restrict y) const {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) y[i] = alpha * x[i];
  }
  inline void zero(T* y) const { std::fill(y, y + D, T(0)); }
  // p[j] = exp(s[j] - m); returns sum p
  static inline T exp_shift(const T* s, T m, T* p, int64_t n) {
    T sum = 0;
    for (int64_t j = 0; j < n; ++j) { p[j] = std::exp(s[j] - m); sum += p[j]; }
    return sum;
  }
};

#ifdef FIBO_AVX2
inline float hsum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Cephes expf: x clamped to [-88.38, 88.38], exp(x) = 2^n * e^r, |r| <= ln2/2, degree-5 polynomial.
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

template <int NV>  // fp32, D = 8 * NV known at compile time
struct AvxOps {
  static constexpr int64_t D = 8 * NV;
  explicit AvxOps(int64_t) {}
  inline float dot(const float* a, const float* b) const {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int c = 0;
    for (; c + 1 < NV; c += 2) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + 8 * c), _mm256_loadu_ps(b + 8 * c), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + 8 * c + 8), _mm256_loadu_ps(b + 8 * c + 8), s1);
    }
    if (c < NV) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + 8 * c), _mm256_loadu_ps(b + 8 * c), s0);
    return hsum8(_mm256_add_ps(s0, s1));
  }
  inline void dot4(const float* a, const float* b0, const float* b1, const float* b2, const float* b3, float* out) const {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    for (int c = 0; c < NV; ++c) {
      const __m256 x = _mm256_loadu_ps(a + 8 * c);
      s0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b0 + 8 * c), s0);
      s1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b1 + 8 * c), s1);
      s2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b2 + 8 * c), s2);
      s3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b3 + 8 * c), s3);
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  inline void dot4x(const float* a0, const float* b0, const float* a1, const float* b1, const float* a2,
                    const float* b2, const float* a3, const float* b3, float* out) const {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    for (int c = 0; c < NV; ++c) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0 + 8 * c), _mm256_loadu_ps(b0 + 8 * c), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1 + 8 * c), _mm256_loadu_ps(b1 + 8 * c), s1);
      s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2 + 8 * c), _mm256_loadu_ps(b2 + 8 * c), s2);
      s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3 + 8 * c), _mm256_loadu_ps(b3 + 8 * c), s3);
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  inline void axpy(float alpha, const float* x, float* y) const {
    const __m256 a = _mm256_set1_ps(alpha);
    for (int c = 0; c < NV; ++c)
      _mm256_storeu_ps(y + 8 * c, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + 8 * c), _mm256_loadu_ps(y + 8 * c)));
  }
  inline void scale_to(float alpha, const float* x, float* y) const {
    const __m256 a = _mm256_set1_ps(alpha);
    for (int c = 0; c < NV; ++c) _mm256_storeu_ps(y + 8 * c, _mm256_mul_ps(a, _mm256_loadu_ps(x + 8 * c)));
  }
  inline void zero(float* y) const {
    for (int c = 0; c < NV; ++c) _mm256_storeu_ps(y + 8 * c, _mm256_setzero_ps());
  }
  static inline float exp_shift(const float* s, float m, float* p, int64_t n) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
      _mm256_storeu_ps(p + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum8(acc);
    if (j < n) {  // tail: through a padded buffer, so the same exp is used everywhere
      alignas(32) float buf[8];
      for (int t = 0; t < 8; ++t) buf[t] = j + t < n ? s[j + t] : -std::numeric_limits<float>::infinity();
      const __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(buf), mv));
      _mm256_store_ps(buf, e);
      for (int t = 0; j + t < n; ++t) { p[j + t] = buf[t]; sum += buf[t]; }
    }
    return sum;
  }
};
#endif

// ---------------------------------------------------------------- shapes

struct View4 {  // strides of a (B, H, L, d) tensor with stride 1 over d
  int64_t sb, sh, sl;
  explicit View4(const at::Tensor& t) : sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)) {}
  inline int64_t at(int64_t b, int64_t h, int64_t l) const { return b * sb + h * sh + l * sl; }
};

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& row_ptr, const at::Tensor& cols) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "fibo sparse attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(), "fibo sparse attention: q, k, v must be (B, H, L, d) of one shape");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "fibo sparse attention: head dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "fibo sparse attention: q, k, v dtypes differ");
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && cols.scalar_type() == at::kInt, "fibo sparse attention: row_ptr int64, cols int32");
  TORCH_CHECK(row_ptr.is_contiguous() && cols.is_contiguous(), "fibo sparse attention: table must be contiguous");
  TORCH_CHECK(row_ptr.numel() == q.size(1) * q.size(2) + 1, "fibo sparse attention: table has ", row_ptr.numel() - 1,
              " rows, expected H*L = ", q.size(1) * q.size(2));
}

// ---------------------------------------------------------------- prefetch

// Rows of one (b, h) slice are H * d (or 3 H d) floats apart, so nearly every row starts a new
// 4 KiB page and the hardware prefetchers (which stop at page boundaries) miss them: the next
// block's rows are prefetched into L2 by hand.
template <typename T>
inline void prefetch_row(const T* p, int64_t D) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < D * (int64_t)sizeof(T); off += 64) __builtin_prefetch(c + off, 0, 2);
}

// q (and extra) rows of queries [q0, q1) and the k, v rows of each row's largest key (the keys
// first touched by this block; the smaller ones were keys of earlier blocks).
template <typename T>
inline void prefetch_block(int64_t q0, int64_t q1, int64_t h, int64_t L, int64_t D, const int64_t* rp, const int32_t* cl,
                           const T* qb, int64_t sq, const T* kb, int64_t sk, const T* vb, int64_t sv,
                           const T* xb = nullptr, int64_t sx = 0, const T* yb = nullptr, int64_t sy = 0) {
  for (int64_t qi = q0; qi < q1; ++qi) {
    const int64_t r = h * L + qi, n = rp[r + 1] - rp[r];
    prefetch_row(qb + qi * sq, D);
    if (xb) prefetch_row(xb + qi * sx, D);
    if (yb) prefetch_row(yb + qi * sy, D);
    if (n > 0 && n <= 64) {
      const int64_t key = cl[rp[r + 1] - 1];
      prefetch_row(kb + key * sk, D);
      prefetch_row(vb + key * sv, D);
    }
  }
}

// ---------------------------------------------------------------- blocked traversal

// Queries are processed in blocks of BQ; inside a block, entry e of every row is visited before
// entry e + 1 ("entry-major"). For an offset pattern entry e of consecutive rows is one offset, so
// the keys (and dk, dv rows) of one step are consecutive rows: streamed, not gathered at random.
// Rows with more than LONG keys (the dense CLS row) are processed on their own, row by row.
constexpr int64_t BQ = 32;
constexpr int64_t LONG = 64;

template <typename T>
struct Scratch {  // per-thread buffers
  std::vector<T> qs, s, p, dp, x, delta, lse;
  std::vector<int64_t> qi, n, act;
  std::vector<const int32_t*> keys;
  std::vector<T> lq, rs, rp_, rdp;  // long rows
  explicit Scratch(int64_t D)
      : qs(BQ * D), s(BQ * LONG), p(BQ * LONG), dp(BQ), x(BQ), delta(BQ), lse(BQ), qi(BQ), n(BQ), act(BQ),
        keys(BQ), lq(D), rs(64), rp_(64), rdp(64) {}
  void fit_long(int64_t n_) {
    if ((int64_t)rs.size() < n_) { rs.resize(n_); rp_.resize(n_); rdp.resize(n_); }
  }
};

// the slots of block [blk, blk_end) still active at entry e
inline int64_t active(const std::vector<int64_t>& n, int64_t nr, int64_t e, std::vector<int64_t>& act) {
  int64_t na = 0;
  for (int64_t t = 0; t < nr; ++t)
    if (e < n[t]) act[na++] = t;
  return na;
}

// ---------------------------------------------------------------- forward

template <typename T, typename Ops>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& lse, const int64_t* rp, const int32_t* cl, T sc) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const Ops ops(D);
  View4 vq(q), vk(k), vv(v), vo(out);
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  T* O = out.data_ptr<T>();
  T* LSE = lse.data_ptr<T>();
  const int64_t nblk = (L + BQ - 1) / BQ;
  at::parallel_for(0, B * H * nblk, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> w(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nblk, b = bh / H, h = bh % H, blk = (task % nblk) * BQ, blk_end = std::min(L, blk + BQ);
      const T* kb = K + vk.at(b, h, 0);
      const T* vb = V + vv.at(b, h, 0);
      const int64_t sk = vk.sl, sv = vv.sl;
      T* lse_row = LSE + bh * L;
      for (int64_t p0 = blk == 0 ? 0 : blk_end; p0 <= blk_end && p0 < L; p0 += BQ)  // the first block: itself too
        prefetch_block(p0, std::min(L, p0 + BQ), h, L, D, rp, cl, Q + vq.at(b, h, 0), vq.sl, kb, sk, vb, sv,
                       (const T*)(O + vo.at(b, h, 0)), vo.sl);
      int64_t nr = 0, maxn = 0;
      for (int64_t qi = blk; qi < blk_end; ++qi) {
        const int64_t r = h * L + qi, start = rp[r], n = rp[r + 1] - start;
        const int32_t* keys = cl + start;
        T* op = O + vo.at(b, h, qi);
        if (n == 0) {  // no key: output 0, lse -inf (never produced by fibo tables)
          ops.zero(op);
          lse_row[qi] = -std::numeric_limits<T>::infinity();
          continue;
        }
        if (n > LONG) {  // a long row on its own
          w.fit_long(n);
          T* qs = w.lq.data();
          ops.scale_to(sc, Q + vq.at(b, h, qi), qs);
          int64_t j = 0;
          for (; j + 4 <= n; j += 4) {
            if (j + 16 < n) for (int u = 0; u < 4; ++u) { prefetch_row(kb + keys[j + 16 + u] * sk, D); prefetch_row(vb + keys[j + 16 + u] * sv, D); }
            ops.dot4(qs, kb + keys[j] * sk, kb + keys[j + 1] * sk, kb + keys[j + 2] * sk, kb + keys[j + 3] * sk, w.rs.data() + j);
          }
          for (; j < n; ++j) w.rs[j] = ops.dot(qs, kb + keys[j] * sk);
          T m = w.rs[0];
          for (j = 1; j < n; ++j) m = w.rs[j] > m ? w.rs[j] : m;
          const T sum = Ops::exp_shift(w.rs.data(), m, w.rp_.data(), n);
          const T inv = T(1) / sum;
          ops.scale_to(w.rp_[0] * inv, vb + keys[0] * sv, op);
          for (j = 1; j < n; ++j) ops.axpy(w.rp_[j] * inv, vb + keys[j] * sv, op);
          lse_row[qi] = m + std::log(sum);
          continue;
        }
        w.qi[nr] = qi; w.n[nr] = n; w.keys[nr] = keys;
        ++nr;
        maxn = std::max(maxn, n);
      }
      if (nr == 0) continue;
      for (int64_t t = 0; t < nr; ++t) ops.scale_to(sc, Q + vq.at(b, h, w.qi[t]), w.qs.data() + t * D);
      // sweep 1: scores s[t][e]
      for (int64_t e = 0; e < maxn; ++e) {
        const int64_t na = active(w.n, nr, e, w.act);
        int64_t a = 0;
        for (; a + 4 <= na; a += 4) {
          const int64_t t0 = w.act[a], t1 = w.act[a + 1], t2 = w.act[a + 2], t3 = w.act[a + 3];
          T r4[4];
          ops.dot4x(w.qs.data() + t0 * D, kb + w.keys[t0][e] * sk, w.qs.data() + t1 * D, kb + w.keys[t1][e] * sk,
                    w.qs.data() + t2 * D, kb + w.keys[t2][e] * sk, w.qs.data() + t3 * D, kb + w.keys[t3][e] * sk, r4);
          w.s[t0 * LONG + e] = r4[0]; w.s[t1 * LONG + e] = r4[1]; w.s[t2 * LONG + e] = r4[2]; w.s[t3 * LONG + e] = r4[3];
        }
        for (; a < na; ++a) {
          const int64_t t = w.act[a];
          w.s[t * LONG + e] = ops.dot(w.qs.data() + t * D, kb + w.keys[t][e] * sk);
        }
      }
      // softmax per row; p scaled by 1 / sum
      for (int64_t t = 0; t < nr; ++t) {
        T* st = w.s.data() + t * LONG;
        const int64_t n = w.n[t];
        T m = st[0];
        for (int64_t j = 1; j < n; ++j) m = st[j] > m ? st[j] : m;
        T* pt = w.p.data() + t * LONG;
        const T sum = Ops::exp_shift(st, m, pt, n);
        const T inv = T(1) / sum;
        for (int64_t j = 0; j < n; ++j) pt[j] *= inv;
        lse_row[w.qi[t]] = m + std::log(sum);
        ops.zero(O + vo.at(b, h, w.qi[t]));
      }
      // sweep 2: out[t] += p[t][e] v[key]
      for (int64_t e = 0; e < maxn; ++e) {
        const int64_t na = active(w.n, nr, e, w.act);
        for (int64_t a = 0; a < na; ++a) {
          const int64_t t = w.act[a];
          ops.axpy(w.p[t * LONG + e], vb + w.keys[t][e] * sv, O + vo.at(b, h, w.qi[t]));
        }
      }
    }
  });
}

// ---------------------------------------------------------------- backward

// One task: queries [q0, q1) of slice (b, h); dk/dv rows go to DKt/DVt (row stride skt/svt).
template <typename T, typename Ops>
struct BackwardTask {
  const Ops& ops;
  const T *Q, *K, *V, *O, *G, *LSE;
  T* DQ;
  View4 vq, vk, vv, vo, vg, vdq;
  const int64_t* rp;
  const int32_t* cl;
  int64_t H, L;
  T sc;
  int64_t D;

  void run(int64_t b, int64_t h, int64_t q0, int64_t q1, T* DKt, int64_t skt, T* DVt, int64_t svt, Scratch<T>& w) const {
    const T* kb = K + vk.at(b, h, 0);
    const T* vb = V + vv.at(b, h, 0);
    const int64_t sk = vk.sl, sv = vv.sl;
    const T* lse = LSE + (b * H + h) * L;
    for (int64_t blk = q0; blk < q1; blk += BQ) {
      const int64_t blk_end = std::min(q1, blk + BQ);
      for (int64_t p0 = blk == q0 ? q0 : blk_end; p0 <= blk_end && p0 < q1; p0 += BQ)  // the first block: itself too
        prefetch_block(p0, std::min(q1, p0 + BQ), h, L, D, rp, cl, Q + vq.at(b, h, 0), vq.sl, kb, sk, vb, sv,
                       G + vg.at(b, h, 0), vg.sl, O + vo.at(b, h, 0), vo.sl);
      int64_t nr = 0, maxn = 0;
      for (int64_t qi = blk; qi < blk_end; ++qi) {
        const int64_t r = h * L + qi, start = rp[r], n = rp[r + 1] - start;
        const int32_t* keys = cl + start;
        T* dqp = DQ + vdq.at(b, h, qi);
        ops.zero(dqp);
        if (n == 0) continue;
        const T* gp = G + vg.at(b, h, qi);
        const T delta = ops.dot(gp, O + vo.at(b, h, qi));
        if (n > LONG) {  // a long row on its own
          long_row(n, keys, Q + vq.at(b, h, qi), gp, delta, lse[qi], kb, vb, dqp, DKt, skt, DVt, svt, w);
          continue;
        }
        ops.scale_to(sc, Q + vq.at(b, h, qi), w.qs.data() + nr * D);
        w.qi[nr] = qi; w.n[nr] = n; w.keys[nr] = keys; w.delta[nr] = delta; w.lse[nr] = lse[qi];
        ++nr;
        maxn = std::max(maxn, n);
      }
      for (int64_t e = 0; e < maxn; ++e) {
        const int64_t na = active(w.n, nr, e, w.act);
        int64_t a = 0;
        for (; a + 4 <= na; a += 4) {
          const int64_t t0 = w.act[a], t1 = w.act[a + 1], t2 = w.act[a + 2], t3 = w.act[a + 3];
          const int64_t k0 = w.keys[t0][e], k1 = w.keys[t1][e], k2 = w.keys[t2][e], k3 = w.keys[t3][e];
          ops.dot4x(w.qs.data() + t0 * D, kb + k0 * sk, w.qs.data() + t1 * D, kb + k1 * sk,
                    w.qs.data() + t2 * D, kb + k2 * sk, w.qs.data() + t3 * D, kb + k3 * sk, w.x.data() + a);
          ops.dot4x(G + vg.at(b, h, w.qi[t0]), vb + k0 * sv, G + vg.at(b, h, w.qi[t1]), vb + k1 * sv,
                    G + vg.at(b, h, w.qi[t2]), vb + k2 * sv, G + vg.at(b, h, w.qi[t3]), vb + k3 * sv, w.dp.data() + a);
        }
        for (; a < na; ++a) {
          const int64_t t = w.act[a], key = w.keys[t][e];
          w.x[a] = ops.dot(w.qs.data() + t * D, kb + key * sk);
          w.dp[a] = ops.dot(G + vg.at(b, h, w.qi[t]), vb + key * sv);
        }
        for (a = 0; a < na; ++a) w.x[a] -= w.lse[w.act[a]];
        Ops::exp_shift(w.x.data(), T(0), w.p.data(), na);  // p = exp(s - lse)
        for (a = 0; a < na; ++a) {
          const int64_t t = w.act[a], key = w.keys[t][e], qi = w.qi[t];
          const T pj = w.p[a], ds = pj * (w.dp[a] - w.delta[t]);  // dL/ds (unscaled score)
          ops.axpy(ds * sc, kb + key * sk, DQ + vdq.at(b, h, qi));
          ops.axpy(ds, w.qs.data() + t * D, DKt + key * skt);  // dk += ds * scale * q
          ops.axpy(pj, G + vg.at(b, h, qi), DVt + key * svt);
        }
      }
    }
  }

  void long_row(int64_t n, const int32_t* keys, const T* qp, const T* gp, T delta, T l, const T* kb, const T* vb,
                T* dqp, T* DKt, int64_t skt, T* DVt, int64_t svt, Scratch<T>& w) const {
    const int64_t sk = vk.sl, sv = vv.sl;
    w.fit_long(n);
    T* qs = w.lq.data();
    ops.scale_to(sc, qp, qs);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      if (j + 16 < n) for (int u = 0; u < 4; ++u) { prefetch_row(kb + keys[j + 16 + u] * sk, D); prefetch_row(vb + keys[j + 16 + u] * sv, D); }
      const int32_t k0 = keys[j], k1 = keys[j + 1], k2 = keys[j + 2], k3 = keys[j + 3];
      ops.dot4(qs, kb + k0 * sk, kb + k1 * sk, kb + k2 * sk, kb + k3 * sk, w.rs.data() + j);
      ops.dot4(gp, vb + k0 * sv, vb + k1 * sv, vb + k2 * sv, vb + k3 * sv, w.rdp.data() + j);
    }
    for (; j < n; ++j) {
      w.rs[j] = ops.dot(qs, kb + keys[j] * sk);
      w.rdp[j] = ops.dot(gp, vb + keys[j] * sv);
    }
    Ops::exp_shift(w.rs.data(), l, w.rp_.data(), n);
    for (j = 0; j < n; ++j) {
      const int64_t key = keys[j];
      const T ds = w.rp_[j] * (w.rdp[j] - delta);
      ops.axpy(ds * sc, kb + key * sk, dqp);
      ops.axpy(ds, qs, DKt + key * skt);
      ops.axpy(w.rp_[j], gp, DVt + key * svt);
    }
  }
};

template <typename T, typename Ops>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                   const at::Tensor& dv, const int64_t* rp, const int32_t* cl, T sc) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const Ops ops(D);
  const BackwardTask<T, Ops> proto{ops, q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), out.data_ptr<T>(),
                                   grad_out.data_ptr<T>(), lse.data_ptr<T>(), dq.data_ptr<T>(),
                                   View4(q), View4(k), View4(v), View4(out), View4(grad_out), View4(dq),
                                   rp, cl, H, L, sc, D};
  View4 vdk(dk), vdv(dv);
  T* DK = dk.data_ptr<T>();
  T* DV = dv.data_ptr<T>();
  const int64_t BH = B * H;
  const int64_t threads = at::get_num_threads();
  // slices split into S query blocks (private dk/dv buffers) only when there are too few slices
  int64_t S = 1;
  if (BH < 4 * threads) S = std::max<int64_t>(1, std::min<int64_t>((4 * threads + BH - 1) / BH, L / (2 * BQ)));
  if (S == 1) {
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
      Scratch<T> w(D);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / H, h = i % H;
        T* dkb = DK + vdk.at(b, h, 0);
        T* dvb = DV + vdv.at(b, h, 0);
        for (int64_t l = 0; l < L; ++l) { ops.zero(dkb + l * vdk.sl); ops.zero(dvb + l * vdv.sl); }
        proto.run(b, h, 0, L, dkb, vdk.sl, dvb, vdv.sl, w);
      }
    });
    return;
  }
  // (BH, S, 2, L, D) private buffers, then dk = sum over S
  auto scratch = at::zeros({BH, S, 2, L, D}, q.options());
  T* SCR = scratch.data_ptr<T>();
  const int64_t block = ((L + S - 1) / S + BQ - 1) / BQ * BQ;
  at::parallel_for(0, BH * S, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> w(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / S, part = i % S, b = bh / H, h = bh % H;
      const int64_t q0 = std::min(L, part * block), q1 = std::min(L, q0 + block);
      T* base = SCR + ((bh * S + part) * 2) * L * D;
      if (q0 < q1) proto.run(b, h, q0, q1, base, D, base + L * D, D, w);
    }
  });
  at::parallel_for(0, BH * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / L, l = i % L, b = bh / H, h = bh % H;
      T* okp = DK + vdk.at(b, h, l);
      T* ovp = DV + vdv.at(b, h, l);
      const T* src = SCR + (bh * S * 2) * L * D + l * D;
      ops.scale_to(T(1), src, okp);
      ops.scale_to(T(1), src + L * D, ovp);
      for (int64_t part = 1; part < S; ++part) {
        ops.axpy(T(1), src + part * 2 * L * D, okp);
        ops.axpy(T(1), src + (part * 2 + 1) * L * D, ovp);
      }
    }
  });
}

}  // namespace

#define FIBO_DISPATCH(ST, D, CALL_FLOAT_AVX, CALL_GENERIC)                                        \
  [&] {                                                                                         \
    if ((ST) == at::kFloat) {                                                                   \
      using T = float;                                                                          \
      FIBO_AVX_CASES(D, CALL_FLOAT_AVX)                                                         \
      { using Ops = GenericOps<float>; CALL_GENERIC; }                                          \
    } else if ((ST) == at::kDouble) {                                                           \
      using T = double;                                                                         \
      using Ops = GenericOps<double>;                                                           \
      CALL_GENERIC;                                                                             \
    } else {                                                                                    \
      TORCH_CHECK(false, "fibo sparse attention: float32 or float64 only, got ", (ST));         \
    }                                                                                           \
  }()

#ifdef FIBO_AVX2
#define FIBO_AVX_CASES(D, CALL)                                 \
  if ((D) == 64) { using Ops = AvxOps<8>; CALL; return; }       \
  if ((D) == 32) { using Ops = AvxOps<4>; CALL; return; }       \
  if ((D) == 128) { using Ops = AvxOps<16>; CALL; return; }     \
  if ((D) == 16) { using Ops = AvxOps<2>; CALL; return; }
#else
#define FIBO_AVX_CASES(D, CALL)
#endif

// Returns out (B, H, L, d) [stored as (B, L, H, d)] and lse (B, H, L).
std::vector<at::Tensor> sparse_attn_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& row_ptr, const at::Tensor& cols, double scale) {
  check_inputs(q, k, v, row_ptr, cols);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  auto out = at::empty({B, L, H, D}, q.options()).permute({0, 2, 1, 3});
  auto lse = at::empty({B, H, L}, q.options());
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* cl = cols.data_ptr<int32_t>();
  FIBO_DISPATCH(q.scalar_type(), D,
                (forward_impl<T, Ops>(q, k, v, out, lse, rp, cl, static_cast<T>(scale))),
                (forward_impl<T, Ops>(q, k, v, out, lse, rp, cl, static_cast<T>(scale))));
  return {out, lse};
}

// Returns dq, dk, dv, each (B, H, L, d) [stored as (B, L, H, d)]. The transposed table is not needed
// (kept in the signature for callers of the older kernel).
std::vector<at::Tensor> sparse_attn_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                             const at::Tensor& row_ptr, const at::Tensor& cols, double scale) {
  check_inputs(q, k, v, row_ptr, cols);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.stride(3) == 1 && out.stride(3) == 1,
              "fibo sparse attention: bad grad_out/out");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type() && lse.scalar_type() == q.scalar_type(),
              "fibo sparse attention: grad_out/out/lse dtype differs from q");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == q.size(0) * q.size(1) * q.size(2), "fibo sparse attention: lse must be contiguous (B, H, L)");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  auto dq = at::empty({B, L, H, D}, q.options()).permute({0, 2, 1, 3});
  auto dk = at::empty({B, L, H, D}, q.options()).permute({0, 2, 1, 3});
  auto dv = at::empty({B, L, H, D}, q.options()).permute({0, 2, 1, 3});
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* cl = cols.data_ptr<int32_t>();
  FIBO_DISPATCH(q.scalar_type(), D,
                (backward_impl<T, Ops>(grad_out, q, k, v, out, lse, dq, dk, dv, rp, cl, static_cast<T>(scale))),
                (backward_impl<T, Ops>(grad_out, q, k, v, out, lse, dq, dk, dv, rp, cl, static_cast<T>(scale))));
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &sparse_attn_forward, "fibo sparse attention forward (CPU)");
  m.def("backward", &sparse_attn_backward, "fibo sparse attention backward (CPU)");
}
"""
