// Torch / pybind11 glue for the kernels in qgemv_kernel.cpp (validation, tensors, dispatch).
// Built by lmpress.quant.kernels with torch.utils.cpp_extension.load as `lmpress_qgemv`.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <ATen/ops/linear.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "qgemv_kernel.h"  // defined in qgemv_kernel.cpp

namespace {

// Shapes and dtypes of the packed weight, scales and zeros for in_features K.
void check_weight(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                  int64_t bits, int64_t G, int64_t K) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  TORCH_CHECK(G > 0 && K % G == 0, "group_size must divide in_features");
  TORCH_CHECK(K * bits % 8 == 0, "in_features * bits must be a multiple of 8");
  TORCH_CHECK(packed.dtype() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(1) == K * bits / 8,
              "packed must be contiguous uint8 of shape (out, in * bits / 8)");
  TORCH_CHECK(scales.dtype() == zeros.dtype() &&
                  (scales.dtype() == at::kHalf || scales.dtype() == at::kFloat),
              "scales and zeros must both be float16 or both float32");
  for (const at::Tensor* t : {&scales, &zeros})
    TORCH_CHECK(t->is_contiguous() && t->dim() == 2 && t->size(0) == packed.size(0) &&
                    t->size(1) == K / G,
                "scales and zeros must be contiguous (out, in / group_size)");
}

// y = x @ W.T (+ bias) for 1..max_rows rows of x, W dequantized on the fly.
at::Tensor qgemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                 const at::Tensor& zeros, int64_t bits, int64_t group_size,
                 const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "x must be contiguous float32 (rows, in)");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= lmpress_kernel::max_rows(),
              "qgemv takes 1 to max_rows rows of x");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  check_weight(packed, scales, zeros, bits, group_size, K);
  const float* b = nullptr;
  if (bias) {
    TORCH_CHECK(bias->dtype() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias must be contiguous float32 (out,)");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  lmpress_kernel::gemv(static_cast<int>(bits), packed.data_ptr<uint8_t>(), scales.data_ptr(),
                       zeros.data_ptr(), scales.dtype() == at::kHalf, b, x.data_ptr<float>(),
                       y.data_ptr<float>(), M, K, N, group_size);
  return y;
}

// W (out, in) float32 = (q - z) * s, bit-identical to lmpress.quant.pack.dequantize_packed.
at::Tensor dequant(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t bits, int64_t group_size, int64_t in_features) {
  check_weight(packed, scales, zeros, bits, group_size, in_features);
  at::Tensor w = at::empty({packed.size(0), in_features}, packed.options().dtype(at::kFloat));
  lmpress_kernel::dequant(static_cast<int>(bits), packed.data_ptr<uint8_t>(), scales.data_ptr(),
                          zeros.data_ptr(), scales.dtype() == at::kHalf, w.data_ptr<float>(),
                          in_features, packed.size(0), group_size);
  return w;
}

// x (..., in) @ W.T (+ bias) -> (..., out): fused for up to max_rows rows of x, else dequantize
// + at::linear. None when the inputs are outside what the kernel covers (the caller then takes
// the reference path): x not float32 on CPU, empty x, scales not float16/float32, bias not float32,
// or a gradient to track (the kernel has no backward; the reference path has).
std::optional<at::Tensor> qmatmul(const at::Tensor& x, const at::Tensor& packed,
                                  const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                                  int64_t group_size, int64_t out_features,
                                  const std::optional<at::Tensor>& bias) {
  const bool scales_ok = scales.scalar_type() == zeros.scalar_type() &&
                         (scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat);
  const bool needs_grad = c10::GradMode::is_enabled() &&
                          (x.requires_grad() || (bias && bias->requires_grad()));
  if (x.scalar_type() != at::kFloat || !x.device().is_cpu() || x.dim() < 1 || x.numel() == 0 ||
      !scales_ok || (bias && bias->scalar_type() != at::kFloat) || needs_grad)
    return std::nullopt;
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == out_features,
              "packed must have out_features rows");
  const int64_t K = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();  // (rows, in)
  const at::Tensor w = packed.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  std::optional<at::Tensor> b;
  if (bias) b = bias->contiguous();
  at::Tensor y = x2.size(0) <= lmpress_kernel::max_rows()
                     ? qgemv(x2, w, s, z, bits, group_size, b)
                     : at::linear(x2, dequant(w, s, z, bits, group_size, K), b);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out_features;
  return y.view(sizes);
}

// The same product as a PyTorch operator (lmpress::qmatmul): always a tensor. Inputs the fused
// kernel does not cover (x not float32, scales neither float16 nor float32, bias not float32) are
// converted, so the op agrees with the reference path; autograd is the Python wrapper's business.
at::Tensor qmatmul_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t bits, int64_t group_size,
                      int64_t out_features, const std::optional<at::Tensor>& bias) {
  std::optional<at::Tensor> y = qmatmul(x, packed, scales, zeros, bits, group_size, out_features, bias);
  if (y) return *y;
  at::NoGradGuard no_grad;
  std::optional<at::Tensor> b;
  if (bias) b = bias->to(at::kFloat);
  y = qmatmul(x.to(at::kFloat), packed, scales.to(at::kFloat), zeros.to(at::kFloat), bits,
              group_size, out_features, b);
  TORCH_CHECK(y.has_value(), "lmpress::qmatmul: x must be a non-empty CPU tensor");
  return y->to(x.scalar_type());
}

