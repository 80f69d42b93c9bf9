// Fused dequantize-and-multiply for bit-packed weight-only quantized linear layers (CPU).
//
//   y[m, r] = sum_k x[m, k] * (q[r, k] - z[r, k / G]) * s[r, k / G]  (+ bias[r])
//
// q is stored as in lmpress/quant/pack.py (layout v1): one little-endian bit stream per output
// row, code k at bit bits * k, rows back to back. The kernel walks the packed matrix once, in
// order, one output row at a time; rows are split over threads with at::parallel_for.
//
// AVX-512 path (needs AVX512F/BW/VBMI), 16 codes per step:
//   1. one broadcast load of the 2 * bits bytes that hold the 16 codes,
//   2. vpmultishiftqb moves code i to the low byte of 32-bit lane i,
//   3. vpermps looks the code up in a 16-entry table (q - z) * s built once per group (the table
//      only reads the low 4 bits of each lane, so no masking is needed: for bits < 4 the table
//      repeats itself),
//   4. one FMA per row of x.
// 8-bit codes are widened with vpmovzxbd and converted. The dequantized weights are bit-identical
// to lmpress.quant.pack.dequantize_packed; only the summation order differs.
// Without AVX-512 (or for a group size that is not a multiple of 16) a portable path dequantizes
// one row into a buffer and takes dot products.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define LMP_AVX512 1
#endif

namespace {

constexpr int kMaxRows = 8;  // most rows of x the fused kernel takes in one pass

// ---- problem description --------------------------------------------------------------------

template <typename ST>
struct Problem {
  const float* x;       // (M, K) row-major; unused by dequant
  const uint8_t* w;     // (N, K * bits / 8) packed codes
  const ST* s;          // (N, K / G) scales
  const ST* z;          // (N, K / G) zeros
  const float* bias;    // (N,) or nullptr
  float* y;             // (M, N) for qgemv, (N, K) for dequant
  const uint8_t* end;   // one past the last packed byte (guards over-reads)
  int64_t M, K, N, G, ng, row_bytes;
};

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) {
#ifdef __F16C__
  return _cvtsh_ss(v.x);
#else
  return static_cast<float>(v);
#endif
}

// Code k of one packed row (scalar; any k).
template <int BITS>
inline int code_at(const uint8_t* row, int64_t k) {
  if constexpr (BITS == 8) {
    return row[k];
  } else if constexpr (BITS == 3) {
    const uint8_t* p = row + 3 * (k >> 3);
    const uint32_t word = p[0] | (p[1] << 8) | (p[2] << 16);
    return (word >> (3 * (k & 7))) & 7;
  } else {
    constexpr int per = 8 / BITS;
    return (row[k / per] >> (BITS * (k % per))) & ((1 << BITS) - 1);
  }
}

// ---- portable path ----------------------------------------------------------------------------

// Dequantize one row into out[0:K].
template <int BITS, typename ST>
void dequant_row_scalar(const Problem<ST>& p, int64_t r, float* out) {
  const uint8_t* row = p.w + r * p.row_bytes;
  for (int64_t g = 0; g < p.ng; ++g) {
    const float s = to_float(p.s[r * p.ng + g]), z = to_float(p.z[r * p.ng + g]);
    for (int64_t k = g * p.G; k < (g + 1) * p.G; ++k)
      out[k] = (static_cast<float>(code_at<BITS>(row, k)) - z) * s;
  }
}

template <int BITS, typename ST>
void gemv_rows_scalar(const Problem<ST>& p, int64_t r0, int64_t r1) {
  std::vector<float> wrow(p.K);
  for (int64_t r = r0; r < r1; ++r) {
    dequant_row_scalar<BITS>(p, r, wrow.data());
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < p.K; ++k) acc += wrow[k] * x[k];
      p.y[m * p.N + r] = acc + (p.bias ? p.bias[r] : 0.f);
    }
  }
}

// ---- AVX-512 path -----------------------------------------------------------------------------

#ifdef LMP_AVX512

