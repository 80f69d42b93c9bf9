// Kernels: fused dequantize-and-multiply for bit-packed weight-only quantized linears (CPU).
//
//   y[m, r] = sum_k x[m, k] * (q[r, k] - z[r, k / G]) * s[r, k / G]   (+ bias[r])
//           = sum_g s[r, g] * (sum_{k in g} q[r, k] x[m, k])  -  sum_g s[r, g] z[r, g] xsum[m, g]
//
// q is stored as in lmpress/quant/pack.py (layout v1): one little-endian bit stream per output
// row, code k at bit bits * k, rows back to back. The kernel reads the packed matrix once, in
// order; output rows are split over threads with at::parallel_for.
//
// AVX-512 path ("mask and fold"), per 64-byte block of a row (48 bytes for 3 bits):
//   * the block is 16 int32 lanes; lane i holds C = 32 / bits consecutive codes (3 bits: the
//     24-bit word of 8 codes, spread to 32-bit lanes by one vpermb);
//   * code j of every lane is isolated with ONE vpand against (2**bits - 1) << bits * j -- no
//     shift: the code is left multiplied by 2**(bits * j), which is cancelled by multiplying the
//     matching x by 2**-(bits * j) once per call (exact: a power of two);
//   * vcvtudq2ps + vfmadd into per-lane partial sums t (x is pre-permuted to the lane order);
//   * per block: acc += t * s, where s holds each lane's group scale (vpermps from the row's
//     scales); the zero point enters once per group as s * z * sum(x over the group).
// and / convert / FMA run on different execution ports (Zen 4), so the decode is nearly free and
// a row costs about one FMA per 16 weights. Summation order differs from the reference, so the
// result matches it to float rounding, not bit for bit.
// Dequantization (prefill path) uses a 16-entry table per group: vpmultishiftqb puts each code in
// the low byte of a lane, vpermps maps it to (q - z) * s -- bit-identical to the reference.
// AVX2 (+FMA, F16C) runs the same mask-and-fold scheme on 8 lanes (32-byte blocks, 24 for 3 bits:
// vpermd + vpshufb spread the 24-bit words); its int32 -> float conversion is signed, so the top
// code of a full lane (2, 4, 8 bits) is shifted down instead of masked in place (its x unscaled).
// Its dequantization broadcasts 8 codes' bits and shifts each lane by its own count (vpsrlvd).
// Without either, or for a group size the lanes cannot follow, a portable path dequantizes one row
// into a buffer and takes dot products.
//
// This file holds the math and needs no tensor headers, so it compiles in parallel with the
// torch / pybind11 glue in qgemv.cpp. Entry points: lmpress_kernel::{gemv, dequant, max_rows,
// simd}.

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qgemv_kernel.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define LMP_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LMP_AVX2 1
#endif

