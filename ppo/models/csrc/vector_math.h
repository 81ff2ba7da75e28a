// Elementwise helpers shared by the CPU kernels. Exponentials go through MKL's vector math
// (vmsExp, the MKL Paddle ships and already loads): it dispatches AVX2/AVX-512 code at run time,
// while a scalar std::exp loop is ~5x slower than Paddle's own silu, and a hand-written
// polynomial compiled for baseline x86-64 (no -march, so the binary runs on every CPU) ~10x.
#pragma once

#include <cstdint>
#include <vector>

extern "C" void vmsExp(int n, const float* a, float* r, unsigned long long mode);

namespace rlhf {

constexpr unsigned long long kVmlHighAccuracy = 0x2;  // VML_HA: within 1 ulp, NaN/inf per IEEE

// sigmoid(x[i]) for i < n into out (may alias x).
inline void sigmoid(const float* x, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = -x[i];
  vmsExp(static_cast<int>(n), out, out, kVmlHighAccuracy);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = 1.0f / (1.0f + out[i]);
}

// out[i] = silu(gate[i]) * up[i]; `scratch` is resized to n.
inline void silu_times(const float* gate, const float* up, float* out, int64_t n, std::vector<float>& scratch) {
  scratch.resize(n);
  sigmoid(gate, scratch.data(), n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] * scratch[i] * up[i];
}

}  // namespace rlhf
