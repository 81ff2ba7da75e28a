// One decode step of a Llama/Qwen2 decoder on CPU, all layers in one call.
//
// The eager decoder spends most of a decode step dispatching ~30 small ops per layer (norms,
// RoPE, cache writes, attention, SwiGLU); here they run as plain loops between MKL GEMMs, so a
// step costs its matmuls plus a few microseconds per layer. float32 only; the Python side
// (`ppo/models/cpu_extension.py`) checks every precondition and falls back to the eager
// decoder otherwise. Built without -march flags: the loops are SSE2-vectorised, MKL picks its
// own kernels at run time, and the streaming projections (panel_gemm.h) run AVX2 or AVX-512 code
// only where the CPU reports it, so the same binary runs on every x86-64 CPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "paddle/extension.h"
#include "mkl_math.h"
#include "panel_gemm.h"

namespace {

// c[m, n] = a[m, k] · b (+ c when accumulate): b is [k, n], or [n, k] when transpose_b.
void matmul(const float* a, const float* b, float* c, int m, int n, int k, bool transpose_b,
            bool accumulate) {
  rlhf::gemm(false, transpose_b, m, n, k, 1.0f, a, k, b, transpose_b ? k : n, accumulate ? 1.0f : 0.0f, c, n);
}

// c[m, n] = a[m, k] · W (+ c when accumulate): W [k, n] for MKL (vector_level 0), else W's
// panels [ceil(n/32), k, 32] for the streaming kernels of panel_gemm.h.
void project(const float* a, const paddle::Tensor& weight, float* c, int m, int n, int k, bool accumulate,
             int vector_level) {
  if (vector_level > 0) {
    rlhf::panel_gemm(a, m, k, weight.data<float>(), n, c, accumulate, vector_level);
  } else {
    matmul(a, weight.data<float>(), c, m, n, k, false, accumulate);
  }
}

void rms_norm(const float* x, const float* weight, float* out, int rows, int width, float eps) {
  for (int r = 0; r < rows; ++r) {
    rlhf::rms_norm_row(x + static_cast<int64_t>(r) * width, weight, out + static_cast<int64_t>(r) * width, width, eps);
  }
}

// In place over one head: x * cos + rotate_half(x) * sin, with rotate_half's sign folded into
// sin_signed (so it is roll(x, D/2) * sin_signed).
void rotate(float* x, const float* cos, const float* sin_signed, int head_dim, float* scratch) {
  const int half = head_dim / 2;
  std::memcpy(scratch, x + half, sizeof(float) * half);
  std::memcpy(scratch + half, x, sizeof(float) * half);
#pragma omp simd
  for (int i = 0; i < head_dim; ++i) x[i] = x[i] * cos[i] + scratch[i] * sin_signed[i];
}

struct Shapes {
  int batch, hidden, heads, kv_heads, head_dim, intermediate, capacity, slot;
  int groups() const { return heads / kv_heads; }
  int q_width() const { return heads * head_dim; }
  int kv_width() const { return kv_heads * head_dim; }
};

// Grouped-query attention of one new token per row over cache slots [0, slot].
void attend(const float* query,  // [B, H*D], already scaled
            const float* keys, const float* values,  // [B, Hkv, L, D]
            const float* bias,  // [B, Hkv, G, L] additive
            float* out,  // [B, H*D]
            const Shapes& s, std::vector<float>& scores) {
  const int visible = s.slot + 1;  // later slots are masked: exp() of them is exactly 0
  const int d = s.head_dim, g_count = s.groups();
  scores.resize(visible);
  for (int b = 0; b < s.batch; ++b) {
    for (int kvh = 0; kvh < s.kv_heads; ++kvh) {
      const int64_t cache_offset = (static_cast<int64_t>(b) * s.kv_heads + kvh) * s.capacity * d;
      const float* k_rows = keys + cache_offset;
      const float* v_rows = values + cache_offset;
      for (int g = 0; g < g_count; ++g) {
        const int head = kvh * g_count + g;
        const float* q = query + static_cast<int64_t>(b) * s.q_width() + head * d;
        const float* head_bias = bias + ((static_cast<int64_t>(b) * s.kv_heads + kvh) * g_count + g) * s.capacity;
        float max_score = -INFINITY;
        for (int t = 0; t < visible; ++t) {
          const float* k = k_rows + static_cast<int64_t>(t) * d;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int i = 0; i < d; ++i) dot += q[i] * k[i];
          scores[t] = dot + head_bias[t];
          max_score = std::max(max_score, scores[t]);
        }
        float total = 0.0f;
        for (int t = 0; t < visible; ++t) {
          scores[t] = std::exp(scores[t] - max_score);
          total += scores[t];
        }
        float* o = out + static_cast<int64_t>(b) * s.q_width() + head * d;
        std::fill(o, o + d, 0.0f);
        for (int t = 0; t < visible; ++t) {
          const float p = scores[t] / total;
          const float* v = v_rows + static_cast<int64_t>(t) * d;
#pragma omp simd
          for (int i = 0; i < d; ++i) o[i] += p * v[i];
        }
      }
    }
  }
}

}  // namespace