namespace lmpress_kernel {

constexpr int kMaxRows = 8;  // rows of x the fused kernel takes in one pass


namespace {

#ifdef LMP_AVX2
constexpr int kLanes = 8;  // 32-bit lanes of a vector register
#else
constexpr int kLanes = 16;
#endif

// Geometry of one kLanes-lane block for a bit width.
template <int BITS>
struct Lanes {
  static constexpr int C = BITS == 3 ? 8 : 32 / BITS;  // codes per 32-bit lane
  static constexpr int codes = kLanes * C;              // codes per block
  static constexpr int bytes = codes * BITS / 8;        // 64 (AVX2: 32), or 48 (24) for 3 bits
  static constexpr uint32_t mask = (1u << BITS) - 1;
  // AVX2 converts int32 lanes as signed: the top code of a full 32-bit lane (2, 4, 8 bits) is
  // shifted down instead of masked in place, so its x is not scaled.
#ifdef LMP_AVX2
  static constexpr bool top_shifted = BITS != 3;
#else
  static constexpr bool top_shifted = false;
#endif
  static constexpr float x_scale(int j) {
    return top_shifted && j == C - 1 ? 1.f : 1.f / static_cast<float>(1u << (BITS * j));
  }
};

struct Problem {
  const uint8_t* w;     // (N, K * bits / 8) packed codes
  const void* s;        // (N, ng) scales, float16 or float32 (half_scales)
  const void* z;        // (N, ng) zeros, same dtype
  bool half_scales;
  const float* bias;    // (N,) or nullptr
  float* y;             // (M, N) for qgemv, (N, K) for dequant
  const uint8_t* end;   // one past the last packed byte (guards over-reads)
  int64_t M, K, N, G, ng, row_bytes;
  // prepared per call by prepare_x (fused path only)
  const float* x;       // (M, K) original x, for the portable path
  const float* xr;      // (M, nb * codes) x permuted to lane order and scaled by Lanes::x_scale(j)
  const float* xsum;    // (M, ng) sum of x over each group
  const int32_t* gidx;  // (nb, kLanes) group of each lane, relative to base
  const int64_t* base;  // (nb,) first group a block touches
  int64_t nb;           // blocks per row
};

// Element i of a float16 or float32 scale / zero array.
inline float scale_at(const void* src, int64_t i, bool half) {
  if (!half) return static_cast<const float*>(src)[i];
  return static_cast<float>(static_cast<const c10::Half*>(src)[i]);
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
template <int BITS>
void dequant_row_scalar(const Problem& p, int64_t r, float* out) {
  const uint8_t* row = p.w + r * p.row_bytes;
  for (int64_t g = 0; g < p.ng; ++g) {
    const float s = scale_at(p.s, r * p.ng + g, p.half_scales);
    const float z = scale_at(p.z, r * p.ng + g, p.half_scales);
    for (int64_t k = g * p.G; k < (g + 1) * p.G; ++k)
      out[k] = (static_cast<float>(code_at<BITS>(row, k)) - z) * s;
  }
}

template <int BITS>
void gemv_rows_scalar(const Problem& p, int64_t r0, int64_t r1) {
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

// ---- AVX-512: fused multiply (mask and fold) ---------------------------------------------------

#ifdef LMP_AVX512

// Block b of a row as 16 lanes of C codes each; bytes past the row end read as zero.
template <int BITS>
inline __m512i load_block(const uint8_t* row, int64_t b, int64_t row_bytes) {
  using L = Lanes<BITS>;
  const int64_t left = row_bytes - b * L::bytes;
  const uint8_t* src = row + b * L::bytes;
  if constexpr (BITS == 3) {
    const __mmask64 valid = (1ULL << std::min<int64_t>(left, 48)) - 1;
    const __m512i raw = _mm512_maskz_loadu_epi8(valid, src);
    // lane i <- bytes 3i, 3i+1, 3i+2, 0
    const __m512i idx = _mm512_setr_epi32(
        0x00020100, 0x00050403, 0x00080706, 0x000b0a09, 0x000e0d0c, 0x0011100f, 0x00141312,
        0x00171615, 0x001a1918, 0x001d1c1b, 0x00201f1e, 0x00232221, 0x00262524, 0x00292827,
        0x002c2b2a, 0x002f2e2d);
    return _mm512_maskz_permutexvar_epi8(0x7777777777777777ULL, idx, raw);
  } else {
    if (left >= 64) return _mm512_loadu_si512(src);
    return _mm512_maskz_loadu_epi8((1ULL << left) - 1, src);
  }
}

// 16 scales (or zeros) from element i on, as floats; lanes outside `valid` read as zero.
inline __m512 load_scales(const void* src, int64_t i, bool half, __mmask16 valid) {
  if (half)
    return _mm512_cvtph_ps(
        _mm256_maskz_loadu_epi16(valid, static_cast<const c10::Half*>(src) + i));
  return _mm512_maskz_loadu_ps(valid, static_cast<const float*>(src) + i);
}

// Row r's scales as floats into sb[0:ng] and zterm[m] = sum_g s_g z_g xsum[m, g].
template <int M>
inline void row_scales(const Problem& p, int64_t r, float* sb, float* zterm) {
  __m512 zt[M];
  for (int m = 0; m < M; ++m) zt[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.ng; g += 16) {
    const __mmask16 valid = p.ng - g >= 16 ? 0xFFFF : (1u << (p.ng - g)) - 1;
    const __m512 s = load_scales(p.s, r * p.ng + g, p.half_scales, valid);
    const __m512 sz = _mm512_mul_ps(s, load_scales(p.z, r * p.ng + g, p.half_scales, valid));
    _mm512_storeu_ps(sb + g, s);
    for (int m = 0; m < M; ++m)
      zt[m] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(valid, p.xsum + m * p.ng + g), zt[m]);
  }
  for (int m = 0; m < M; ++m) zterm[m] = _mm512_reduce_add_ps(zt[m]);
}

// y[0:M, r0:r1]. NC independent FMA chains per x row keep the FMA unit busy.
template <int BITS, int M>
void gemv_rows_avx512(const Problem& p, int64_t r0, int64_t r1) {
  using L = Lanes<BITS>;
  constexpr int NC = M == 1 ? 4 : (M == 2 ? 2 : 1);
  const int64_t xstride = p.nb * L::codes;
  thread_local std::vector<float> sbuf;  // row scales as floats (+16 slack for block loads)
  if (sbuf.size() < static_cast<size_t>(p.ng + 32)) sbuf.resize(p.ng + 32);
  float* sb = sbuf.data();  // one TLS lookup, not one per block
  for (int64_t r = r0; r < r1; ++r) {
    float zterm[M];
    row_scales<M>(p, r, sb, zterm);
    const uint8_t* row = p.w + r * p.row_bytes;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < p.nb; ++b) {
      const __m512i v = load_block<BITS>(row, b, p.row_bytes);
      const float* xb = p.xr + b * L::codes;
      __m512 t[M][NC];
      for (int m = 0; m < M; ++m)
        for (int c = 0; c < NC; ++c) t[m][c] = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int j = 0; j < L::C; ++j) {
        const __m512i bits = _mm512_set1_epi32(static_cast<int>(L::mask << (BITS * j)));
        const __m512 q = _mm512_cvtepu32_ps(_mm512_and_si512(v, bits));  // code * 2**(BITS*j)
        for (int m = 0; m < M; ++m) {
          const __m512 xv = _mm512_loadu_ps(xb + m * xstride + 16 * j);
          t[m][j % NC] = _mm512_fmadd_ps(q, xv, t[m][j % NC]);
        }
      }
      const __m512 s = _mm512_permutexvar_ps(_mm512_loadu_si512(p.gidx + 16 * b),
                                             _mm512_loadu_ps(sb + p.base[b]));
      for (int m = 0; m < M; ++m) {
        __m512 sum = t[m][0];
        for (int c = 1; c < NC; ++c) sum = _mm512_add_ps(sum, t[m][c]);
        acc[m] = _mm512_fmadd_ps(sum, s, acc[m]);
      }
    }
    const float bias = p.bias ? p.bias[r] : 0.f;
    for (int m = 0; m < M; ++m) p.y[m * p.N + r] = _mm512_reduce_add_ps(acc[m]) - zterm[m] + bias;
  }
}

// ---- AVX-512: dequantize (16-entry table per group) ------------------------------------------

// 16 codes starting at code k (k % 16 == 0), each in the low byte of a 32-bit lane.
template <int BITS>
inline __m512i codes16(const uint8_t* row, int64_t k, const uint8_t* end) {
  uint64_t v = 0;
  const uint8_t* src = row + k * BITS / 8;
  if (src + 8 <= end) std::memcpy(&v, src, 8);
  else std::memcpy(&v, src, 2 * BITS);
  const __m512i ctrl = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(BITS));
  return _mm512_multishift_epi64_epi8(ctrl, _mm512_set1_epi64(static_cast<long long>(v)));
}

