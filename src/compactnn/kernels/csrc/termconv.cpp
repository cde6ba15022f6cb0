// Direct int8 convolution of uint8 codes with one or two int8 weight terms, requantized in the
// same pass (compactnn.deployment.runner; the split layers of compactnn.deployment.lowbit).
//
// A layer whose weight is the sum of two int8 terms (TTQ's W_p * [w = +1] - W_n * [w = -1])
// runs on oneDNN as ONE convolution with 2 * O output channels written as float32, then a
// second pass adds the halves and quantizes. Here each output pixel reads its input window
// once, accumulates every term's int32 dot in AVX-512 VNNI registers (vpdpbusd: 4 uint8 x int8
// products per 32-bit lane), and writes the next layer's uint8 codes directly:
//
//   acc_t[o] = sum_{taps, c} q[c] * w_t[o, c]  -  z * sum_{taps, c} w_t[o, c]
//            = sum (q - z) * w_t   (padding holds the zero point z, so it contributes 0)
//   y[o]     = (acc_0[o] * m_0[o] + bias[o]) + acc_1[o] * m_1[o]
//   code[o]  = clamp(nearbyint(y[o] / s) + zo, lo, hi)
//
// The int32 dots are exact (as oneDNN's); the float operations and their order are those of
// the stacked path (the kernel's per-channel scale and bias, then stacked_quantize), with
// -ffp-contract=off, so the codes equal it. lo / hi also apply a ReLU / Hardtanh (round is
// monotone). With out_scale <= 0 the output is float32 clamp(y, lo, hi). Pixel rows run in
// parallel (at::parallel_for over images x output rows).
#include <torch/extension.h>

#include "termconv.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kMaxTO = 2048;  // terms * output channels, padded to 16 (to 128 above 128)

struct Geometry {
  int64_t K4;      // input-channel groups of 4 per tap
  int64_t Cp;      // padded channels (4 * K4)
  int64_t Wp;      // padded input width
  int64_t sw;      // stride along the width
  int64_t taps;    // KH * KW
  const int64_t* tap;  // byte offset of each tap in the padded (Hp, Wp, Cp) buffer
};

#if COMPACTNN_VNNI
// P adjacent output pixels of one row (input column step sw), NV * 16 int32 columns each.
// w: (taps, K4, NV * 16, 4) int8; src: the padded buffer at the first pixel's window origin.
template <int NV, int P>
inline void dot_block(const uint8_t* src, const Geometry& g, const int8_t* w, int32_t* acc) {
  // small loops fully unrolled so that the accumulators stay in registers
  __m512i a[P][NV];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) a[p][v] = _mm512_setzero_si512();
  const int64_t pstep = g.sw * g.Cp, taps = g.taps, K4 = g.K4;
  const int64_t* const tap = g.tap;
  for (int64_t k = 0; k < taps; ++k)
    vnni_dots<NV, P>(a, src + tap[k], pstep, w + k * K4 * NV * 64, NV * 64, K4);
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_si512(reinterpret_cast<void*>(acc + (p * NV + v) * 16), a[p][v]);
}

template <int NV>
inline int64_t dot_row(const uint8_t* src, const Geometry& g, const int8_t* w, int64_t OW,
                       int32_t* acc) {
  // P * NV accumulators (+ NV weight vectors) in the 32 registers (6 x 6 was measured faster
  // than 6 x 4 despite its spills)
  constexpr int P = NV >= 7 ? 3 : (NV == 5 ? 4 : (NV >= 4 ? 6 : 8));
  const int64_t pstep = g.sw * g.Cp;
  int64_t ow = 0;
  for (; ow + P <= OW; ow += P) dot_block<NV, P>(src + ow * pstep, g, w, acc + ow * NV * 16);
  for (; ow < OW; ++ow) dot_block<NV, 1>(src + ow * pstep, g, w, acc + ow * NV * 16);
  return OW;
}
#endif

