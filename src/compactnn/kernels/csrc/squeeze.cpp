// A squeeze-excitation block (MobileNetV3) as one call from Python:
//
//   codes = gate_quantize(x, fc2(fc1(pool_quantize(x))))
//
// the global average pool and its quantization (head.cpp), the two 1x1 convolutions on the
// pooled 1x1 map (term_conv plans: the first with its ReLU and requantization, the second
// with a float output) and the gated quantization of the map (codes.cpp). Each step is the
// same function the runner calls one at a time, so the codes are equal; chaining them here
// saves three Python-level calls and their argument conversions per block (the four steps
// took ~13 us at batch 1 on a 64x64 input, most of it fixed cost).
#include <torch/extension.h>

#include "termconv.h"

#include <cstdint>

torch::Tensor pool_quantize(torch::Tensor x, double scale, int64_t zero, int64_t lo, int64_t hi);
torch::Tensor gate_quantize(torch::Tensor x, torch::Tensor pre, double scale, int64_t zero,
                            int64_t lo, int64_t hi);

namespace {

struct Grid {
  double scale;
  int64_t zero, lo, hi;
};

struct SqueezePlan {
  Grid pooled;            // the pooled map's codes (fc1's input grid)
  TermConvPlan fc1, fc2;  // codes -> codes (ReLU inside), codes -> float (the gate's input)
  Grid out;               // the gated map's codes

  torch::Tensor run(const torch::Tensor& x) const {
    const auto p = pool_quantize(x, pooled.scale, pooled.zero, pooled.lo, pooled.hi);
    const auto h = fc1.run(p, c10::nullopt, 1.0, 0);
    const auto g = fc2.run(h, c10::nullopt, 1.0, 0);
    return gate_quantize(x, g, out.scale, out.zero, out.lo, out.hi);
  }
};

}  // namespace

void register_squeeze(pybind11::module& m) {
  pybind11::class_<SqueezePlan>(m, "SqueezePlan")
      .def(pybind11::init([](double p_scale, int64_t p_zero, int64_t p_lo, int64_t p_hi,
                             const TermConvPlan& fc1, const TermConvPlan& fc2, double o_scale,
                             int64_t o_zero, int64_t o_lo, int64_t o_hi) {
             TORCH_CHECK(fc1.out_scale > 0 && fc2.out_scale <= 0,
                         "SqueezePlan: fc1 writes codes, fc2 a float gate input");
             return SqueezePlan{{p_scale, p_zero, p_lo, p_hi}, fc1, fc2,
                                {o_scale, o_zero, o_lo, o_hi}};
           }),
           "pool grid (scale, zero, lo, hi), fc1 and fc2 TermConvPlans, output grid")
      .def("__call__", [](const SqueezePlan& p, const torch::Tensor& x) { return p.run(x); });
}
