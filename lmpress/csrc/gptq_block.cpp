// The inner loop of GPTQ and SparseGPT over the columns of one lazy block, row by row (rows are
// independent). Built by lmpress.quant.kernels with torch.utils.cpp_extension.load as
// `lmpress_gptq`; the references are the Python loops in lmpress.quant.gptq
// (_quantize_columns_reference) and lmpress.prune.sparsegpt (_sweep_reference).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>

namespace {

void check(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dtype() == at::kFloat && t.is_contiguous() && t.dim() == 2 && t.size(0) == rows &&
                  t.size(1) == cols,
              name, " must be contiguous float32 of shape (", rows, ", ", cols, ")");
}

// Sweep block columns c0..c1-1 of W1 (rows, b) in order. Each weight w becomes its replacement
// v: 0 where the keep mask K1 is 0 (pruning), else w, or with quantization (maxq > 0) the grid
// point (q - z) * s, q = clamp(round(w / s) + z, 0, maxq). Then err = (w - v) / U1[i, i] and
// W1[r, j] -= err * U1[i, j] for the later columns j of the block. Q1 receives the codes q (with
// quantization) or the values v (without); E1 the scaled errors. S1 and Z1 (rows, b): each column's
// scale and zero (read only when maxq > 0); K1 (rows, b) or empty: the keep mask; U1 (b, b): the
// upper Cholesky factor of the block's inverse Hessian.
void sweep_columns(at::Tensor& W1, const at::Tensor& U1, const at::Tensor& K1, const at::Tensor& S1,
                   const at::Tensor& Z1, at::Tensor& Q1, at::Tensor& E1, int64_t c0, int64_t c1,
                   double maxq) {
  const int64_t R = W1.size(0), B = W1.size(1);
  const bool quant = maxq > 0, masked = K1.numel() > 0;
  check(W1, "W1", R, B);
  check(U1, "U1", B, B);
  if (quant) {
    check(S1, "S1", R, B);
    check(Z1, "Z1", R, B);
  }
  if (masked) check(K1, "K1", R, B);
  check(Q1, "Q1", R, B);
  check(E1, "E1", R, B);
  TORCH_CHECK(0 <= c0 && c0 <= c1 && c1 <= B, "column range out of the block");
  float* w_all = W1.data_ptr<float>();
  const float* u = U1.data_ptr<float>();
  const float* s_all = quant ? S1.data_ptr<float>() : nullptr;
  const float* z_all = quant ? Z1.data_ptr<float>() : nullptr;
  const float* k_all = masked ? K1.data_ptr<float>() : nullptr;
  float* q_all = Q1.data_ptr<float>();
  float* e_all = E1.data_ptr<float>();
  const float top = static_cast<float>(maxq);
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* w = w_all + r * B;
      for (int64_t i = c0; i < c1; ++i) {
        const int64_t ri = r * B + i;
        float v = w[i], out = w[i];
        if (quant) {
          float q = std::nearbyint(w[i] / s_all[ri]) + z_all[ri];  // half to even, as torch.round
          q = q < 0.f ? 0.f : (q > top ? top : q);
          v = (q - z_all[ri]) * s_all[ri];
          out = q;
        }
        if (masked && k_all[ri] == 0.f) {
          v = 0.f;
          out = quant ? z_all[ri] : 0.f;  // the code of 0 on an asymmetric grid
        }
        const float e = (w[i] - v) / u[i * B + i];
        q_all[ri] = out;
        e_all[ri] = e;
        const float* ui = u + i * B;
        for (int64_t j = i + 1; j < B; ++j) w[j] -= e * ui[j];
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sweep_columns", &sweep_columns, "GPTQ / SparseGPT: sweep block columns c0..c1 in place");
}
