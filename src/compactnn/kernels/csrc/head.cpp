// A small CNN's head on direct kernels (compactnn.deployment.runner): on mnist-cnn at batch 16
// (2 threads) the global average pool, its quantization and oneDNN's int8 linear layer
// (16 x 64 x 10) cost ~120 us per call, 14% of the deployed model, for a few thousand values:
// PyTorch's per-op and oneDNN's per-call overheads, not arithmetic.
//
// pool_quantize: the global average pool fused with the quantization after it, one pass.
// Exactness: the float operations and their order are those of the PyTorch ops replaced:
// adaptive_avg_pool2d(x, 1) is x.mean((2, 3)), whose channels-last sum over the H * W rows
// is PyTorch's cascade (blocks of 16 rows, four levels; see below), then a division by
// H * W; the quantizer computes
// clamp(nearbyint(avg / scale) + zero, lo, hi) in float32 (round-half-even). Checked bit for
// bit against them in tests/kernels/test_head.py.
//
// small_linear: an int8 linear layer with a float output, (N, K) uint8 codes -> (N, O) float32.
// The dots sum_k (q - zx) * w are exact in float32 (|acc| <= K * 255 * 128 < 2^24, checked by
// the caller); the output is (acc * sx) * w_scale[o] + bias[o], then ReLU if asked: the order of
// oneDNN's qlinear_pointwise with a float output (found by comparing it with the candidate
// orders: acc * (sx * w_scale) differs in the last bit on 20% of outputs), so bit-identical.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

int64_t ceil_log2(int64_t x) {
  int64_t r = 0;
  while ((int64_t{1} << r) < x) ++r;
  return r;
}

}  // namespace

// x: (N, C, H, W) float32 channels-last; returns (N, C, 1, 1) uint8 codes.
// (outside the anonymous namespace: squeeze.cpp chains it)
torch::Tensor pool_quantize(torch::Tensor x, double scale, int64_t zero, int64_t lo, int64_t hi) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "x: (N, C, H, W) float32 channels-last");
  TORCH_CHECK(scale > 0 && 0 <= lo && lo <= hi && hi <= 255,
              "grid: scale > 0, 0 <= lo <= hi <= 255");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto out = torch::empty({N, C}, x.options().dtype(torch::kUInt8));
  const float* xp = x.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  const float s = static_cast<float>(scale), z = static_cast<float>(zero);
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  const float count = static_cast<float>(HW);
  // the cascade of PyTorch's outer sum (mean over H, W of a channels-last tensor): rows are
  // summed in blocks of `step` into level 0, which is added into level 1 after each block;
  // a level carries into the next when its block count wraps; the tail rows go into level 0
  // and the levels are added last, in order
  constexpr int64_t levels = 4;
  const int64_t power = std::max(int64_t{4}, ceil_log2(HW) / levels);
  const int64_t step = int64_t{1} << power, mask = step - 1;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    // captures copied into locals: through the captured references, every store that may
    // alias them (a uint8 store aliases anything) made the compiler reload them per item
    const auto C_ = C;
    const auto HW_ = HW;
    const auto count_ = count;
    const auto fhi_ = fhi;
    const auto flo_ = flo;
    const auto mask_ = mask;
    const auto op_ = op;
    const auto power_ = power;
    const auto s_ = s;
    const auto step_ = step;
    const auto xp_ = xp;
    const auto z_ = z;
    std::vector<float> acc(levels * C_);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const float* src = xp_ + n * HW_ * C_;
      float* a0 = acc.data();
      int64_t i = 0;
      while (i + step_ <= HW_) {
        for (int64_t j = 0; j < step_; ++j, ++i) {
          const float* row = src + i * C_;
          for (int64_t c = 0; c < C_; ++c) a0[c] += row[c];
        }
        for (int64_t l = 1; l < levels; ++l) {
          float* up = a0 + l * C_;
          float* lo_ = a0 + (l - 1) * C_;
          for (int64_t c = 0; c < C_; ++c) {
            up[c] += lo_[c];
            lo_[c] = 0.0f;
          }
          if ((i & (mask_ << (l * power_))) != 0) break;
        }
      }
      for (; i < HW_; ++i) {
        const float* row = src + i * C_;
        for (int64_t c = 0; c < C_; ++c) a0[c] += row[c];
      }
      for (int64_t l = 1; l < levels; ++l) {
        const float* up = a0 + l * C_;
        for (int64_t c = 0; c < C_; ++c) a0[c] += up[c];
      }
      for (int64_t c = 0; c < C_; ++c) {
        float v = std::nearbyint((a0[c] / count_) / s_) + z_;
        v = std::min(std::max(v, flo_), fhi_);
        op_[n * C_ + c] = static_cast<uint8_t>(v);
      }
    }
  });
  return out.view({N, C, 1, 1});
}

// q: (N, K) uint8; w: (K, O) float32 integer codes; w_scale, bias: (O) float32.
torch::Tensor small_linear(torch::Tensor q, double x_scale, int64_t x_zero, torch::Tensor w,
                           torch::Tensor w_scale, c10::optional<torch::Tensor> bias, bool relu) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kUInt8, "q: (N, K) uint8 codes");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.is_contiguous() &&
                  w.size(0) == q.size(1),
              "w: (K, O) float32 contiguous");
  const int64_t N = q.size(0), K = q.size(1), O = w.size(1);
  TORCH_CHECK(w_scale.numel() == O && w_scale.scalar_type() == torch::kFloat32 &&
                  w_scale.is_contiguous(),
              "w_scale: (O) float32");
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    TORCH_CHECK(b.numel() == O && b.scalar_type() == torch::kFloat32 && b.is_contiguous(),
                "bias: (O) float32");
    bp = b.data_ptr<float>();
  }
  auto out = torch::empty({N, O}, q.options().dtype(torch::kFloat32));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const float* wp = w.data_ptr<float>();
  const float* sp = w_scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sx = static_cast<float>(x_scale), zx = static_cast<float>(x_zero);
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    // captures copied into locals: through the captured references, every store that may
    // alias them (a uint8 store aliases anything) made the compiler reload them per item
    const auto K_ = K;
    const auto O_ = O;
    const auto bp_ = bp;
    const auto op_ = op;
    const auto qp_ = qp;
    const auto qs0_ = qs0;
    const auto qs1_ = qs1;
    const auto relu_ = relu;
    const auto sp_ = sp;
    const auto sx_ = sx;
    const auto wp_ = wp;
    const auto zx_ = zx;
    std::vector<float> acc(O_);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < K_; ++k) {
        const float v = static_cast<float>(qp_[n * qs0_ + k * qs1_]) - zx_;
        const float* wk = wp_ + k * O_;
        for (int64_t o = 0; o < O_; ++o) acc[o] += v * wk[o];  // exact integers
      }
      float* dst = op_ + n * O_;
      for (int64_t o = 0; o < O_; ++o) {
        float y = (acc[o] * sx_) * sp_[o];
        if (bp_ != nullptr) y += bp_[o];
        dst[o] = relu_ ? (y > 0.0f ? y : (y != y ? y : 0.0f)) : y;
      }
    }
  });
  return out;
}


void register_head(pybind11::module& m) {
  m.def("pool_quantize", &pool_quantize,
        "global average pool of channels-last float32 and its uint8 quantization, one pass");
  m.def("small_linear", &small_linear, "int8 linear layer with a float output, oneDNN's order");
}