// Weights per layer, in this order (`per_layer` tensors each): input_norm, query_key [hidden,
// (H+Hkv)*D], value [hidden, Hkv*D], o_proj [H*D, hidden], post_norm, gate_up [hidden, 2F],
// down [F, hidden], then query_key_bias and value_bias when has_bias. With vector_level 1 or 2
// (AVX2 / AVX-512, see panel_gemm.h) the five projections come as panels [ceil(n/32), k, 32] and
// the LM head as [V, hidden] (lm_head_transposed).
std::vector<paddle::Tensor> DecodeStep(
    const paddle::Tensor& token_ids,  // [B] int64
    const paddle::Tensor& positions,  // [B] int64
    const paddle::Tensor& embed_tokens,  // [V, hidden]
    const paddle::Tensor& rope_cos,  // [max_positions, (H+Hkv)*D]
    const paddle::Tensor& rope_sin_signed,  // [max_positions, (H+Hkv)*D]
    const std::vector<paddle::Tensor>& layer_weights,
    const std::vector<paddle::Tensor>& key_caches,  // per layer [B, Hkv, L, D], written at slot
    const std::vector<paddle::Tensor>& value_caches,
    const paddle::Tensor& attention_bias,  // [B, Hkv, G, L], slot revealed here
    const paddle::Tensor& final_norm,  // [hidden]
    const paddle::Tensor& lm_head,  // [hidden, V] or [V, hidden]
    int slot, float eps, int num_heads, int num_kv_heads, bool has_bias, bool lm_head_transposed,
    bool divide_query_by_sqrt_dim, int vector_level) {
  const int per_layer = has_bias ? 9 : 7;
  const int num_layers = static_cast<int>(key_caches.size());
  PD_CHECK(static_cast<int>(layer_weights.size()) == per_layer * num_layers, "expected ", per_layer,
           " weights per layer");
  PD_CHECK(static_cast<int>(value_caches.size()) == num_layers, "one value cache per layer");

  Shapes s;
  s.batch = static_cast<int>(token_ids.shape()[0]);
  s.hidden = static_cast<int>(embed_tokens.shape()[1]);
  s.heads = num_heads;
  s.kv_heads = num_kv_heads;
  s.head_dim = s.hidden / num_heads;
  PD_CHECK(vector_level >= 0 && vector_level <= rlhf::vector_level(), "vector level ", vector_level,
           " is beyond this CPU's ", rlhf::vector_level());
  PD_CHECK(vector_level == 0 || lm_head_transposed, "the streaming kernels take the LM head as [V, hidden]");
  // down_proj: [F, hidden], or its panels [ceil(hidden/32), F, 32].
  s.intermediate = static_cast<int>(layer_weights[6].shape()[vector_level > 0 ? 1 : 0]);
  s.capacity = static_cast<int>(attention_bias.shape()[3]);
  s.slot = slot;
  PD_CHECK(slot >= 0 && slot < s.capacity, "slot ", slot, " outside the cache of ", s.capacity);
  const int vocab = static_cast<int>(lm_head_transposed ? lm_head.shape()[0] : lm_head.shape()[1]);
  const int rotated_width = s.q_width() + s.kv_width();
  const int d = s.head_dim;

  const int64_t* ids = token_ids.data<int64_t>();
  const int64_t* pos = positions.data<int64_t>();
  std::vector<float> hidden(static_cast<size_t>(s.batch) * s.hidden);
  const int64_t embed_rows = embed_tokens.shape()[0];
  const int64_t max_positions = rope_cos.shape()[0];
  for (int b = 0; b < s.batch; ++b) {
    PD_CHECK(ids[b] >= 0 && ids[b] < embed_rows, "token id ", ids[b], " outside the vocabulary");
    PD_CHECK(pos[b] >= 0 && pos[b] < max_positions, "position ", pos[b], " outside the RoPE table");
    std::memcpy(hidden.data() + static_cast<size_t>(b) * s.hidden,
                embed_tokens.data<float>() + ids[b] * s.hidden, sizeof(float) * s.hidden);
  }

  // The new slot becomes visible to every row (what KVCache.reveal_slot does).
  float* bias = const_cast<float*>(attention_bias.data<float>());
  const int64_t bias_rows = static_cast<int64_t>(s.batch) * s.kv_heads * s.groups();
  for (int64_t r = 0; r < bias_rows; ++r) bias[r * s.capacity + slot] = 0.0f;

  std::vector<float> normed(hidden.size()), query_key(static_cast<size_t>(s.batch) * rotated_width),
      value(static_cast<size_t>(s.batch) * s.kv_width()), attended(static_cast<size_t>(s.batch) * s.q_width()),
      query(attended.size()), gate_up(static_cast<size_t>(s.batch) * 2 * s.intermediate),
      activation(static_cast<size_t>(s.batch) * s.intermediate), scratch(d), scores, scratch_exp;
  const float query_scale = 1.0f / std::sqrt(static_cast<float>(d));
  const float sqrt_dim = std::sqrt(static_cast<float>(d));

  for (int layer = 0; layer < num_layers; ++layer) {
    const paddle::Tensor* w = layer_weights.data() + layer * per_layer;
    rms_norm(hidden.data(), w[0].data<float>(), normed.data(), s.batch, s.hidden, eps);
    project(normed.data(), w[1], query_key.data(), s.batch, rotated_width, s.hidden, false, vector_level);
    project(normed.data(), w[2], value.data(), s.batch, s.kv_width(), s.hidden, false, vector_level);
    if (has_bias) {
      const float* qk_bias = w[7].data<float>();
      const float* v_bias = w[8].data<float>();
      for (int b = 0; b < s.batch; ++b) {
        float* row = query_key.data() + static_cast<size_t>(b) * rotated_width;
        for (int i = 0; i < rotated_width; ++i) row[i] += qk_bias[i];
        float* v_row = value.data() + static_cast<size_t>(b) * s.kv_width();
        for (int i = 0; i < s.kv_width(); ++i) v_row[i] += v_bias[i];
      }
    }
    float* key_cache = const_cast<float*>(key_caches[layer].data<float>());
    float* value_cache = const_cast<float*>(value_caches[layer].data<float>());
    for (int b = 0; b < s.batch; ++b) {
      float* row = query_key.data() + static_cast<size_t>(b) * rotated_width;
      const float* cos = rope_cos.data<float>() + pos[b] * rotated_width;
      const float* sin = rope_sin_signed.data<float>() + pos[b] * rotated_width;
      for (int head = 0; head < s.heads + s.kv_heads; ++head) {
        rotate(row + head * d, cos + head * d, sin + head * d, d, scratch.data());
      }
      for (int i = 0; i < s.q_width(); ++i) {
        row[i] = divide_query_by_sqrt_dim ? row[i] / sqrt_dim : row[i] * query_scale;
      }
      for (int kvh = 0; kvh < s.kv_heads; ++kvh) {
        const int64_t offset = ((static_cast<int64_t>(b) * s.kv_heads + kvh) * s.capacity + slot) * d;
        std::memcpy(key_cache + offset, row + s.q_width() + kvh * d, sizeof(float) * d);
        std::memcpy(value_cache + offset, value.data() + static_cast<size_t>(b) * s.kv_width() + kvh * d,
                    sizeof(float) * d);
      }
    }
    // attend() reads the query rows at stride H*D: compact them out of the q|k rows.
    for (int b = 0; b < s.batch; ++b) {
      std::memcpy(query.data() + static_cast<size_t>(b) * s.q_width(),
                  query_key.data() + static_cast<size_t>(b) * rotated_width, sizeof(float) * s.q_width());
    }
    attend(query.data(), key_cache, value_cache, attention_bias.data<float>(), attended.data(), s, scores);
    project(attended.data(), w[3], hidden.data(), s.batch, s.hidden, s.q_width(), true, vector_level);

    rms_norm(hidden.data(), w[4].data<float>(), normed.data(), s.batch, s.hidden, eps);
    project(normed.data(), w[5], gate_up.data(), s.batch, 2 * s.intermediate, s.hidden, false, vector_level);
    for (int b = 0; b < s.batch; ++b) {
      const float* gate = gate_up.data() + static_cast<size_t>(b) * 2 * s.intermediate;
      rlhf::silu_times(gate, gate + s.intermediate, activation.data() + static_cast<size_t>(b) * s.intermediate,
                       s.intermediate, scratch_exp);
    }
    project(activation.data(), w[6], hidden.data(), s.batch, s.hidden, s.intermediate, true, vector_level);
  }

  rms_norm(hidden.data(), final_norm.data<float>(), normed.data(), s.batch, s.hidden, eps);
  auto logits = paddle::empty({s.batch, vocab}, paddle::DataType::FLOAT32, token_ids.place());
  if (vector_level > 0) {
    rlhf::head_gemm(normed.data(), s.batch, s.hidden, lm_head.data<float>(), vocab, logits.data<float>(), vector_level);
  } else {
    matmul(normed.data(), lm_head.data<float>(), logits.data<float>(), s.batch, vocab, s.hidden, lm_head_transposed, false);
  }
  return {logits};
}