template <int BITS>
void dequant_rows_avx512(const Problem& p, int64_t r0, int64_t r1) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // vpermps reads the low 4 bits of a lane: for BITS < 4 the table repeats with period 2**BITS
  const __m512 table =
      _mm512_cvtepi32_ps(_mm512_and_si512(lane, _mm512_set1_epi32((1 << BITS) - 1)));
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.w + r * p.row_bytes;
    float* out = p.y + r * p.K;
    for (int64_t g = 0; g < p.ng; ++g) {
      const float s = scale_at(p.s, r * p.ng + g, p.half_scales);
      const float z = scale_at(p.z, r * p.ng + g, p.half_scales);
      const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
      const __m512 lut = _mm512_mul_ps(_mm512_sub_ps(table, zv), sv);
      for (int64_t k = g * p.G; k < (g + 1) * p.G; k += 16) {
        __m512 w;
        if constexpr (BITS == 8) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
          w = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), zv), sv);
        } else {
          w = _mm512_permutexvar_ps(codes16<BITS>(row, k, p.end), lut);
        }
        _mm512_storeu_ps(out + k, w);
      }
    }
  }
}

#endif  // LMP_AVX512

// ---- AVX2 (+FMA, F16C): the same fused multiply with 8 lanes -----------------------------------

#ifdef LMP_AVX2