#if COMPACTNN_VNNI
// acc (OW, width) int32 of one weight block of ``width`` columns (a multiple of 16, <= kBlock)
inline void dot_block_row(const uint8_t* src, const Geometry& g, const int8_t* w, int64_t width,
                          int64_t OW, int32_t* acc) {
  switch (width / 16) {
    case 1: dot_row<1>(src, g, w, OW, acc); return;
    case 2: dot_row<2>(src, g, w, OW, acc); return;
    case 3: dot_row<3>(src, g, w, OW, acc); return;
    case 4: dot_row<4>(src, g, w, OW, acc); return;
    case 5: dot_row<5>(src, g, w, OW, acc); return;
    case 6: dot_row<6>(src, g, w, OW, acc); return;
    case 7: dot_row<7>(src, g, w, OW, acc); return;
    default: dot_row<8>(src, g, w, OW, acc); return;
  }
}
#endif

// acc (OW, TOp) int32 for one output row; TOp a multiple of 16. Above kBlock columns the
// weight is stored in blocks of at most kBlock columns (block_start), each laid out as a
// weight of its own width (see term_conv_pack); each block is one pass over the input window.
void dot_any(const uint8_t* src, const Geometry& g, const int8_t* w, int64_t TOp, int64_t OW,
             int32_t* acc) {
#if COMPACTNN_VNNI
  if (TOp <= kBlock) {
    dot_block_row(src, g, w, TOp, OW, acc);
    return;
  }
  std::vector<int32_t> part(OW * kBlock);
  const int64_t column_bytes = g.taps * g.K4 * 4;  // a column's bytes in the packed weight
  for (int64_t b = 0; b < block_count(TOp); ++b) {
    const int64_t wb = block_width(TOp, b), o0 = block_start(TOp, b);
    dot_block_row(src, g, w + o0 * column_bytes, wb, OW, part.data());
    for (int64_t ow = 0; ow < OW; ++ow)
      std::memcpy(acc + ow * TOp + o0, part.data() + ow * wb, wb * sizeof(int32_t));
  }
#else
  const int64_t pstep = g.sw * g.Cp;
  for (int64_t ow = 0; ow < OW; ++ow) {
    int32_t* a = acc + ow * TOp;
    for (int64_t j = 0; j < TOp; ++j) a[j] = 0;
    for (int64_t k = 0; k < g.taps; ++k) {
      const uint8_t* s = src + ow * pstep + g.tap[k];
      for (int64_t c4 = 0; c4 < g.K4; ++c4)
        for (int64_t j = 0; j < TOp; ++j) {
          int64_t b = 0;
          while (block_start(TOp, b + 1) <= j) ++b;
          const int64_t o0 = block_start(TOp, b), W = block_width(TOp, b);
          const int8_t* wj = w + o0 * g.taps * g.K4 * 4 + ((k * g.K4 + c4) * W + j - o0) * 4;
          for (int64_t i = 0; i < 4; ++i) a[j] += static_cast<int32_t>(s[c4 * 4 + i]) * wj[i];
        }
    }
  }
#endif
}

}  // namespace

// Pack int8 weight codes (T * O, C, KH, KW) (terms stacked along the outputs, term-major) into
// the kernel's layout (KH * KW, ceil(C / 4), TOp, 4), TOp = T * O rounded up to 16, zeros in
// the padding. Above 128 columns the columns are stored in blocks of at most 128 (see
// block_start), each in that layout with its own width (block, tap, channel group, column, 4); the
// tensor's shape stays (KH * KW, ceil(C / 4), TOp, 4). Returns the packed weight and
// z * sum(w) per column (TOp) int32.
std::vector<torch::Tensor> term_conv_pack(torch::Tensor w, int64_t in_zero) {
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == torch::kInt8, "w: (T * O, C, KH, KW) int8");
  auto wc = w.contiguous();
  const int64_t TO = wc.size(0), C = wc.size(1), KH = wc.size(2), KW = wc.size(3);
  const int64_t K4 = (C + 3) / 4;
  const int64_t TOp = (TO + 15) / 16 * 16;
  TORCH_CHECK(TOp <= kMaxTO, "terms * output channels <= 2048");
  const int64_t taps = KH * KW;
  auto packed = torch::zeros({KH * KW, K4, TOp, 4}, torch::kInt8);
  auto corr = torch::zeros({TOp}, torch::kInt32);
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  int32_t* cp = corr.data_ptr<int32_t>();
  int64_t b = 0;  // the block of column o
  for (int64_t o = 0; o < TO; ++o) {
    while (block_start(TOp, b + 1) <= o) ++b;
    const int64_t o0 = block_start(TOp, b), W = block_width(TOp, b);
    int64_t total = 0;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < KH; ++i)
        for (int64_t j = 0; j < KW; ++j) {
          const int8_t v = src[((o * C + c) * KH + i) * KW + j];
          dst[o0 * taps * K4 * 4 + (((i * KW + j) * K4 + c / 4) * W + o - o0) * 4 + c % 4] = v;
          total += v;
        }
    cp[o] = static_cast<int32_t>(total * in_zero);
  }
  return {packed, corr};
}

