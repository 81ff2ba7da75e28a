// Matrix products of a few rows (the decode step's 1-64 tokens) against weights laid out for
// streaming: y[m, n] (+)= x[m, k] · W[k, n] with W stored as panels [ceil(n/32), k, 32] (32
// consecutive columns of every row, zero padded), and y[m, n] = x[m, :] · H[n, :] for a head
// stored [n, k] (tied embeddings). Decoding reads every weight once per token: MKL's sgemm
// packs each weight again on every call and reached ~7 GB/s on a 2-core AMD EPYC, while one
// sequential pass over the panels runs at the memory's ~25 GB/s.
//
// The vector loops are compiled for AVX-512F and for AVX2+FMA through function target
// attributes, not -march, and `vector_level()` asks the CPU (and the OS's saved vector state,
// via libgcc) which one it may run: the library keeps running on any x86-64 CPU. Level 0 means
// neither is available; callers then use MKL on the plain layout.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace rlhf {

constexpr int kPanelWidth = 32;
// Panels are read strictly in order: ask for the data 16 panel rows (2 KiB) ahead.
constexpr int kPrefetchFloats = 16 * kPanelWidth;

inline int vector_level() {
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  return level;
}

namespace panel_detail {

template <int M, class F>
inline void remaining_rows(int rows, int first, F& f) {
  if constexpr (M > 0) {
    if (rows == M) {
      f(std::integral_constant<int, M>{}, first);
    } else {
      remaining_rows<M - 1>(rows, first, f);
    }
  }
}

// Rows [0, m) in groups of `Group`, then the remainder: f(std::integral_constant<int, M>{}, first
// row) with the group's size M a compile-time constant (the kernels keep M rows of accumulators
// in registers).
template <int Group, class F>
inline void for_row_groups(int m, F f) {
  int r = 0;
  for (; r + Group <= m; r += Group) f(std::integral_constant<int, Group>{}, r);
  remaining_rows<Group - 1>(m - r, r, f);
}

// One 32-column panel, rows [0, M) of x: y_block[r, 0:32] = x[r, :] · panel (+ y_block).
template <int M>
__attribute__((target("avx512f"))) inline void panel_avx512(const float* x, int64_t ldx, int k, const float* panel,
                                                              float* out, int64_t ldo, int columns, bool accumulate) {
  __m512 low[M], high[M];
  for (int r = 0; r < M; ++r) low[r] = high[r] = _mm512_setzero_ps();
  const float* w = panel;
  for (int i = 0; i < k; ++i, w += kPanelWidth) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchFloats), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
    for (int r = 0; r < M; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + i]);
      low[r] = _mm512_fmadd_ps(xv, w0, low[r]);
      high[r] = _mm512_fmadd_ps(xv, w1, high[r]);
    }
  }
  const __mmask16 mask_low = columns >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << columns) - 1);
  const __mmask16 mask_high =
      columns >= 32 ? 0xFFFF : columns <= 16 ? 0 : static_cast<__mmask16>((1u << (columns - 16)) - 1);
  for (int r = 0; r < M; ++r) {
    float* o = out + r * ldo;
    if (accumulate) {
      low[r] = _mm512_add_ps(low[r], _mm512_maskz_loadu_ps(mask_low, o));
      high[r] = _mm512_add_ps(high[r], _mm512_maskz_loadu_ps(mask_high, o + 16));
    }
    _mm512_mask_storeu_ps(o, mask_low, low[r]);
    _mm512_mask_storeu_ps(o + 16, mask_high, high[r]);
  }
}

// AVX2 has 16 vector registers: 4 rows x 16 columns of accumulators per pass, the panel's two
// halves one after the other (the panel, 128 B x k, stays in cache between them).
template <int M>
__attribute__((target("avx2,fma"))) inline void half_panel_avx2(const float* x, int64_t ldx, int k, const float* panel,
                                                                  float* out, int64_t ldo, int columns, bool accumulate) {
  __m256 low[M], high[M];
  for (int r = 0; r < M; ++r) low[r] = high[r] = _mm256_setzero_ps();
  const float* w = panel;
  for (int i = 0; i < k; ++i, w += kPanelWidth) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchFloats), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
    for (int r = 0; r < M; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * ldx + i);
      low[r] = _mm256_fmadd_ps(xv, w0, low[r]);
      high[r] = _mm256_fmadd_ps(xv, w1, high[r]);
    }
  }
  // Spill to a buffer in a loop of its own: a column loop next to the accumulators made GCC keep
  // them in memory through the main loop (a store per FMA).
  alignas(32) float rows[M][16];
  for (int r = 0; r < M; ++r) {
    _mm256_store_ps(rows[r], low[r]);
    _mm256_store_ps(rows[r] + 8, high[r]);
  }
  for (int r = 0; r < M; ++r) {
    float* o = out + r * ldo;
    for (int c = 0; c < columns; ++c) o[c] = accumulate ? o[c] + rows[r][c] : rows[r][c];
  }
}