inline float hsum(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// Block b of a row as 8 lanes of C codes each; bytes past the row end read as zero.
template <int BITS>
inline __m256i load_block(const uint8_t* row, int64_t b, int64_t row_bytes) {
  using L = Lanes<BITS>;
  const int64_t left = row_bytes - b * L::bytes;
  const uint8_t* src = row + b * L::bytes;
  __m256i raw;
  if (left >= 32) {
    raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  } else {
    alignas(32) uint8_t buf[32] = {};
    std::memcpy(buf, src, std::min<int64_t>(left, L::bytes));
    raw = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
  }
  if constexpr (BITS == 3) {
    // bytes 0..11 to the low 128-bit half, 12..23 to the high one; lane i <- bytes 3i..3i+2, 0
    const __m256i half = _mm256_permutevar8x32_epi32(raw, _mm256_setr_epi32(0, 1, 2, 0, 3, 4, 5, 0));
    const __m256i idx = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                         0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
    return _mm256_shuffle_epi8(half, idx);
  } else {
    return raw;
  }
}

// 8 scales (or zeros) from element i on, as floats.
inline __m256 load8_scales(const void* src, int64_t i, bool half) {
  if (half)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const c10::Half*>(src) + i)));
  return _mm256_loadu_ps(static_cast<const float*>(src) + i);
}

// Row r's scales as floats into sb[0:ng] and zterm[m] = sum_g s_g z_g xsum[m, g] (8 groups at a
// time, the rest one by one).
template <int M>
inline void row_scales(const Problem& p, int64_t r, float* sb, float* zterm) {
  __m256 zv[M];
  for (int m = 0; m < M; ++m) zv[m] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= p.ng; g += 8) {
    const __m256 s = load8_scales(p.s, r * p.ng + g, p.half_scales);
    const __m256 sz = _mm256_mul_ps(s, load8_scales(p.z, r * p.ng + g, p.half_scales));
    _mm256_storeu_ps(sb + g, s);
    for (int m = 0; m < M; ++m) zv[m] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(p.xsum + m * p.ng + g), zv[m]);
  }
  float zt[M];
  for (int m = 0; m < M; ++m) zt[m] = hsum(zv[m]);
  for (; g < p.ng; ++g) {
    const float s = scale_at(p.s, r * p.ng + g, p.half_scales);
    const float sz = s * scale_at(p.z, r * p.ng + g, p.half_scales);
    sb[g] = s;
    for (int m = 0; m < M; ++m) zt[m] += sz * p.xsum[m * p.ng + g];
  }
  for (int m = 0; m < M; ++m) zterm[m] = zt[m];
}

// Code j of every lane as float (times 2**(BITS * j) unless the lane's top code is shifted down).
template <int BITS, int J>
inline __m256 lane_codes(__m256i v) {
  using L = Lanes<BITS>;
  if constexpr (L::top_shifted && J == L::C - 1)
    return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, BITS * J));
  else
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(L::mask << (BITS * J)))));
}