// x: (N, C, H, W) uint8 codes, any strides (channels-last is the fast case). packed, corr: from
// term_conv_pack. mult: (T * O) float32, bias (O) or None. Returns (N, O, OH, OW) channels-last
// uint8 codes (out_scale > 0) or float32. x_scale > 0: each term is (dot * x_scale) * mult[j],
// the order of oneDNN's int8 convolution (mult then holds the weight scales alone; found by
// comparing its float output with the candidate orders), so its outputs are bit-identical;
// x_scale <= 0: dot * mult[j] (mult = x_scale * w_scale folded).
// hswish: Hardswish on the float result, PyTorch's (y * min(max(y + 3, 0), 6)) / 6, then (codes)
// the simulation's quantization nearbyint(h / s) + zo: a convolution, its Hardswish and the
// quantization that follows them in one pass.
// onednn: codes as oneDNN's int8 convolution writes them, nearbyint(y * (1 / s) + zo) (float32
// reciprocal, zero point before the rounding) instead of the simulation's nearbyint(y / s) + zo;
// and accum (optional), a residual summed before the clamp and the quantization, (N, O, OH, OW)
// channels-last, uint8 codes or float32: y = fma(accum - accum_zero, accum_scale, y), oneDNN's
// sum post-op. Both found by comparing oneDNN's codes with candidate orders on millions of
// outputs (scales that are not float32 values included): each other order differed on 2-42.
// Rows [begin, end) of images x rows into the padded buffer (arguments, not captures: see the
// note on captures in term_conv_impl)
static void copy_rows(int64_t begin, int64_t end, uint8_t* pp, const uint8_t* xp, int64_t xs0,
                      int64_t xs1, int64_t xs2, int64_t xs3, int64_t C, int64_t Cp, int64_t H,
                      int64_t Hp, int64_t W, int64_t Wp, int64_t ph, int64_t pw, bool cl) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / H, h = r % H;
    uint8_t* row = pp + ((n * Hp + h + ph) * Wp + pw) * Cp;
    const uint8_t* xr = xp + n * xs0 + h * xs2;
    for (int64_t v = 0; v < W; ++v) {
      if (cl) {
        std::memcpy(row + v * Cp, xr + v * xs3, C);
      } else {
        for (int64_t c = 0; c < C; ++c) row[v * Cp + c] = xr[v * xs3 + c * xs1];
      }
    }
  }
}

// Copy every image into the padded (Hp, Wp, Cp) buffer ``pp`` (already filled with the zero
// point). Parallel with a fixed grain of 8 rows even for small images: on one thread the idle
// OpenMP thread fell asleep before the next parallel loop (mnist-cnn batch 16 0.48 -> 0.70 ms)
static void pad_copy(uint8_t* pp, const uint8_t* xp, c10::IntArrayRef xs, int64_t N, int64_t C,
                     int64_t Cp, int64_t H, int64_t Hp, int64_t W, int64_t Wp, int64_t ph,
                     int64_t pw, bool cl) {
  const int64_t xs0 = xs[0], xs1 = xs[1], xs2 = xs[2], xs3 = xs[3];
  at::parallel_for(0, N * H, 8, [&](int64_t begin, int64_t end) {
    copy_rows(begin, end, pp, xp, xs0, xs1, xs2, xs3, C, Cp, H, Hp, W, Wp, ph, pw, cl);
  });
}

// Whether x is (N, C, H, W) channels-last with no gaps: (N, H, W, C) contiguous in memory
static bool dense_channels_last(const torch::Tensor& x) {
  const auto xs = x.strides();
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  return xs[1] == 1 && xs[3] == C && xs[2] == W * C && xs[0] == H * W * C;
}

