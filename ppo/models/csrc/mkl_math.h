// Shared by the CPU kernels: the row loops both files need, and what they take from the MKL that
// Paddle ships and already loads (sgemm, vector exp). Both MKL routines dispatch AVX2/AVX-512
// code at run time, so the kernels themselves are compiled for baseline x86-64 (no -march) and
// the binary runs on every CPU. A scalar std::exp loop is ~5x slower than Paddle's own silu, a
// hand-written polynomial at baseline vector width ~10x.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c,
                            int ldc);
extern "C" void vmsExp(int n, const float* a, float* r, unsigned long long mode);

namespace rlhf {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Row-major c[m, n] = alpha * op(a) · op(b) + beta * c, every matrix addressed by its leading
// dimension (so heads interleaved in a [tokens, heads * dim] tensor are used in place).
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
              c, static_cast<int>(ldc));
}

// VML_HA (within 1 ulp, NaN/inf per IEEE) | VML_ERRMODE_IGNORE: with the default error mode
// every underflowing or overflowing element takes a slow path setting errno (13x slower over
// attention scores whose masked half underflows).
constexpr unsigned long long kVmlMode = 0x2 | 0x100;

// sigmoid(x[i]) for i < n into out (may alias x).
inline void sigmoid(const float* x, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = -x[i];
  vmsExp(static_cast<int>(n), out, out, kVmlMode);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = 1.0f / (1.0f + out[i]);
}

// PaddleNLP's RMSNorm of one row: out = x * rsqrt(mean(x^2) + eps) * weight; returns the
// rsqrt factor (kept for the backward).
inline float rms_norm_row(const float* x, const float* weight, float* out, int64_t width, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < width; ++i) sum += x[i] * x[i];
  const float scale = 1.0f / std::sqrt(sum / width + eps);
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) out[i] = (x[i] * scale) * weight[i];
  return scale;
}

// out[i] = silu(gate[i]) * up[i]; `scratch` is resized to n.
inline void silu_times(const float* gate, const float* up, float* out, int64_t n, std::vector<float>& scratch) {
  scratch.resize(n);
  sigmoid(gate, scratch.data(), n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] * scratch[i] * up[i];
}

}  // namespace rlhf