// Several packed matrices that read the same x (q, k, v; gate, up) in one call: x is prepared
// once and one parallel loop runs over the rows of all of them. Same bits and group size for all;
// each output is exactly what qmatmul gives for that matrix alone.
std::vector<at::Tensor> qmatmul_many_op(const at::Tensor& x, at::TensorList packed,
                                        at::TensorList scales, at::TensorList zeros, int64_t bits,
                                        int64_t group_size, at::IntArrayRef out_features,
                                        const c10::List<std::optional<at::Tensor>>& bias) {
  const int64_t n = static_cast<int64_t>(packed.size());
  TORCH_CHECK(n >= 1 && static_cast<int64_t>(scales.size()) == n &&
                  static_cast<int64_t>(zeros.size()) == n &&
                  static_cast<int64_t>(out_features.size()) == n &&
                  static_cast<int64_t>(bias.size()) == n,
              "qmatmul_many: packed, scales, zeros, out_features and bias need one entry per matrix");
  const int64_t K = x.size(-1);
  const int64_t rows = K > 0 ? x.numel() / K : 0;
  bool fused = x.scalar_type() == at::kFloat && x.device().is_cpu() && x.numel() > 0 &&
               rows <= lmpress_kernel::max_rows() &&
               !(c10::GradMode::is_enabled() && x.requires_grad());
  for (int64_t i = 0; i < n && fused; ++i) {
    const std::optional<at::Tensor> b = bias.get(i);
    fused = scales[i].scalar_type() == scales[0].scalar_type() &&
            zeros[i].scalar_type() == scales[0].scalar_type() &&
            (scales[0].scalar_type() == at::kHalf || scales[0].scalar_type() == at::kFloat) &&
            (!b || (b->scalar_type() == at::kFloat && !(c10::GradMode::is_enabled() && b->requires_grad())));
  }
  std::vector<at::Tensor> out;
  if (!fused) {  // one product at a time (prefill: dequantize + matmul each)
    for (int64_t i = 0; i < n; ++i)
      out.push_back(qmatmul_op(x, packed[i], scales[i], zeros[i], bits, group_size,
                               out_features[i], bias.get(i)));
    return out;
  }
  const at::Tensor x2 = x.reshape({rows, K}).contiguous();  // (rows, in)
  std::vector<at::Tensor> keep;  // contiguous copies live until the kernel returns
  std::vector<lmpress_kernel::Matrix> mats;
  std::vector<int64_t> sizes = x.sizes().vec();
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor w = packed[i].contiguous(), s = scales[i].contiguous(), z = zeros[i].contiguous();
    TORCH_CHECK(w.dim() == 2 && w.size(0) == out_features[i], "packed must have out_features rows");
    check_weight(w, s, z, bits, group_size, K);
    const float* b = nullptr;
    if (const std::optional<at::Tensor> bi = bias.get(i)) {
      TORCH_CHECK(bi->numel() == out_features[i], "bias must have out_features entries");
      keep.push_back(bi->contiguous());
      b = keep.back().data_ptr<float>();
    }
    sizes.back() = out_features[i];
    out.push_back(at::empty(sizes, x.options()));
    keep.insert(keep.end(), {w, s, z});
    mats.push_back({w.data_ptr<uint8_t>(), s.data_ptr(), z.data_ptr(), b,
                    out.back().data_ptr<float>(), out_features[i]});
  }
  lmpress_kernel::gemv_many(static_cast<int>(bits), mats.data(), n,
                            scales[0].scalar_type() == at::kHalf, x2.data_ptr<float>(), rows, K,
                            group_size);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmatmul", &qmatmul, "x @ W.T (+ bias) for packed W; None when the kernel does not apply");
  m.def("qgemv", &qgemv, "fused dequantize-and-multiply, 1..max_rows rows of x");
  m.def("dequant", &dequant, "dequantize packed codes to a float32 matrix");
  m.def("simd", &lmpress_kernel::simd, "instruction set the kernels were built for");
  m.attr("max_rows") = lmpress_kernel::max_rows();
}

// Registered as PyTorch operators (torch.ops.lmpress.*) so torch.compile traces them as single
// nodes; their fake (shape-only) implementations are registered from lmpress.quant.kernels.
TORCH_LIBRARY(lmpress, m) {
  m.def("qmatmul(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int bits, int group_size, "
        "int out_features, Tensor? bias) -> Tensor");
  m.def("qmatmul_many(Tensor x, Tensor[] packed, Tensor[] scales, Tensor[] zeros, int bits, "
        "int group_size, int[] out_features, Tensor?[] bias) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(lmpress, CPU, m) {
  m.impl("qmatmul", &qmatmul_op);
  m.impl("qmatmul_many", &qmatmul_many_op);
}