// Whether a call takes the 1x1 path of pointwise.cpp: a VNNI build, a stride-1 unpadded 1x1
// kernel, one term, oneDNN's order without Hardswish, codes out, no float residual, and input
// channels a multiple of 4 in dense channels-last memory (read in place)
static bool pointwise_case(const torch::Tensor& x, int64_t kh, int64_t kw,
                           const std::vector<int64_t>& stride,
                           const std::vector<int64_t>& padding, int64_t terms, bool onednn_order,
                           bool codes_out, double x_scale, bool float_accum) {
  return COMPACTNN_VNNI && kh == 1 && kw == 1 && stride[0] == 1 && stride[1] == 1 &&
         padding[0] == 0 && padding[1] == 0 && terms == 1 && onednn_order && codes_out &&
         x_scale > 0 && !float_accum && x.size(1) % 4 == 0 && dense_channels_last(x);
}

bool TermConvPlan::pointwise(const torch::Tensor& x) const {
  return x.dim() == 4 && pointwise_case(x, kh, kw, stride, padding, 1, !hswish, out_scale > 0,
                                        x_scale, false);
}

bool TermConvPlan::pointwise_fits(int64_t C) const {
  return COMPACTNN_VNNI && kh == 1 && kw == 1 && stride[0] == 1 && stride[1] == 1 &&
         padding[0] == 0 && padding[1] == 0 && !hswish && out_scale > 0 && x_scale > 0 &&
         C % 4 == 0 && packed.size(1) * 4 == C;
}

PointwiseArgs TermConvPlan::pointwise_args(const uint8_t* x, int64_t M, int64_t C,
                                           std::vector<float>& mpad,
                                           std::vector<float>& bpad) const {
  TORCH_CHECK(pointwise_fits(C), "pointwise_args: the input does not take the 1x1 path");
  const int64_t K4 = packed.size(1), TOp = packed.size(2), O = mult.numel();
  TORCH_CHECK(O <= TOp, "pointwise_args: weight and scales do not match");
  mpad.assign(TOp, 0.0f);
  bpad.assign(TOp, 0.0f);
  const float* mp = mult.data_ptr<float>();
  std::copy(mp, mp + O, mpad.begin());
  if (bias.has_value()) {
    const float* bp = bias.value().data_ptr<float>();
    std::copy(bp, bp + O, bpad.begin());
  }
  const float s = static_cast<float>(out_scale);
  return {x, M, K4, TOp, O, packed.data_ptr<int8_t>(), corr.data_ptr<int32_t>(), mpad.data(),
          bpad.data(), static_cast<float>(x_scale), 1.0f / s, static_cast<float>(out_zero),
          static_cast<float>(lo), static_cast<float>(hi), nullptr, 1.0f, 0.0f, nullptr};
}

