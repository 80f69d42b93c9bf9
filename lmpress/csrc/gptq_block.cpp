// GPTQ's inner loop over the columns of one lazy block, row by row (rows are independent).
// Built by lmpress.quant.kernels with torch.utils.cpp_extension.load as `lmpress_gptq`; the
// reference is the Python loop in lmpress.quant.gptq._quantize_columns_reference.

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

// Quantize block columns c0..c1-1 of W1 (rows, b) in order: q = clamp(round(w / s) + z, 0, maxq),
// err = (w - (q - z) * s) / U1[i, i], then W1[r, j] -= err * U1[i, j] for the later columns j of
// the block. Q1 and E1 (rows, b) receive the codes and the scaled errors; S1 and Z1 (rows, b) hold
// each column's scale and zero; U1 (b, b) is the upper Cholesky factor of the block's inverse
// Hessian.
void quantize_columns(at::Tensor& W1, const at::Tensor& U1, const at::Tensor& S1,
                      const at::Tensor& Z1, at::Tensor& Q1, at::Tensor& E1, int64_t c0,
                      int64_t c1, double maxq) {
  const int64_t R = W1.size(0), B = W1.size(1);
  check(W1, "W1", R, B);
  check(U1, "U1", B, B);
  check(S1, "S1", R, B);
  check(Z1, "Z1", R, B);
  check(Q1, "Q1", R, B);
  check(E1, "E1", R, B);
  TORCH_CHECK(0 <= c0 && c0 <= c1 && c1 <= B, "column range out of the block");
  float* w_all = W1.data_ptr<float>();
  const float* u = U1.data_ptr<float>();
  const float* s_all = S1.data_ptr<float>();
  const float* z_all = Z1.data_ptr<float>();
  float* q_all = Q1.data_ptr<float>();
  float* e_all = E1.data_ptr<float>();
  const float top = static_cast<float>(maxq);
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* w = w_all + r * B;
      const float* s = s_all + r * B;
      const float* z = z_all + r * B;
      for (int64_t i = c0; i < c1; ++i) {
        float q = std::nearbyint(w[i] / s[i]) + z[i];  // round half to even, as torch.round
        q = q < 0.f ? 0.f : (q > top ? top : q);
        const float e = (w[i] - (q - z[i]) * s[i]) / u[i * B + i];
        q_all[r * B + i] = q;
        e_all[r * B + i] = e;
        const float* ui = u + i * B;
        for (int64_t j = i + 1; j < B; ++j) w[j] -= e * ui[j];
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_columns", &quantize_columns, "GPTQ: quantize block columns c0..c1 in place");
}
