// Shared between termconv.cpp (which defines them) and squeeze.cpp (which chains them).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

torch::Tensor term_conv_impl(const torch::Tensor& x, int64_t in_zero, const torch::Tensor& packed,
                             const torch::Tensor& corr, const torch::Tensor& mult,
                             const c10::optional<torch::Tensor>& bias, int64_t terms, int64_t kh,
                             int64_t kw, const std::vector<int64_t>& stride,
                             const std::vector<int64_t>& padding,
                             const std::vector<int64_t>& dilation, double out_scale,
                             int64_t out_zero, double lo, double hi, double x_scale, bool onednn,
                             bool hswish, const c10::optional<torch::Tensor>& accum,
                             double accum_scale, int64_t accum_zero);

// term_conv_onednn with every constant argument bound once: a layer's call then converts one
// tensor instead of twenty arguments (MobileNetV3-Small at 64x64 makes ~45 such calls of a few
// microseconds each at batch 1, where the conversions were a large share)
struct TermConvPlan {
  int64_t in_zero;
  torch::Tensor packed, corr, mult;
  c10::optional<torch::Tensor> bias;
  int64_t kh, kw;
  std::vector<int64_t> stride, padding, dilation;
  double out_scale;
  int64_t out_zero;
  double lo, hi, x_scale;
  bool hswish;

  torch::Tensor run(const torch::Tensor& x, const c10::optional<torch::Tensor>& accum,
                    double accum_scale, int64_t accum_zero) const {
    return term_conv_impl(x, in_zero, packed, corr, mult, bias, 1, kh, kw, stride, padding,
                          dilation, out_scale, out_zero, lo, hi, x_scale, true, hswish, accum,
                          accum_scale, accum_zero);
  }
};