torch::Tensor term_conv_impl(const torch::Tensor& x, int64_t in_zero, const torch::Tensor& packed,
                             const torch::Tensor& corr, const torch::Tensor& mult,
                             const c10::optional<torch::Tensor>& bias, int64_t terms, int64_t kh,
                             int64_t kw, const std::vector<int64_t>& stride,
                             const std::vector<int64_t>& padding,
                             const std::vector<int64_t>& dilation, double out_scale,
                             int64_t out_zero, double lo, double hi, double x_scale, bool onednn,
                             bool hswish, const c10::optional<torch::Tensor>& accum,
                             double accum_scale, int64_t accum_zero) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kUInt8, "x: (N, C, H, W) uint8 codes");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kInt8 && packed.is_contiguous(),
              "packed: from term_conv_pack");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K4 = packed.size(1), TOp = packed.size(2), Cp = K4 * 4;
  TORCH_CHECK(K4 == (C + 3) / 4, "packed weight does not match the input channels");
  const int64_t TO = mult.numel(), O = TO / terms;
  TORCH_CHECK(terms >= 1 && O * terms == TO && TO <= TOp && TOp % 16 == 0,
              "mult: (terms * O) float32");
  TORCH_CHECK(mult.scalar_type() == torch::kFloat32 && mult.is_contiguous(), "mult: float32");
  TORCH_CHECK(corr.numel() == TOp && corr.scalar_type() == torch::kInt32, "corr: (TOp) int32");
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias.value();
    TORCH_CHECK(b.numel() == O && b.scalar_type() == torch::kFloat32 && b.is_contiguous(),
                "bias: (O) float32");
    bp = b.data_ptr<float>();
  }
  const int64_t taps = packed.size(0);
  TORCH_CHECK(taps > 0, "empty kernel");
  TORCH_CHECK(kh * kw == taps, "kh * kw: the packed weight's taps");
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1];
  const int64_t dh = dilation[0], dw = dilation[1];
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "the kernel does not fit the padded input");
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  const bool codes_out = out_scale > 0;
  const uint8_t* au = nullptr;  // the residual: uint8 codes or float32, (N, OH, OW, O) in memory
  const float* af = nullptr;
  torch::Tensor acc_t;
  if (accum.has_value()) {
    acc_t = accum.value();
    TORCH_CHECK(acc_t.dim() == 4 && acc_t.size(0) == N && acc_t.size(1) == O &&
                    acc_t.size(2) == OH && acc_t.size(3) == OW,
                "accum: (N, O, OH, OW), the output's shape");
    TORCH_CHECK(acc_t.stride(1) == 1 && acc_t.stride(3) == O && acc_t.stride(2) == OW * O &&
                    acc_t.stride(0) == OH * OW * O,
                "accum: channels-last contiguous");
    if (acc_t.scalar_type() == torch::kUInt8) {
      au = acc_t.data_ptr<uint8_t>();
    } else {
      TORCH_CHECK(acc_t.scalar_type() == torch::kFloat32, "accum: uint8 codes or float32");
      af = acc_t.data_ptr<float>();
    }
  }
  const bool has_acc = au != nullptr || af != nullptr;
  const float sa = static_cast<float>(accum_scale), za = static_cast<float>(accum_zero);
  // (N, O, OH, OW) channels-last: (N, OH, OW, O) in memory
  auto out = torch::empty({N, O, OH, OW}, torch::dtype(codes_out ? torch::kUInt8 : torch::kFloat32)
                                              .memory_format(at::MemoryFormat::ChannelsLast));
  std::vector<int64_t> tap(taps);
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j) tap[i * kw + j] = (i * dh * Wp + j * dw) * Cp;
  const Geometry g{K4, Cp, Wp, sw, taps, tap.data()};
  // the padded (Hp, Wp, Cp) copy of every image: zero point in the padding and extra channels;
  // none when the input already is that layout (no padding, channels a multiple of 4, dense
  // channels-last: most 1x1 convolutions), saving a pass and two allocations per call
  const uint8_t* xp = x.data_ptr<uint8_t>();
  const auto xs = x.strides();
  const bool cl = xs[1] == 1 && xs[3] == C;
  const bool as_is = cl && ph == 0 && pw == 0 && Cp == C && dense_channels_last(x);
  torch::Tensor padded;
  const uint8_t* pp = xp;
  if (!as_is) {
    padded = torch::full({N, Hp, Wp, Cp}, static_cast<uint8_t>(in_zero), torch::kUInt8);
    uint8_t* dst = padded.data_ptr<uint8_t>();
    pad_copy(dst, xp, xs, N, C, Cp, H, Hp, W, Wp, ph, pw, cl);
    pp = dst;
  }
  const int8_t* wp = packed.data_ptr<int8_t>();
  const int32_t* cp = corr.data_ptr<int32_t>();
  const float* mp = mult.data_ptr<float>();
  const float s = static_cast<float>(out_scale), z = static_cast<float>(out_zero);
  const float inv = 1.0f / s;  // oneDNN's form: a float32 reciprocal of the float32 scale
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  if (pointwise_case(x, kh, kw, stride, padding, terms, onednn && !hswish, codes_out,
                     x_scale, af != nullptr)) {
    // a 1x1 matrix product: the tile-in-registers path (pointwise.cpp), same codes
    std::vector<float> mpad(TOp, 0.0f), bpad(TOp, 0.0f);
    std::copy(mp, mp + O, mpad.begin());
    if (bp != nullptr) std::copy(bp, bp + O, bpad.begin());
    pointwise_conv({xp, N * H * W, K4, TOp, O, wp, cp, mpad.data(), bpad.data(),
                    static_cast<float>(x_scale), inv, z, flo, fhi, au, sa, za,
                    out.data_ptr<uint8_t>()});
    return out;
  }
  uint8_t* ou = codes_out ? out.data_ptr<uint8_t>() : nullptr;
  float* of = codes_out ? nullptr : out.data_ptr<float>();
  // One work item: an output row, or (one term, above kBlock columns) an output row's block of
  // columns (block_start), blocks outermost: threads then share the weight (each reads its blocks)
  // instead of each reading all of it, which decides the time when there are few rows (a
  // batch-1 call on a 2x2 map, a linear layer) and a weight larger than the cache.
  const bool split = COMPACTNN_VNNI && terms == 1 && TOp > kBlock;
  const int64_t blocks = split ? block_count(TOp) : 1, width = split ? kBlock : TOp;
  const int64_t rows = N * OH, column_bytes = taps * K4 * 4;
  const int64_t grain = grain_for(OW * width * taps * K4 * 4);
  at::parallel_for(0, rows * blocks, grain, [&](int64_t begin, int64_t end) {
    // captures copied into locals: through the captured references, every store that may
    // alias them (a uint8 store aliases anything) made the compiler reload them per item
    const auto rows_ = rows;
    const auto split_ = split;
    const auto width_ = width;
    const auto column_bytes_ = column_bytes;
    const auto Cp_ = Cp;
    const auto Hp_ = Hp;
    const auto O_ = O;
    const auto OH_ = OH;
    const auto OW_ = OW;
    const auto TOp_ = TOp;
    const auto Wp_ = Wp;
    const auto bp_ = bp;
    const auto codes_out_ = codes_out;
    const auto cp_ = cp;
    const auto fhi_ = fhi;
    const auto flo_ = flo;
    const auto g_ = g;
    const auto mp_ = mp;
    const bool two_step = x_scale > 0;  // (dot * x_scale) * mult, oneDNN's order
    const float xs_ = static_cast<float>(x_scale);
    const auto of_ = of;
    const auto ou_ = ou;
    const auto pp_ = pp;
    const auto s_ = s;
    const auto sh_ = sh;
    const auto terms_ = terms;
    const auto wp_ = wp;
    const auto z_ = z;
    const auto au_ = au;
    const auto af_ = af;
    const auto has_acc_ = has_acc;
    const auto onednn_ = onednn && !hswish;
    const auto hswish_ = hswish;
    const auto inv_ = inv;
    const auto sa_ = sa;
    const auto za_ = za;
    std::vector<int32_t> acc(OW_ * width_);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i % rows_, blk = i / rows_;
      const int64_t n = r / OH_, oh = r % OH_;
      const uint8_t* src = pp_ + (n * Hp_ + oh * sh_) * Wp_ * Cp_;
      // this item's columns [o0, o0 + wb): a[j - o0] holds column j's dot
      const int64_t wb = split_ ? block_width(TOp_, blk) : width_;
      const int64_t o0 = split_ ? block_start(TOp_, blk) : 0;
#if COMPACTNN_VNNI
      if (split_) {
        dot_block_row(src, g_, wp_ + o0 * column_bytes_, wb, OW_, acc.data());
      } else {
        dot_any(src, g_, wp_, TOp_, OW_, acc.data());
      }
#else
      dot_any(src, g_, wp_, TOp_, OW_, acc.data());
#endif
      const int64_t o1 = split_ ? std::min(O_, o0 + wb) : O_;
      for (int64_t ow = 0; ow < OW_; ++ow) {
        const int32_t* a = acc.data() + ow * wb;
        const int64_t pix = (n * OH_ + oh) * OW_ + ow;
        int64_t o = o0;
#if COMPACTNN_VNNI
        // 16 channels at once: the same float operations in the same order as below
        const __m512 vs = _mm512_set1_ps(s_), vz = _mm512_set1_ps(z_);
        const __m512 vlo = _mm512_set1_ps(flo_), vhi = _mm512_set1_ps(fhi_);
        for (; o + 16 <= o1; o += 16) {
          auto term = [&](int64_t j) {
            const __m512i d =
                _mm512_sub_epi32(_mm512_loadu_si512(a + (j - o0)), _mm512_loadu_si512(cp_ + j));
            __m512 v = _mm512_cvtepi32_ps(d);
            if (two_step) v = _mm512_mul_ps(v, _mm512_set1_ps(xs_));
            return _mm512_mul_ps(v, _mm512_loadu_ps(mp_ + j));
          };
          __m512 y = term(o);
          if (bp_ != nullptr) y = _mm512_add_ps(y, _mm512_loadu_ps(bp_ + o));
          for (int64_t t = 1; t < terms_; ++t) y = _mm512_add_ps(y, term(t * O_ + o));
          if (has_acc_) {
            const int64_t at = pix * O_ + o;
            const __m512 r = au_ != nullptr
                ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(au_ + at))))
                : _mm512_loadu_ps(af_ + at);
            y = _mm512_fmadd_ps(_mm512_sub_ps(r, _mm512_set1_ps(za_)), _mm512_set1_ps(sa_), y);
          }
          if (hswish_) {
            const __m512 t = _mm512_min_ps(
                _mm512_max_ps(_mm512_add_ps(y, _mm512_set1_ps(3.0f)), _mm512_setzero_ps()),
                _mm512_set1_ps(6.0f));
            y = _mm512_div_ps(_mm512_mul_ps(y, t), _mm512_set1_ps(6.0f));
          }
          if (codes_out_ && onednn_) {
            y = _mm512_roundscale_ps(_mm512_add_ps(_mm512_mul_ps(y, _mm512_set1_ps(inv_)), vz),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            y = _mm512_min_ps(_mm512_max_ps(y, vlo), vhi);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(ou_ + pix * O_ + o),
                             _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(y)));
          } else if (codes_out_) {
            y = _mm512_roundscale_ps(_mm512_div_ps(y, vs),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            y = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(y, vz), vlo), vhi);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(ou_ + pix * O_ + o),
                             _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(y)));
          } else {
            _mm512_storeu_ps(of_ + pix * O_ + o, _mm512_min_ps(_mm512_max_ps(y, vlo), vhi));
          }
        }