// Load the bytes holding 16 codes (2 * BITS bytes) into every 64-bit lane.
template <int BITS>
inline __m512i load16(const uint8_t* src, const uint8_t* end) {
  uint64_t v = 0;
  if constexpr (BITS == 4) {
    std::memcpy(&v, src, 8);
  } else if constexpr (BITS == 2) {
    uint32_t u;
    std::memcpy(&u, src, 4);
    v = u;
  } else {  // 3 bits: 6 bytes; read 8 when that stays inside the buffer
    if (src + 8 <= end) std::memcpy(&v, src, 8);
    else std::memcpy(&v, src, 6);
  }
  return _mm512_set1_epi64(static_cast<long long>(v));
}

// Byte-shift control: 32-bit lane i takes the 8 bits starting at bit BITS * i.
template <int BITS>
inline __m512i shift_ctrl() {
  return _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(BITS));
}

// Codes as floats, lane k = k mod 2**BITS (the table index vpermps will see).
template <int BITS>
inline __m512 code_table() {
  const __m512i k = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_cvtepi32_ps(_mm512_and_si512(k, _mm512_set1_epi32((1 << BITS) - 1)));
}

// 16 dequantized weights starting at code k (k % 16 == 0) of `row`.
// lut = (code_table - z) * s for bits < 8; zv, sv broadcast z and s for bits == 8.
template <int BITS>
inline __m512 dequant16(const uint8_t* row, int64_t k, const uint8_t* end, __m512i ctrl,
                        __m512 lut, __m512 zv, __m512 sv) {
  if constexpr (BITS == 8) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
    return _mm512_mul_ps(_mm512_sub_ps(q, zv), sv);
  } else {
    const __m512i idx = _mm512_multishift_epi64_epi8(ctrl, load16<BITS>(row + k * BITS / 8, end));
    return _mm512_permutexvar_ps(idx, lut);
  }
}

// y[0:M, r0:r1] for M rows of x; two accumulators per x row hide the FMA latency.
template <int BITS, int M, typename ST>
void gemv_rows_avx512(const Problem<ST>& p, int64_t r0, int64_t r1) {
  const __m512i ctrl = shift_ctrl<BITS>();
  const __m512 table = code_table<BITS>();
  const int64_t vec_end = p.G / 16 * 16;  // vector part of each group; the rest is scalar
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.w + r * p.row_bytes;
    __m512 acc0[M], acc1[M];
    float tail[M];
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps(), tail[m] = 0.f;
    for (int64_t g = 0; g < p.ng; ++g) {
      const float s = to_float(p.s[r * p.ng + g]), z = to_float(p.z[r * p.ng + g]);
      const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
      const __m512 lut = _mm512_mul_ps(_mm512_sub_ps(table, zv), sv);
      const int64_t k0 = g * p.G, kv = k0 + vec_end;
      int64_t k = k0;
      for (; k + 32 <= kv; k += 32) {
        const __m512 w0 = dequant16<BITS>(row, k, p.end, ctrl, lut, zv, sv);
        const __m512 w1 = dequant16<BITS>(row, k + 16, p.end, ctrl, lut, zv, sv);
        for (int m = 0; m < M; ++m) {
          acc0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p.x + m * p.K + k), acc0[m]);
          acc1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(p.x + m * p.K + k + 16), acc1[m]);
        }
      }
      if (k < kv) {
        const __m512 w0 = dequant16<BITS>(row, k, p.end, ctrl, lut, zv, sv);
        for (int m = 0; m < M; ++m)
          acc0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p.x + m * p.K + k), acc0[m]);
        k += 16;
      }
      for (; k < k0 + p.G; ++k) {  // only when G % 16 != 0 (then G == K, one group)
        const float w = (static_cast<float>(code_at<BITS>(row, k)) - z) * s;
        for (int m = 0; m < M; ++m) tail[m] += w * p.x[m * p.K + k];
      }
    }
    const float b = p.bias ? p.bias[r] : 0.f;
    for (int m = 0; m < M; ++m)
      p.y[m * p.N + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) + tail[m] + b;
  }
}