template <int BITS, int M, int NC, int J = 0>
inline void fold_codes(__m256i v, const float* xb, int64_t xstride, __m256 (&t)[M][NC]) {
  if constexpr (J < Lanes<BITS>::C) {
    const __m256 q = lane_codes<BITS, J>(v);
    for (int m = 0; m < M; ++m)
      t[m][J % NC] = _mm256_fmadd_ps(q, _mm256_loadu_ps(xb + m * xstride + kLanes * J), t[m][J % NC]);
    fold_codes<BITS, M, NC, J + 1>(v, xb, xstride, t);
  }
}

// y[0:M, r0:r1]. NC independent FMA chains per x row keep the FMA units busy.
template <int BITS, int M>
void gemv_rows_avx2(const Problem& p, int64_t r0, int64_t r1) {
  using L = Lanes<BITS>;
  constexpr int NC = M == 1 ? 4 : (M == 2 ? 2 : 1);
  const int64_t xstride = p.nb * L::codes;
  thread_local std::vector<float> sbuf;  // row scales as floats (+ slack for block loads)
  if (sbuf.size() < static_cast<size_t>(p.ng + 32)) sbuf.resize(p.ng + 32);
  float* sb = sbuf.data();
  for (int64_t r = r0; r < r1; ++r) {
    float zterm[M];
    row_scales<M>(p, r, sb, zterm);
    const uint8_t* row = p.w + r * p.row_bytes;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < p.nb; ++b) {
      const __m256i v = load_block<BITS>(row, b, p.row_bytes);
      __m256 t[M][NC];
      for (int m = 0; m < M; ++m)
        for (int c = 0; c < NC; ++c) t[m][c] = _mm256_setzero_ps();
      fold_codes<BITS, M, NC>(v, p.xr + b * L::codes, xstride, t);
      const __m256 s = _mm256_permutevar8x32_ps(
          _mm256_loadu_ps(sb + p.base[b]),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.gidx + kLanes * b)));
      for (int m = 0; m < M; ++m) {
        __m256 sum = t[m][0];
        for (int c = 1; c < NC; ++c) sum = _mm256_add_ps(sum, t[m][c]);
        acc[m] = _mm256_fmadd_ps(sum, s, acc[m]);
      }
    }
    const float bias = p.bias ? p.bias[r] : 0.f;
    for (int m = 0; m < M; ++m) p.y[m * p.N + r] = hsum(acc[m]) - zterm[m] + bias;
  }
}

// Dequantize rows (8 codes at a time, k % 8 == 0): (q - z) * s exactly as the reference.
template <int BITS>
void dequant_rows_avx2(const Problem& p, int64_t r0, int64_t r1) {
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS % 32, 5 * BITS % 32,
                                           6 * BITS % 32, 7 * BITS % 32);
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.w + r * p.row_bytes;
    float* out = p.y + r * p.K;
    for (int64_t g = 0; g < p.ng; ++g) {
      const __m256 sv = _mm256_set1_ps(scale_at(p.s, r * p.ng + g, p.half_scales));
      const __m256 zv = _mm256_set1_ps(scale_at(p.z, r * p.ng + g, p.half_scales));
      for (int64_t k = g * p.G; k < (g + 1) * p.G; k += 8) {
        __m256i q;
        if constexpr (BITS == 8) {
          q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k)));
        } else {
          uint32_t word = 0;  // the 8 codes: BITS bytes
          std::memcpy(&word, row + k * BITS / 8, BITS);
          q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), mask);
        }
        const __m256 w = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), zv), sv);
        _mm256_storeu_ps(out + k, w);
      }
    }
  }
}

#endif  // LMP_AVX2

// ---- dispatch ---------------------------------------------------------------------------------

template <int BITS>
inline bool fused_ok(int64_t G, int64_t K) {
#if defined(LMP_AVX512) || defined(LMP_AVX2)
  return G % Lanes<BITS>::C == 0 || G == K;  // every lane's codes share one group
#else
  return false;
#endif
}

