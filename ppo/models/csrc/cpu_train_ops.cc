// RMSNorm, rotary embedding and SwiGLU for training on CPU: forward and backward each in one
// sweep over the activations.
//
// In eager Paddle each of these is 5-9 elementwise ops (plus `expand`s to dodge the slow
// broadcast kernels), each reading and writing the whole [tokens, width] activation: at
// SmolLM2's [8, 96, 576..1536] that is memory traffic, not arithmetic. float32, contiguous
// tensors only; `ppo/models/cpu_fused.py` checks that and falls back to the eager ops otherwise.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "paddle/extension.h"
#include "mkl_math.h"

namespace {

int64_t rows_of(const paddle::Tensor& x) { return x.numel() / x.shape().back(); }

// Output dtype of the single-input ops: the input's.
std::vector<paddle::DataType> SameDtype(const paddle::DataType& x) { return {x}; }

}  // namespace

// ---------------------------------------------------------------------------------- RMSNorm
// out = x * rsqrt(mean(x^2) + eps) * w; InvRms [rows] is kept for the backward.

std::vector<paddle::Tensor> RmsNormForward(const paddle::Tensor& x, const paddle::Tensor& weight, float eps) {
  const int64_t rows = rows_of(x), width = x.shape().back();
  auto out = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  auto inv_rms = paddle::empty({rows}, paddle::DataType::FLOAT32, x.place());
  const float* src = x.data<float>();
  const float* w = weight.data<float>();
  float* dst = out.data<float>();
  float* inv = inv_rms.data<float>();
  for (int64_t r = 0; r < rows; ++r) inv[r] = rlhf::rms_norm_row(src + r * width, w, dst + r * width, width, eps);
  return {out, inv_rms};
}

// With n = x * inv and g = dout * w: dx = inv * (g - n * mean(g * n)), dw = sum_rows(dout * n).
std::vector<paddle::Tensor> RmsNormBackward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                            const paddle::Tensor& inv_rms, const paddle::Tensor& grad_out) {
  const int64_t rows = rows_of(x), width = x.shape().back();
  auto grad_x = paddle::empty(x.shape(), paddle::DataType::FLOAT32, x.place());
  const float* src = x.data<float>();
  const float* w = weight.data<float>();
  const float* inv = inv_rms.data<float>();
  const float* dout = grad_out.data<float>();
  float* dx = grad_x.data<float>();
  std::vector<double> dw(width, 0.0);  // summed over every row: double keeps it order-robust
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = src + r * width;
    const float* g_row = dout + r * width;
    const float scale = inv[r];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < width; ++i) dot += g_row[i] * w[i] * row[i];
    const float correction = dot * scale * scale / width;
    float* dx_row = dx + r * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) dx_row[i] = scale * (g_row[i] * w[i] - row[i] * correction);
    for (int64_t i = 0; i < width; ++i) dw[i] += static_cast<double>(g_row[i]) * row[i] * scale;
  }
  auto grad_w = paddle::empty(weight.shape(), paddle::DataType::FLOAT32, weight.place());
  float* dw_out = grad_w.data<float>();
  for (int64_t i = 0; i < width; ++i) dw_out[i] = static_cast<float>(dw[i]);
  return {grad_x, grad_w};
}

std::vector<std::vector<int64_t>> RmsNormShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) rows *= x[i];
  return {x, {rows}};
}

std::vector<paddle::DataType> RmsNormDtype(const paddle::DataType& x, const paddle::DataType& w) { return {x, x}; }

PD_BUILD_OP(rlhf_rms_norm)
    .Inputs({"X", "Weight"})
    .Outputs({"Out", "InvRms"})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(RmsNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(RmsNormShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RmsNormDtype));