#endif
        for (; o < o1; ++o) {
          auto dot = [&](int64_t j) {
            const float v = static_cast<float>(a[j - o0] - cp_[j]);
            return two_step ? (v * xs_) * mp_[j] : v * mp_[j];
          };
          float y = dot(o);
          if (bp_ != nullptr) y += bp_[o];
          for (int64_t t = 1; t < terms_; ++t)
            y += dot(t * O_ + o);
          if (has_acc_) {
            const int64_t at = pix * O_ + o;
            const float r = au_ != nullptr ? static_cast<float>(au_[at]) : af_[at];
            y = std::fma(r - za_, sa_, y);
          }
          if (hswish_) y = (y * std::min(std::max(y + 3.0f, 0.0f), 6.0f)) / 6.0f;
          if (codes_out_) {
            const float q = onednn_ ? std::nearbyint(y * inv_ + z_) : std::nearbyint(y / s_) + z_;
            ou_[pix * O_ + o] = static_cast<uint8_t>(std::min(std::max(q, flo_), fhi_));
          } else {
            of_[pix * O_ + o] = std::min(std::max(y, flo_), fhi_);
          }
        }
      }
    }
  });
  return out;
}

torch::Tensor term_conv(torch::Tensor x, int64_t in_zero, torch::Tensor packed, torch::Tensor corr,
                        torch::Tensor mult, c10::optional<torch::Tensor> bias, int64_t terms,
                        int64_t kh, int64_t kw, std::vector<int64_t> stride, std::vector<int64_t> padding,
                        std::vector<int64_t> dilation, double out_scale, int64_t out_zero,
                        double lo, double hi, double x_scale) {
  return term_conv_impl(x, in_zero, packed, corr, mult, bias, terms, kh, kw, stride, padding,
                        dilation, out_scale, out_zero, lo, hi, x_scale, false, false,
                        c10::nullopt, 0.0, 0);
}