template <int BITS>
void gemv_rows(const Problem& p, int64_t r0, int64_t r1) {
#ifdef LMP_AVX512
  if (fused_ok<BITS>(p.G, p.K)) {
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
#elif defined(LMP_AVX2)
  if (fused_ok<BITS>(p.G, p.K)) {
    switch (p.M) {
      case 1: return gemv_rows_avx2<BITS, 1>(p, r0, r1);
      case 2: return gemv_rows_avx2<BITS, 2>(p, r0, r1);
      case 3: return gemv_rows_avx2<BITS, 3>(p, r0, r1);
      case 4: return gemv_rows_avx2<BITS, 4>(p, r0, r1);
      case 5: return gemv_rows_avx2<BITS, 5>(p, r0, r1);
      case 6: return gemv_rows_avx2<BITS, 6>(p, r0, r1);
      case 7: return gemv_rows_avx2<BITS, 7>(p, r0, r1);
      case 8: return gemv_rows_avx2<BITS, 8>(p, r0, r1);
    }
  }
#endif
  gemv_rows_scalar<BITS>(p, r0, r1);
}

template <int BITS>
void dequant_rows(const Problem& p, int64_t r0, int64_t r1) {
#ifdef LMP_AVX512
  if (p.G % 16 == 0) return dequant_rows_avx512<BITS>(p, r0, r1);
#elif defined(LMP_AVX2)
  if (p.G % 8 == 0) return dequant_rows_avx2<BITS>(p, r0, r1);
#endif
  for (int64_t r = r0; r < r1; ++r) dequant_row_scalar<BITS>(p, r, p.y + r * p.K);
}

// Rows per task: a task should stream at least ~64 KB (a few microseconds), or waking the other
// thread costs more than it saves -- much more when other processes share the cores.
inline int64_t grain(int64_t N, int64_t row_bytes) {
  constexpr int64_t kMinBytes = 64 * 1024;
  return std::max<int64_t>(1, std::min(N, (kMinBytes + row_bytes - 1) / row_bytes));
}

void run(const Problem& p, int64_t bits, bool dequant) {
  at::parallel_for(0, p.N, grain(p.N, p.row_bytes), [&](int64_t r0, int64_t r1) {
    switch (bits) {
      case 2: return dequant ? dequant_rows<2>(p, r0, r1) : gemv_rows<2>(p, r0, r1);
      case 3: return dequant ? dequant_rows<3>(p, r0, r1) : gemv_rows<3>(p, r0, r1);
      case 4: return dequant ? dequant_rows<4>(p, r0, r1) : gemv_rows<4>(p, r0, r1);
      case 8: return dequant ? dequant_rows<8>(p, r0, r1) : gemv_rows<8>(p, r0, r1);
    }
  });
}

// Scratch that prepare_x fills once per call (x is tiny next to W); reused across calls.
struct XPrep {
  std::vector<float> xr, xsum;
  std::vector<int32_t> gidx;
  std::vector<int64_t> base;
};

// x in lane order, scaled by Lanes::x_scale(j); group sums of x; each lane's group.
template <int BITS>
void prepare_x(const float* x, int64_t M, int64_t K, int64_t G, XPrep& out, int64_t& nb) {
  using L = Lanes<BITS>;
  const int64_t ng = K / G;
  nb = (K + L::codes - 1) / L::codes;
  out.xr.assign(M * nb * L::codes, 0.f);
  out.xsum.resize(M * ng);
  float scale[L::C];  // powers of two: exact
  for (int j = 0; j < L::C; ++j) scale[j] = L::x_scale(j);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    float* xr = out.xr.data() + m * nb * L::codes;
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t i = 0; i < kLanes; ++i)
        for (int j = 0; j < L::C; ++j) {
          const int64_t k = b * L::codes + i * L::C + j;
          if (k < K) xr[b * L::codes + kLanes * j + i] = xm[k] * scale[j];
        }
    for (int64_t g = 0; g < ng; ++g) {
      double sum = 0.0;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) sum += xm[k];
      out.xsum[m * ng + g] = static_cast<float>(sum);
    }
  }
  out.gidx.resize(nb * kLanes);
  out.base.resize(nb);
  for (int64_t b = 0; b < nb; ++b) {
    out.base[b] = b * L::codes / G;
    for (int64_t i = 0; i < kLanes; ++i) {
      const int64_t k = std::min(b * L::codes + i * L::C, K - 1);
      out.gidx[b * kLanes + i] = static_cast<int32_t>(k / G - out.base[b]);
    }
  }
}

}  // namespace