template <int BITS, typename ST>
void dequant_rows_avx512(const Problem<ST>& p, int64_t r0, int64_t r1) {
  const __m512i ctrl = shift_ctrl<BITS>();
  const __m512 table = code_table<BITS>();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.w + r * p.row_bytes;
    float* out = p.y + r * p.K;
    for (int64_t g = 0; g < p.ng; ++g) {
      const float s = to_float(p.s[r * p.ng + g]), z = to_float(p.z[r * p.ng + g]);
      const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
      const __m512 lut = _mm512_mul_ps(_mm512_sub_ps(table, zv), sv);
      for (int64_t k = g * p.G; k < (g + 1) * p.G; k += 16)
        _mm512_storeu_ps(out + k, dequant16<BITS>(row, k, p.end, ctrl, lut, zv, sv));
    }
  }
}

#endif  // LMP_AVX512

// ---- dispatch ---------------------------------------------------------------------------------

// Whether the vectorized path applies: every 16-code step starts on a byte boundary inside a group.
inline bool vector_ok(int64_t G, int64_t K) {
#ifdef LMP_AVX512
  return G % 16 == 0 || G == K;
#else
  return false;
#endif
}

template <int BITS, typename ST>
void gemv_rows(const Problem<ST>& p, int64_t r0, int64_t r1) {
#ifdef LMP_AVX512
  if (vector_ok(p.G, p.K)) {
    switch (p.M) {
      case 1: return gemv_rows_avx512<BITS, 1>(p, r0, r1);
      case 2: return gemv_rows_avx512<BITS, 2>(p, r0, r1);
      case 3: return gemv_rows_avx512<BITS, 3>(p, r0, r1);
      case 4: return gemv_rows_avx512<BITS, 4>(p, r0, r1);
      case 5: return gemv_rows_avx512<BITS, 5>(p, r0, r1);
      case 6: return gemv_rows_avx512<BITS, 6>(p, r0, r1);
      case 7: return gemv_rows_avx512<BITS, 7>(p, r0, r1);
      case 8: return gemv_rows_avx512<BITS, 8>(p, r0, r1);
    }
  }
#endif
  gemv_rows_scalar<BITS>(p, r0, r1);
}

template <int BITS, typename ST>
void dequant_rows(const Problem<ST>& p, int64_t r0, int64_t r1) {
#ifdef LMP_AVX512
  if (p.G % 16 == 0) return dequant_rows_avx512<BITS>(p, r0, r1);
#endif
  for (int64_t r = r0; r < r1; ++r) dequant_row_scalar<BITS>(p, r, p.y + r * p.K);
}

// Rows per task: small matrices stay on one thread (a fork costs more than it saves).
inline int64_t grain(int64_t N, int64_t row_bytes) {
  constexpr int64_t kMinBytes = 32 * 1024;
  const int64_t rows = (kMinBytes + row_bytes - 1) / row_bytes;
  return std::max<int64_t>(1, std::min(N, rows));
}

template <typename ST>
void run(const Problem<ST>& p, int64_t bits, bool dequant) {
  at::parallel_for(0, p.N, grain(p.N, p.row_bytes), [&](int64_t r0, int64_t r1) {
    switch (bits) {
      case 2: return dequant ? dequant_rows<2>(p, r0, r1) : gemv_rows<2>(p, r0, r1);
      case 3: return dequant ? dequant_rows<3>(p, r0, r1) : gemv_rows<3>(p, r0, r1);
      case 4: return dequant ? dequant_rows<4>(p, r0, r1) : gemv_rows<4>(p, r0, r1);
      case 8: return dequant ? dequant_rows<8>(p, r0, r1) : gemv_rows<8>(p, r0, r1);
    }
  });
}

// ---- entry points -----------------------------------------------------------------------------