// Products of a few rows against streamed weights (panel_gemm.h), for tests and benchmarks:
// Y = X · W with W as panels [ceil(n/32), k, 32] (n = columns), or X · Hᵀ for head [n, k].
std::vector<paddle::Tensor> PanelProduct(const paddle::Tensor& x, const paddle::Tensor& weight, int columns,
                                         bool head, int vector_level) {
  PD_CHECK(vector_level >= 1 && vector_level <= rlhf::vector_level(), "vector level ", vector_level,
           " is not in [1, ", rlhf::vector_level(), "] on this CPU");
  const int m = static_cast<int>(x.shape()[0]), k = static_cast<int>(x.shape()[1]);
  PD_CHECK(head ? weight.shape()[1] == k && weight.shape()[0] == columns
                : weight.shape()[1] == k && weight.shape()[0] * rlhf::kPanelWidth >= columns,
           "weight shape does not match x [", m, ", ", k, "] and ", columns, " columns");
  auto y = paddle::empty({m, columns}, paddle::DataType::FLOAT32, x.place());
  if (head) {
    rlhf::head_gemm(x.data<float>(), m, k, weight.data<float>(), columns, y.data<float>(), vector_level);
  } else {
    rlhf::panel_gemm(x.data<float>(), m, k, weight.data<float>(), columns, y.data<float>(), false, vector_level);
  }
  return {y};
}