PD_BUILD_GRAD_OP(rlhf_rms_norm)
    .Inputs({"X", "Weight", "InvRms", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight")})
    .SetKernelFn(PD_KERNEL(RmsNormBackward));

// ------------------------------------------------------------------------- rotary embedding
// q, k: [batch, seq, heads, D]; cos, sin: the model's tables [max_positions, D]; positions:
// [batch, seq] int64. out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].

namespace {

// The rotation, or with kTranspose its transpose (the backward): for i < half
//   forward   y[i] = x[i] c[i] - x[i + half] s[i],        y[i + half] = x[i + half] c[i + half] + x[i] s[i + half]
//   transpose y[i] = g[i] c[i] + g[i + half] s[i + half], y[i + half] = g[i + half] c[i + half] - g[i] s[i]
template <bool kTranspose>
void rotate_heads(const float* src, float* dst, const float* cos, const float* sin, const int64_t* positions,
                  int64_t tokens, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cos + positions[t] * dim;
    const float* s = sin + positions[t] * dim;
    // The sine each half's partner term is taken at, and its sign.
    const float* s_low = kTranspose ? s + half : s;
    const float* s_high = kTranspose ? s : s + half;
    const float sign = kTranspose ? 1.0f : -1.0f;
    for (int64_t h = 0; h < heads; ++h) {
      const float* x = src + (t * heads + h) * dim;
      float* y = dst + (t * heads + h) * dim;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) y[i] = x[i] * c[i] + sign * x[i + half] * s_low[i];
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) y[i + half] = x[i + half] * c[i + half] - sign * x[i] * s_high[i];
    }
  }
}

void check_rope(const paddle::Tensor& x, const paddle::Tensor& cos, const paddle::Tensor& positions) {
  PD_CHECK(x.shape().size() == 4, "rotary input must be [batch, seq, heads, dim]");
  PD_CHECK(cos.shape().back() == x.shape().back(), "rotary table width differs from head_dim");
  PD_CHECK(positions.numel() == x.shape()[0] * x.shape()[1], "one position per token expected");
  const int64_t* p = positions.data<int64_t>();
  const int64_t limit = cos.shape()[0];
  for (int64_t i = 0; i < positions.numel(); ++i) PD_CHECK(p[i] >= 0 && p[i] < limit, "position ", p[i], " outside the rotary table");
}

}  // namespace

std::vector<paddle::Tensor> RopeForward(const paddle::Tensor& q, const paddle::Tensor& k, const paddle::Tensor& cos,
                                        const paddle::Tensor& sin, const paddle::Tensor& positions) {
  check_rope(q, cos, positions);
  check_rope(k, cos, positions);
  auto q_out = paddle::empty(q.shape(), paddle::DataType::FLOAT32, q.place());
  auto k_out = paddle::empty(k.shape(), paddle::DataType::FLOAT32, k.place());
  const int64_t tokens = q.shape()[0] * q.shape()[1], dim = q.shape()[3];
  rotate_heads<false>(q.data<float>(), q_out.data<float>(), cos.data<float>(), sin.data<float>(), positions.data<int64_t>(),
               tokens, q.shape()[2], dim);
  rotate_heads<false>(k.data<float>(), k_out.data<float>(), cos.data<float>(), sin.data<float>(), positions.data<int64_t>(),
               tokens, k.shape()[2], dim);
  return {q_out, k_out};
}

std::vector<paddle::Tensor> RopeBackward(const paddle::Tensor& q, const paddle::Tensor& k, const paddle::Tensor& cos,
                                         const paddle::Tensor& sin, const paddle::Tensor& positions,
                                         const paddle::Tensor& grad_q_out, const paddle::Tensor& grad_k_out) {
  auto grad_q = paddle::empty(q.shape(), paddle::DataType::FLOAT32, q.place());
  auto grad_k = paddle::empty(k.shape(), paddle::DataType::FLOAT32, k.place());
  const int64_t tokens = q.shape()[0] * q.shape()[1], dim = q.shape()[3];
  rotate_heads<true>(grad_q_out.data<float>(), grad_q.data<float>(), cos.data<float>(), sin.data<float>(),
                        positions.data<int64_t>(), tokens, q.shape()[2], dim);
  rotate_heads<true>(grad_k_out.data<float>(), grad_k.data<float>(), cos.data<float>(), sin.data<float>(),
                        positions.data<int64_t>(), tokens, k.shape()[2], dim);
  return {grad_q, grad_k};
}

