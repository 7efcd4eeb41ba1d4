"""C++ source of the fused CPU sparse-attention kernel (compiled at first use by
:mod:`fibo.attention.backends.cpu_sparse` with :func:`torch.utils.cpp_extension.load_inline`).

Kept as a Python string so it ships with the package without package-data configuration.

Data layout: ``q, k, v`` are ``(B, H, L, d)`` with any strides over B, H, L and stride 1 over d.
The pattern is a CSR table over the ``H * L`` rows ``r = h * L + query``: keys of row ``r`` are
``cols[row_ptr[r] : row_ptr[r + 1]]`` (int32 key indices in ``[0, L)``), and the transposed table
(``t_row_ptr``, ``t_cols``: queries that attend each key) drives the key-side backward pass, so no
atomics are needed. Per row the kernel computes the scores of the row's keys only (a buffer of
``|row|`` floats), its max and log-sum-exp, and accumulates ``softmax * v`` in place: the ``L x L``
matrix and the gathered keys are never materialised. Backward recomputes the probabilities from the
saved log-sum-exp (FlashAttention-style): pass 1 per query gives ``dq``, pass 2 per key gives
``dk`` and ``dv``.
"""

CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>
#include <limits>

namespace {

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t d) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += alpha * x[i];
}

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

}  // namespace

// Returns out (B, H, L, d) [stored as (B, L, H, d)] and lse (B, H, L).
std::vector<at::Tensor> sparse_attn_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& row_ptr, const at::Tensor& cols, double scale) {
  check_inputs(q, k, v, row_ptr, cols);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  auto out = at::empty({B, L, H, D}, q.options()).permute({0, 2, 1, 3});
  auto lse = at::empty({B, H, L}, q.options());
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* cl = cols.data_ptr<int32_t>();
  View4 vq(q), vk(k), vv(v), vo(out);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fibo_sparse_attn_forward", [&] {
    const scalar_t* Q = q.data_ptr<scalar_t>();
    const scalar_t* K = k.data_ptr<scalar_t>();
    const scalar_t* V = v.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    scalar_t* LSE = lse.data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scale);
    at::parallel_for(0, B * H * L, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> s;
      std::vector<scalar_t> acc(D);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (H * L), h = (i / L) % H, qi = i % L;
        const int64_t r = h * L + qi, start = rp[r], n = rp[r + 1] - start;
        const scalar_t* qp = Q + vq.at(b, h, qi);
        const scalar_t* kb = K + vk.at(b, h, 0);
        const scalar_t* vb = V + vv.at(b, h, 0);
        if ((int64_t)s.size() < n) s.resize(n);
        scalar_t m = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t x = dot(qp, kb + (int64_t)cl[start + j] * vk.sl, D) * sc;
          s[j] = x;
          m = x > m ? x : m;
        }
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        scalar_t sum = 0;
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t p = std::exp(s[j] - m);
          sum += p;
          axpy(p, vb + (int64_t)cl[start + j] * vv.sl, acc.data(), D);
        }
        scalar_t* op = O + vo.at(b, h, qi);
        if (n == 0) {  // no key: output 0, lse -inf (never produced by fibo tables)
          for (int64_t t = 0; t < D; ++t) op[t] = 0;
          LSE[i] = -std::numeric_limits<scalar_t>::infinity();
          continue;
        }
        const scalar_t inv = scalar_t(1) / sum;
        for (int64_t t = 0; t < D; ++t) op[t] = acc[t] * inv;
        LSE[i] = m + std::log(sum);
      }
    });
  });
  return {out, lse};
}