// The highest vector_level this CPU runs: 2 AVX-512F, 1 AVX2+FMA, 0 neither ([1] int32; the
// input only gives the op a place).
std::vector<paddle::Tensor> VectorLevel(const paddle::Tensor& anything) {
  auto level = paddle::empty({1}, paddle::DataType::INT32, anything.place());
  level.data<int32_t>()[0] = rlhf::vector_level();
  return {level};
}

PD_BUILD_OP(rlhf_cpu_panel_product)
    .Inputs({"X", "Weight"})
    .Outputs({"Y"})
    .Attrs({"columns: int", "head: bool", "vector_level: int"})
    .SetKernelFn(PD_KERNEL(PanelProduct));

PD_BUILD_OP(rlhf_cpu_vector_level)
    .Inputs({"Anything"})
    .Outputs({"Level"})
    .SetKernelFn(PD_KERNEL(VectorLevel));

PD_BUILD_OP(rlhf_cpu_decode_step)
    .Inputs({"TokenIds", "Positions", "EmbedTokens", "RopeCos", "RopeSinSigned", paddle::Vec("LayerWeights"),
             paddle::Vec("KeyCaches"), paddle::Vec("ValueCaches"), "AttentionBias", "FinalNorm", "LmHead"})
    .Outputs({"Logits"})
    .Attrs({"slot: int", "eps: float", "num_heads: int", "num_kv_heads: int", "has_bias: bool",
            "lm_head_transposed: bool", "divide_query_by_sqrt_dim: bool", "vector_level: int"})
    .SetKernelFn(PD_KERNEL(DecodeStep));