torch::Tensor term_conv_onednn(torch::Tensor x, int64_t in_zero, torch::Tensor packed,
                               torch::Tensor corr, torch::Tensor mult,
                               c10::optional<torch::Tensor> bias, int64_t kh, int64_t kw,
                               std::vector<int64_t> stride, std::vector<int64_t> padding,
                               std::vector<int64_t> dilation, double out_scale, int64_t out_zero,
                               double lo, double hi, double x_scale,
                               c10::optional<torch::Tensor> accum, double accum_scale,
                               int64_t accum_zero, bool hswish) {
  return term_conv_impl(x, in_zero, packed, corr, mult, bias, 1, kh, kw, stride, padding,
                        dilation, out_scale, out_zero, lo, hi, x_scale, true, hswish, accum,
                        accum_scale, accum_zero);
}

bool has_vnni() { return COMPACTNN_VNNI != 0; }

// The instruction ceiling of the int8 kernels: on each of ``threads`` threads, ``iters`` rounds
// of 12 independent 512-bit vpdpbusd (64 multiply-accumulates each), nothing else (written in
// assembly so the compiler cannot fold the constant operands away). Returns the MACs done (0
// without VNNI); the caller times it (bench/deploy_checks.vnni_peak).
static void vnni_rounds(int64_t iters) {
#if COMPACTNN_VNNI
  for (int64_t i = 0; i < iters; ++i) {
    __asm__ volatile(
        "vpdpbusd %%zmm12, %%zmm13, %%zmm0\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm1\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm2\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm3\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm4\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm5\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm6\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm7\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm8\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm9\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm10\n\t"
        "vpdpbusd %%zmm12, %%zmm13, %%zmm11\n\t" ::
            : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
              "xmm10", "xmm11");
  }
#else
  (void)iters;
#endif
}