// Returns dq, dk, dv, each (B, H, L, d).
std::vector<at::Tensor> sparse_attn_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                             const at::Tensor& row_ptr, const at::Tensor& cols,
                                             const at::Tensor& t_row_ptr, const at::Tensor& t_cols, double scale) {
  check_inputs(q, k, v, row_ptr, cols);
  check_inputs(q, k, v, t_row_ptr, t_cols);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.stride(3) == 1 && out.stride(3) == 1, "fibo sparse attention: bad grad_out/out");
  TORCH_CHECK(lse.is_contiguous(), "fibo sparse attention: lse must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  auto dq = at::empty({B, L, H, D}, q.options()).permute({0, 2, 1, 3});
  auto dk = at::empty({B, L, H, D}, q.options()).permute({0, 2, 1, 3});
  auto dv = at::empty({B, L, H, D}, q.options()).permute({0, 2, 1, 3});
  auto delta = at::empty({B, H, L}, q.options());
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* cl = cols.data_ptr<int32_t>();
  const int64_t* trp = t_row_ptr.data_ptr<int64_t>();
  const int32_t* tcl = t_cols.data_ptr<int32_t>();
  View4 vq(q), vk(k), vv(v), vo(out), vg(grad_out), vdq(dq), vdk(dk), vdv(dv);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fibo_sparse_attn_backward", [&] {
    const scalar_t* Q = q.data_ptr<scalar_t>();
    const scalar_t* K = k.data_ptr<scalar_t>();
    const scalar_t* V = v.data_ptr<scalar_t>();
    const scalar_t* O = out.data_ptr<scalar_t>();
    const scalar_t* G = grad_out.data_ptr<scalar_t>();
    const scalar_t* LSE = lse.data_ptr<scalar_t>();
    scalar_t* DQ = dq.data_ptr<scalar_t>();
    scalar_t* DK = dk.data_ptr<scalar_t>();
    scalar_t* DV = dv.data_ptr<scalar_t>();
    scalar_t* DELTA = delta.data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scale);
    // delta[q] = <dO[q], O[q]>
    at::parallel_for(0, B * H * L, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (H * L), h = (i / L) % H, qi = i % L;
        DELTA[i] = dot(G + vg.at(b, h, qi), O + vo.at(b, h, qi), D);
      }
    });
    // pass 1, per query: dq = scale * sum_j P_j (dO.v_j - delta) k_j
    at::parallel_for(0, B * H * L, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acc(D);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (H * L), h = (i / L) % H, qi = i % L;
        const int64_t r = h * L + qi, start = rp[r], n = rp[r + 1] - start;
        const scalar_t* qp = Q + vq.at(b, h, qi);
        const scalar_t* gp = G + vg.at(b, h, qi);
        const scalar_t* kb = K + vk.at(b, h, 0);
        const scalar_t* vb = V + vv.at(b, h, 0);
        const scalar_t l = LSE[i], dl = DELTA[i];
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        for (int64_t j = 0; j < n; ++j) {
          const int64_t key = cl[start + j];
          const scalar_t* kp = kb + key * vk.sl;
          const scalar_t p = std::exp(dot(qp, kp, D) * sc - l);
          const scalar_t ds = p * (dot(gp, vb + key * vv.sl, D) - dl);
          axpy(ds, kp, acc.data(), D);
        }
        scalar_t* o = DQ + vdq.at(b, h, qi);
        for (int64_t t = 0; t < D; ++t) o[t] = acc[t] * sc;
      }
    });
    // pass 2, per key (transposed table): dv = sum_q P dO[q]; dk = scale * sum_q P (dO[q].v - delta[q]) q
    at::parallel_for(0, B * H * L, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acck(D), accv(D);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / (H * L), h = (i / L) % H, ki = i % L;
        const int64_t r = h * L + ki, start = trp[r], n = trp[r + 1] - start;
        const scalar_t* kp = K + vk.at(b, h, ki);
        const scalar_t* vp = V + vv.at(b, h, ki);
        const int64_t row0 = (b * H + h) * L;
        std::fill(acck.begin(), acck.end(), scalar_t(0));
        std::fill(accv.begin(), accv.end(), scalar_t(0));
        for (int64_t j = 0; j < n; ++j) {
          const int64_t qi = tcl[start + j];
          const scalar_t* qp = Q + vq.at(b, h, qi);
          const scalar_t* gp = G + vg.at(b, h, qi);
          const scalar_t p = std::exp(dot(qp, kp, D) * sc - LSE[row0 + qi]);
          axpy(p, gp, accv.data(), D);
          const scalar_t ds = p * (dot(gp, vp, D) - DELTA[row0 + qi]);
          axpy(ds, qp, acck.data(), D);
        }
        scalar_t* ok = DK + vdk.at(b, h, ki);
        scalar_t* ov = DV + vdv.at(b, h, ki);
        for (int64_t t = 0; t < D; ++t) { ok[t] = acck[t] * sc; ov[t] = accv[t]; }
      }
    });
  });
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &sparse_attn_forward, "fibo sparse attention forward (CPU)");
  m.def("backward", &sparse_attn_backward, "fibo sparse attention backward (CPU)");
}
"""