template <typename ST>
Problem<ST> make_problem(const at::Tensor& packed, const at::Tensor& scales,
                         const at::Tensor& zeros, int64_t bits, int64_t G, int64_t K) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  TORCH_CHECK(G > 0 && K % G == 0, "group_size must divide in_features");
  TORCH_CHECK(K * bits % 8 == 0, "in_features * bits must be a multiple of 8");
  TORCH_CHECK(packed.dtype() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(1) == K * bits / 8,
              "packed must be contiguous uint8 of shape (out, in * bits / 8)");
  const int64_t N = packed.size(0), ng = K / G;
  for (const at::Tensor* t : {&scales, &zeros})
    TORCH_CHECK(t->is_contiguous() && t->dim() == 2 && t->size(0) == N && t->size(1) == ng,
                "scales and zeros must be contiguous (out, in / group_size)");
  Problem<ST> p{};
  p.w = packed.data_ptr<uint8_t>();
  p.s = scales.data_ptr<ST>();
  p.z = zeros.data_ptr<ST>();
  p.end = p.w + packed.numel();
  p.K = K, p.N = N, p.G = G, p.ng = ng, p.row_bytes = K * bits / 8;
  return p;
}

template <typename ST>
at::Tensor qgemv_typed(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t bits, int64_t G,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "x must be contiguous float32 (rows, in)");
  auto p = make_problem<ST>(packed, scales, zeros, bits, G, x.size(1));
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "qgemv takes 1 to 8 rows of x");
  at::Tensor y = at::empty({x.size(0), p.N}, x.options());
  if (bias) {
    TORCH_CHECK(bias->dtype() == at::kFloat && bias->is_contiguous() && bias->numel() == p.N,
                "bias must be contiguous float32 (out,)");
    p.bias = bias->data_ptr<float>();
  }
  p.x = x.data_ptr<float>(), p.y = y.data_ptr<float>(), p.M = x.size(0);
  run(p, bits, /*dequant=*/false);
  return y;
}

// y = x @ W.T (+ bias) for 1..8 rows of x, W dequantized on the fly.
at::Tensor qgemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                 const at::Tensor& zeros, int64_t bits, int64_t group_size,
                 const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(scales.dtype() == zeros.dtype(), "scales and zeros must share a dtype");
  if (scales.dtype() == at::kHalf)
    return qgemv_typed<c10::Half>(x, packed, scales, zeros, bits, group_size, bias);
  TORCH_CHECK(scales.dtype() == at::kFloat, "scales must be float16 or float32");
  return qgemv_typed<float>(x, packed, scales, zeros, bits, group_size, bias);
}

template <typename ST>
at::Tensor dequant_typed(const at::Tensor& packed, const at::Tensor& scales,
                         const at::Tensor& zeros, int64_t bits, int64_t G, int64_t K) {
  auto p = make_problem<ST>(packed, scales, zeros, bits, G, K);
  at::Tensor w = at::empty({p.N, K}, packed.options().dtype(at::kFloat));
  p.y = w.data_ptr<float>();
  run(p, bits, /*dequant=*/true);
  return w;
}

// W (out, in) float32 = (q - z) * s, bit-identical to lmpress.quant.pack.dequantize_packed.
at::Tensor dequant(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t bits, int64_t group_size, int64_t in_features) {
  TORCH_CHECK(scales.dtype() == zeros.dtype(), "scales and zeros must share a dtype");
  if (scales.dtype() == at::kHalf)
    return dequant_typed<c10::Half>(packed, scales, zeros, bits, group_size, in_features);
  TORCH_CHECK(scales.dtype() == at::kFloat, "scales must be float16 or float32");
  return dequant_typed<float>(packed, scales, zeros, bits, group_size, in_features);
}

std::string simd() {
#ifdef LMP_AVX512
  return "avx512-vbmi";
#else
  return "portable";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemv", &qgemv, "fused dequantize-and-multiply, 1..8 rows of x");
  m.def("dequant", &dequant, "dequantize packed codes to a float32 matrix");
  m.def("simd", &simd, "instruction set the kernel was built for");
  m.attr("max_rows") = kMaxRows;
}
