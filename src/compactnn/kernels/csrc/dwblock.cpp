// A depthwise convolution with the 1x1 convolutions around it (MobileNetV2's inverted
// residual block) as one pass:
//
//   codes = project(dw(expand(x)) [+ residual])
//
// expand, project: stride-1 unpadded 1x1 convolutions with codes out (pointwise.cpp's tiles),
// either may be absent; dw: a depthwise convolution on the integer form (dwconv_int.cpp).
// Run apart, expand writes its whole map (6x the block's input channels) to memory, the
// depthwise kernel copies it back row by row into its ring of input rows, writes its own map,
// and project reads that (at batch 8, 224x224, a 16 -> 96 expansion alone writes 9.6 MB, well
// past the caches; the ring copy was 15% of the depthwise kernel's samples in a profile). Here
// the depthwise kernel asks for each input row when it first needs it and expand's tiles write
// that row's codes straight into the ring's (block, pixel, 16) layout; each output row goes to
// a row buffer that project's tiles read at once (with the residual's codes of those pixels).
// Neither intermediate map exists in memory, and one parallel loop replaces three.
//
// The tiles, their epilogue and the depthwise dots are the separate kernels' own, so the codes
// are equal to the three calls' (tests/kernels/test_dwblock.py). A thread computes the input
// rows its output rows read; where two threads' ranges meet, the (window - stride) shared rows
// are expanded by both (a few rows of a batch's maps). A call that does not fit (x not dense
// channels-last codes, a window without the integer form, a build without VNNI) runs the
// plans one after the other.
#include <torch/extension.h>

#include "dwconv.h"
#include "termconv.h"

#include <cstdint>
#include <vector>

namespace {

// expand's tiles as the depthwise kernel's row source
struct Expansion {
  PointwiseArgs args;  // over the whole input
  int64_t H, W;

  static void fill(const void* ctx, int64_t n, int64_t h, uint8_t* dst, int64_t block_bytes) {
    const auto& f = *static_cast<const Expansion*>(ctx);
    PointwiseArgs a = f.args;
    a.out = dst;
    const int64_t p0 = (n * f.H + h) * f.W;
    pointwise_tiles(a, p0, p0 + f.W, 16, block_bytes);
  }
};

// project's tiles as the depthwise kernel's row sink
struct Projection {
  PointwiseArgs args;  // over one row of OW pixels; out, accum: the whole output's
  int64_t OH, OW;

  static void consume(const void* ctx, int64_t n, int64_t oh, const uint8_t* row) {
    const auto& f = *static_cast<const Projection*>(ctx);
    PointwiseArgs a = f.args;
    const int64_t pix0 = (n * f.OH + oh) * f.OW;
    a.x = row;
    a.out += pix0 * a.O;
    if (a.accum != nullptr) a.accum += pix0 * a.O;
    pointwise_tiles(a, 0, f.OW, a.O, 16);
  }
};

struct DwBlockPlan {
  c10::optional<TermConvPlan> expand;
  DwConvPlan dw;
  c10::optional<TermConvPlan> project;

  int64_t mid_channels(const torch::Tensor& x) const {
    return expand ? expand->mult.numel() : x.size(1);
  }

  bool fused(const torch::Tensor& x) const {
    if (!COMPACTNN_VNNI || !dw.from_rows() || x.dim() != 4 || (!expand && !project))
      return false;
    if (expand && !expand->pointwise(x)) return false;
    return !project || project->pointwise_fits(mid_channels(x));
  }

  torch::Tensor apart(const torch::Tensor& x, const c10::optional<torch::Tensor>& accum,
                      double accum_scale, int64_t accum_zero) const {
    auto y = dw.run(expand ? expand->run(x, c10::nullopt, 1.0, 0) : x);
    return project ? project->run(y, accum, accum_scale, accum_zero) : y;
  }