__attribute__((target("avx512f"))) inline void panels_avx512(const float* x, int m, int k, const float* panels, int n,
                                                               float* y, bool accumulate) {
  const int64_t panel_stride = static_cast<int64_t>(k) * kPanelWidth;
  for (int p = 0; p * kPanelWidth < n; ++p) {
    const float* panel = panels + p * panel_stride;
    const int columns = std::min(kPanelWidth, n - p * kPanelWidth);
    float* out = y + p * kPanelWidth;
    for_row_groups<8>(m, [&](auto rows, int r) {
      panel_avx512<rows>(x + r * int64_t{k}, k, k, panel, out + r * int64_t{n}, n, columns, accumulate);
    });
  }
}

__attribute__((target("avx2,fma"))) inline void panels_avx2(const float* x, int m, int k, const float* panels, int n,
                                                              float* y, bool accumulate) {
  const int64_t panel_stride = static_cast<int64_t>(k) * kPanelWidth;
  for (int p = 0; p * kPanelWidth < n; ++p) {
    for (int half = 0; half < 2; ++half) {
      const int first = p * kPanelWidth + half * 16;
      if (first >= n) break;
      const float* panel = panels + p * panel_stride + half * 16;
      const int columns = std::min(16, n - first);
      float* out = y + first;
      for_row_groups<4>(m, [&](auto rows, int r) {
        half_panel_avx2<rows>(x + r * int64_t{k}, k, k, panel, out + r * int64_t{n}, n, columns, accumulate);
      });
    }
  }
}

// y[r, j] = x[r, :] · head[j, :] for rows [0, M): each head row is read once for M rows.
template <int M>
__attribute__((target("avx2,fma"))) inline void head_rows_avx2(const float* x, int k, const float* head, int n, float* y) {
  const int vector_end = k - k % 8;
  for (int j = 0; j < n; ++j) {
    const float* h = head + static_cast<int64_t>(j) * k;
    __m256 acc[M];
    for (int r = 0; r < M; ++r) acc[r] = _mm256_setzero_ps();
    for (int i = 0; i < vector_end; i += 8) {
      const __m256 hv = _mm256_loadu_ps(h + i);
      for (int r = 0; r < M; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * int64_t{k} + i), hv, acc[r]);
    }
    alignas(32) float lanes[M][8];
    for (int r = 0; r < M; ++r) _mm256_store_ps(lanes[r], acc[r]);
    for (int r = 0; r < M; ++r) {
      const float* l = lanes[r];
      float sum = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
      for (int i = vector_end; i < k; ++i) sum += x[r * int64_t{k} + i] * h[i];
      y[r * int64_t{n} + j] = sum;
    }
  }
}

}  // namespace panel_detail

// y[m, n] (+)= x[m, k] · W with W as panels [ceil(n/32), k, 32]; level 2 or 1 (see vector_level).
inline void panel_gemm(const float* x, int m, int k, const float* panels, int n, float* y, bool accumulate, int level) {
  if (level >= 2) {
    panel_detail::panels_avx512(x, m, k, panels, n, y, accumulate);
  } else {
    panel_detail::panels_avx2(x, m, k, panels, n, y, accumulate);
  }
}

// y[m, n] = x[m, k] · head[n, k]ᵀ, rows in groups of up to 4, both levels with the 256-bit
// kernel. Measured for SmolLM2's head (49152 x 576), 8 rows, on the AMD EPYC: groups of 4 rows
// 9.9 ms, of 8 rows 15 ms, a 512-bit kernel of 8 rows 13.6 ms (its horizontal sums dominate).
inline void head_gemm(const float* x, int m, int k, const float* head, int n, float* y, int /*level*/) {
  panel_detail::for_row_groups<4>(m, [&](auto rows, int r) {
    panel_detail::head_rows_avx2<rows>(x + r * int64_t{k}, k, head, n, y + r * int64_t{n});
  });
}

}  // namespace rlhf