std::vector<std::vector<int64_t>> RopeShape(const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                                            const std::vector<int64_t>&, const std::vector<int64_t>&,
                                            const std::vector<int64_t>&) {
  return {q, k};
}

std::vector<paddle::DataType> RopeDtype(const paddle::DataType& q, const paddle::DataType& k, const paddle::DataType&,
                                        const paddle::DataType&, const paddle::DataType&) {
  return {q, k};
}

PD_BUILD_OP(rlhf_rope)
    .Inputs({"Q", "K", "Cos", "Sin", "Positions"})
    .Outputs({"QOut", "KOut"})
    .SetKernelFn(PD_KERNEL(RopeForward))
    .SetInferShapeFn(PD_INFER_SHAPE(RopeShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RopeDtype));

PD_BUILD_GRAD_OP(rlhf_rope)
    .Inputs({"Q", "K", "Cos", "Sin", "Positions", paddle::Grad("QOut"), paddle::Grad("KOut")})
    .Outputs({paddle::Grad("Q"), paddle::Grad("K")})
    .SetKernelFn(PD_KERNEL(RopeBackward));

// ---------------------------------------------------------------------------------- SwiGLU
// out = silu(gate) * up; `rlhf_swiglu` takes them apart, `rlhf_swiglu_packed` as one [.., 2F]
// tensor (gate columns, then up columns: PaddleNLP's fused gate|up projection).

namespace {

void swiglu_forward(const float* gate, const float* up, int64_t stride, float* out, int64_t rows, int64_t width) {
  std::vector<float> scratch;
  for (int64_t r = 0; r < rows; ++r) rlhf::silu_times(gate + r * stride, up + r * stride, out + r * width, width, scratch);
}

// d gate = dout * up * sig * (1 + gate * (1 - sig)), d up = dout * silu(gate).
void swiglu_backward(const float* gate, const float* up, int64_t stride, const float* dout, float* d_gate, float* d_up,
                     int64_t rows, int64_t width) {
  std::vector<float> sig(width);
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate + r * stride;
    const float* u = up + r * stride;
    const float* d = dout + r * width;
    float* dg = d_gate + r * stride;
    float* du = d_up + r * stride;
    rlhf::sigmoid(g, sig.data(), width);
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      dg[i] = d[i] * u[i] * sig[i] * (1.0f + g[i] * (1.0f - sig[i]));
      du[i] = d[i] * g[i] * sig[i];
    }
  }
}

std::vector<int64_t> halved(std::vector<int64_t> shape) {
  shape.back() /= 2;
  return shape;
}

}  // namespace

std::vector<paddle::Tensor> SwigluForward(const paddle::Tensor& gate, const paddle::Tensor& up) {
  PD_CHECK(gate.shape() == up.shape(), "gate and up must have the same shape");
  auto out = paddle::empty(gate.shape(), paddle::DataType::FLOAT32, gate.place());
  const int64_t width = gate.shape().back();
  swiglu_forward(gate.data<float>(), up.data<float>(), width, out.data<float>(), rows_of(gate), width);
  return {out};
}

std::vector<paddle::Tensor> SwigluBackward(const paddle::Tensor& gate, const paddle::Tensor& up, const paddle::Tensor& grad_out) {
  auto grad_gate = paddle::empty(gate.shape(), paddle::DataType::FLOAT32, gate.place());
  auto grad_up = paddle::empty(up.shape(), paddle::DataType::FLOAT32, up.place());
  const int64_t width = gate.shape().back();
  swiglu_backward(gate.data<float>(), up.data<float>(), width, grad_out.data<float>(), grad_gate.data<float>(),
                  grad_up.data<float>(), rows_of(gate), width);
  return {grad_gate, grad_up};
}

std::vector<std::vector<int64_t>> SwigluShape(const std::vector<int64_t>& gate, const std::vector<int64_t>&) { return {gate}; }
std::vector<paddle::DataType> SwigluDtype(const paddle::DataType& gate, const paddle::DataType&) { return {gate}; }