  torch::Tensor run(const torch::Tensor& x, const c10::optional<torch::Tensor>& accum,
                    double accum_scale, int64_t accum_zero) const {
    TORCH_CHECK(project || !accum.has_value(), "a residual needs the projection");
    if (!fused(x)) return apart(x, accum, accum_scale, accum_zero);
    const int64_t N = x.size(0), H = x.size(2), W = x.size(3), C = mid_channels(x);
    std::vector<float> em, eb, pm, pb;
    Expansion ex{};
    DwRowSource src{};
    if (expand) {
      ex = {expand->pointwise_args(x.data_ptr<uint8_t>(), N * H * W, x.size(1), em, eb), H, W};
      src = {&Expansion::fill, &ex, W * ex.args.TOp * ex.args.K4 * 4};
    }
    if (!project) return dw.run_from(expand ? torch::Tensor() : x, N, C, H, W,
                                     expand ? &src : nullptr, nullptr);
    const auto& d = dw;
    const int64_t OH = (H + 2 * d.padding[0] - d.dilation[0] * (d.kh - 1) - 1) / d.stride[0] + 1;
    const int64_t OW = (W + 2 * d.padding[1] - d.dilation[1] * (d.kw - 1) - 1) / d.stride[1] + 1;
    Projection pr{project->pointwise_args(nullptr, OW, C, pm, pb), OH, OW};
    auto out = torch::empty({N, pr.args.O, OH, OW},
                            torch::dtype(torch::kUInt8).memory_format(at::MemoryFormat::ChannelsLast));
    pr.args.out = out.data_ptr<uint8_t>();
    torch::Tensor acc;
    if (accum.has_value()) {
      acc = accum.value().contiguous(at::MemoryFormat::ChannelsLast);
      TORCH_CHECK(acc.scalar_type() == torch::kUInt8 && acc.dim() == 4 && acc.size(0) == N &&
                      acc.size(1) == pr.args.O && acc.size(2) == OH && acc.size(3) == OW,
                  "accum: (N, O, OH, OW) uint8 codes, the output's shape");
      pr.args.accum = acc.data_ptr<uint8_t>();
      pr.args.accum_scale = static_cast<float>(accum_scale);
      pr.args.accum_zero = static_cast<float>(accum_zero);
    }
    const DwRowSink sink{&Projection::consume, &pr, OW * pr.args.TOp * pr.args.K4 * 4};
    dw.run_from(expand ? torch::Tensor() : x, N, C, H, W, expand ? &src : nullptr, &sink);
    return out;
  }
};

}  // namespace

void register_dwblock(pybind11::module& m) {
  pybind11::class_<DwBlockPlan>(m, "DwBlockPlan")
      .def(pybind11::init([](c10::optional<TermConvPlan> expand, const DwConvPlan& dw,
                             c10::optional<TermConvPlan> project) {
             auto one_by_one = [](const TermConvPlan& p) {
               return p.kh == 1 && p.kw == 1 && p.out_scale > 0 && !p.hswish;
             };
             TORCH_CHECK(!expand || one_by_one(*expand),
                         "DwBlockPlan: expand is a 1x1 convolution with codes out");
             TORCH_CHECK(!expand || expand->out_zero == dw.in_zero,
                         "DwBlockPlan: expand's output grid is dw's input grid");
             TORCH_CHECK(!project || (one_by_one(*project) && dw.out_scale > 0 &&
                                      static_cast<int64_t>(dw.out_zero) == project->in_zero),
                         "DwBlockPlan: project is a 1x1 convolution reading dw's codes");
             return DwBlockPlan{expand, dw, project};
           }),
           "[a 1x1 TermConvPlan ->] a DwConvPlan [-> a 1x1 TermConvPlan], one pass",
           pybind11::arg("expand"), pybind11::arg("dw"), pybind11::arg("project"))
      .def("fused", &DwBlockPlan::fused, "whether a call on x runs as one pass")
      .def("__call__",
           [](const DwBlockPlan& p, const torch::Tensor& x) {
             return p.run(x, c10::nullopt, 1.0, 0);
           })
      .def("sum", [](const DwBlockPlan& p, const torch::Tensor& x, const torch::Tensor& accum,
                     double accum_scale, int64_t accum_zero) {
        return p.run(x, accum, accum_scale, accum_zero);
      });
}