namespace {

// x prepared once for bits; the pointers of p that depend on x set from prep.
void prepare(int bits, const float* x, int64_t M, int64_t K, int64_t G, Problem& p) {
  thread_local XPrep prep;
  switch (bits) {
    case 2: prepare_x<2>(x, M, K, G, prep, p.nb); break;
    case 3: prepare_x<3>(x, M, K, G, prep, p.nb); break;
    case 4: prepare_x<4>(x, M, K, G, prep, p.nb); break;
    case 8: prepare_x<8>(x, M, K, G, prep, p.nb); break;
  }
  p.x = x, p.M = M, p.K = K, p.G = G, p.ng = K / G, p.row_bytes = K * bits / 8;
  p.xr = prep.xr.data(), p.xsum = prep.xsum.data();
  p.gidx = prep.gidx.data(), p.base = prep.base.data();
}

void gemv_range(const Problem& p, int bits, int64_t r0, int64_t r1) {
  switch (bits) {
    case 2: return gemv_rows<2>(p, r0, r1);
    case 3: return gemv_rows<3>(p, r0, r1);
    case 4: return gemv_rows<4>(p, r0, r1);
    case 8: return gemv_rows<8>(p, r0, r1);
  }
}

}  // namespace

// y (M, N) = x (M, K) @ W.T (+ bias), 1 <= M <= kMaxRows, W = (q - z) * s from packed rows w.
void gemv(int bits, const uint8_t* w, const void* s, const void* z, bool half_scales,
          const float* bias, const float* x, float* y, int64_t M, int64_t K, int64_t N,
          int64_t G) {
  const Matrix m{w, s, z, bias, y, N};
  gemv_many(bits, &m, 1, half_scales, x, M, K, G);
}

// gemv for several matrices that read the same x: x prepared once, one parallel loop over the
// rows of all of them (row i of the concatenation belongs to the matrix whose range holds it).
void gemv_many(int bits, const Matrix* mats, int64_t count, bool half_scales, const float* x,
               int64_t M, int64_t K, int64_t G) {
  Problem shared{};
  shared.half_scales = half_scales;
  prepare(bits, x, M, K, G, shared);
  std::vector<Problem> ps(count, shared);
  std::vector<int64_t> start(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) {
    Problem& p = ps[i];
    p.w = mats[i].w, p.s = mats[i].s, p.z = mats[i].z, p.bias = mats[i].bias, p.y = mats[i].y;
    p.N = mats[i].N, p.end = p.w + p.N * p.row_bytes;
    start[i + 1] = start[i] + p.N;
  }
  at::parallel_for(0, start[count], grain(start[count], shared.row_bytes), [&](int64_t r0, int64_t r1) {
    for (int64_t i = 0; i < count; ++i) {
      const int64_t a = std::max(r0, start[i]), b = std::min(r1, start[i + 1]);
      if (a < b) gemv_range(ps[i], bits, a - start[i], b - start[i]);
    }
  });
}

// out (N, K) = (q - z) * s, bit-identical to lmpress.quant.pack.dequantize_packed.
void dequant(int bits, const uint8_t* w, const void* s, const void* z, bool half_scales,
             float* out, int64_t K, int64_t N, int64_t G) {
  Problem p{};
  p.w = w, p.s = s, p.z = z, p.half_scales = half_scales, p.y = out;
  p.K = K, p.N = N, p.G = G, p.ng = K / G, p.row_bytes = K * bits / 8;
  p.end = w + N * p.row_bytes;
  run(p, bits, /*dequant=*/true);
}

int max_rows() { return kMaxRows; }

const char* simd() {
#if defined(LMP_AVX512)
  return "avx512-vbmi";
#elif defined(LMP_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace lmpress_kernel