PD_BUILD_OP(rlhf_swiglu)
    .Inputs({"Gate", "Up"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(SwigluForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SwigluShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SwigluDtype));

PD_BUILD_GRAD_OP(rlhf_swiglu)
    .Inputs({"Gate", "Up", paddle::Grad("Out")})
    .Outputs({paddle::Grad("Gate"), paddle::Grad("Up")})
    .SetKernelFn(PD_KERNEL(SwigluBackward));

std::vector<paddle::Tensor> SwigluPackedForward(const paddle::Tensor& gate_up) {
  PD_CHECK(gate_up.shape().back() % 2 == 0, "packed gate|up needs an even last axis");
  auto out = paddle::empty(halved(gate_up.shape()), paddle::DataType::FLOAT32, gate_up.place());
  const int64_t width = gate_up.shape().back() / 2;
  swiglu_forward(gate_up.data<float>(), gate_up.data<float>() + width, 2 * width, out.data<float>(), rows_of(gate_up), width);
  return {out};
}

std::vector<paddle::Tensor> SwigluPackedBackward(const paddle::Tensor& gate_up, const paddle::Tensor& grad_out) {
  auto grad = paddle::empty(gate_up.shape(), paddle::DataType::FLOAT32, gate_up.place());
  const int64_t width = gate_up.shape().back() / 2;
  swiglu_backward(gate_up.data<float>(), gate_up.data<float>() + width, 2 * width, grad_out.data<float>(),
                  grad.data<float>(), grad.data<float>() + width, rows_of(gate_up), width);
  return {grad};
}

std::vector<std::vector<int64_t>> SwigluPackedShape(const std::vector<int64_t>& gate_up) { return {halved(gate_up)}; }

PD_BUILD_OP(rlhf_swiglu_packed)
    .Inputs({"GateUp"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(SwigluPackedForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SwigluPackedShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype));

PD_BUILD_GRAD_OP(rlhf_swiglu_packed)
    .Inputs({"GateUp", paddle::Grad("Out")})
    .Outputs({paddle::Grad("GateUp")})
    .SetKernelFn(PD_KERNEL(SwigluPackedBackward));

// ---------------------------------------------------------------------------------- Entropy
// H = logsumexp(z) - sum_v softmax(z)_v z_v per row of the logits, for the logged policy entropy
// (no backward: the metric is computed without gradient). One exp pass per row instead of the
// eager softmax, max, log, product and sum over [tokens, vocabulary]; sums in double, so a
// 49k-entry row keeps float32 accuracy.

std::vector<paddle::Tensor> TokenEntropy(const paddle::Tensor& logits) {
  std::vector<int64_t> shape = logits.shape();
  const int64_t width = shape.back();
  const int64_t rows = rows_of(logits);
  shape.pop_back();
  auto out = paddle::empty(shape, paddle::DataType::FLOAT32, logits.place());
  std::vector<float> shifted(width), weights(width);
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = logits.data<float>() + r * width;
    float max_logit = -INFINITY;
    for (int64_t i = 0; i < width; ++i) max_logit = std::max(max_logit, z[i]);
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) shifted[i] = z[i] - max_logit;
    vmsExp(static_cast<int>(width), shifted.data(), weights.data(), rlhf::kVmlMode);
    double total = 0.0, weighted = 0.0;
#pragma omp simd reduction(+ : total, weighted)
    for (int64_t i = 0; i < width; ++i) {
      total += weights[i];
      weighted += static_cast<double>(weights[i]) * shifted[i];
    }
    // With s = z - max: logsumexp(z) - E[z] = log(sum e^s) - E[s].
    out.data<float>()[r] = static_cast<float>(std::log(total) - weighted / total);
  }
  return {out};
}

std::vector<std::vector<int64_t>> TokenEntropyShape(const std::vector<int64_t>& logits) {
  return {std::vector<int64_t>(logits.begin(), logits.end() - 1)};
}

PD_BUILD_OP(rlhf_token_entropy)
    .Inputs({"Logits"})
    .Outputs({"Entropy"})
    .SetKernelFn(PD_KERNEL(TokenEntropy))
    .SetInferShapeFn(PD_INFER_SHAPE(TokenEntropyShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype));
