// Entry points of the kernels in qgemv_kernel.cpp, shared with the torch glue in qgemv.cpp.
#pragma once

#include <cstdint>

namespace lmpress_kernel {

void gemv(int bits, const uint8_t* w, const void* s, const void* z, bool half_scales,
          const float* bias, const float* x, float* y, int64_t M, int64_t K, int64_t N,
          int64_t G);
struct Matrix {  // one packed matrix of a gemv_many call and where its output goes
  const uint8_t* w;
  const void* s;
  const void* z;
  const float* bias;
  float* y;
  int64_t N;
};
void gemv_many(int bits, const Matrix* mats, int64_t count, bool half_scales, const float* x,
               int64_t M, int64_t K, int64_t G);
void dequant(int bits, const uint8_t* w, const void* s, const void* z, bool half_scales,
             float* out, int64_t K, int64_t N, int64_t G);
int max_rows();
const char* simd();

}  // namespace lmpress_kernel