double vnni_peak_macs(int64_t iters, int64_t threads) {
  at::parallel_for(0, threads, 1, [iters](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) vnni_rounds(iters);
  });
  return COMPACTNN_VNNI ? static_cast<double>(iters) * threads * 12 * 64 : 0.0;
}

void register_termconv(pybind11::module& m) {
  m.def("term_conv_pack", &term_conv_pack, "pack int8 weight terms for term_conv");
  m.def("term_conv", &term_conv,
        "int8 convolution of uint8 codes with one or two weight terms, requantized in one pass");
  m.def("term_conv_onednn", &term_conv_onednn,
        "term_conv in oneDNN's order: codes as its int8 convolution writes them, an optional "
        "residual (uint8 codes or float32) summed before the post-op, an optional Hardswish");
  pybind11::class_<TermConvPlan>(m, "TermConvPlan")
      .def(pybind11::init([](int64_t in_zero, torch::Tensor packed, torch::Tensor corr,
                             torch::Tensor mult, c10::optional<torch::Tensor> bias, int64_t kh,
                             int64_t kw, std::vector<int64_t> stride,
                             std::vector<int64_t> padding, std::vector<int64_t> dilation,
                             double out_scale, int64_t out_zero, double lo, double hi,
                             double x_scale, bool hswish) {
             TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                         "stride, padding, dilation: two values each");
             return TermConvPlan{in_zero, packed, corr, mult, bias, kh, kw, stride, padding,
                                 dilation, out_scale, out_zero, lo, hi, x_scale, hswish};
           }),
           "term_conv_onednn's arguments after x, without the residual ones")
      .def("__call__",
           [](const TermConvPlan& p, const torch::Tensor& x) {
             return p.run(x, c10::nullopt, 1.0, 0);
           })
      .def("pointwise", &TermConvPlan::pointwise,
           "whether a call on x (without a float residual) takes the 1x1 path of pointwise.cpp")
      .def("sum", [](const TermConvPlan& p, const torch::Tensor& x, const torch::Tensor& accum,
                     double accum_scale, int64_t accum_zero) {
        return p.run(x, accum, accum_scale, accum_zero);
      });
  m.def("has_vnni", &has_vnni, "whether the AVX-512 VNNI path was compiled");
  m.def("vnni_peak_macs", &vnni_peak_macs,
        "iters rounds of 12 independent vpdpbusd on each of threads threads; the MACs done",
        pybind11::arg("iters"), pybind11::arg("threads"));
}
