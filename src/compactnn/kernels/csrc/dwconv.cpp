// Depthwise int8 convolution of uint8 codes (one weight per channel and tap), requantized in
// the same pass (compactnn.deployment.runner). oneDNN spends ~40-60 us per depthwise call at
// batch 1 whatever its size (MobileNetV3-Small has 11). Two forms, equal outputs:
// - the integer form (windows of up to 7 x 8 taps without width dilation, a VNNI + VBMI
//   build): uint8 rows in a ring, 4 adjacent taps of 16 channels per vpdpbusd (dw_vnni_rows);
// - the float form (any other window): each block of 16 channels converts the input rows it
//   reads to float32 (q - z) into a small ring of rows that stays in L1, and each output row
//   runs 16 channels per vector, four pixels sharing each weight load.
//
// Exactness: (q - z) and the int8 weights are small integers and a window has at most 49 taps,
// so every float32 product and sum is an exact integer (|acc| <= 49 * 255 * 128 < 2^24) and
// equals the int32 dot of oneDNN's kernel. Then oneDNN's float order: y = (acc * x_scale) *
// w_scale[c] + bias[c]; codes nearbyint(y * (1 / s) + zo) clamped to [lo, hi] (which also
// apply a ReLU / Hardtanh), or float32 clamp(y, lo, hi); -ffp-contract=off. With hswish, PyTorch's
// Hardswish (y * min(max(y + 3, 0), 6)) / 6 follows, then (codes) the simulation's quantization
// nearbyint(h / s) + zo: the convolution, its Hardswish and the next quantization in one pass.
#include "dwconv.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// x: (N, C, H, W) uint8 codes, any strides (channels-last is the fast case). w: (KH * KW, Cp)
// float32 integer codes, Cp = C rounded up to 16; w_scale, bias: (Cp) float32 (zeros after C,
// so every vector load stays inside).
// Returns (N, C, OH, OW) in channels-last memory: uint8 codes (out_scale > 0) or float32.
static torch::Tensor dw_conv_impl(const torch::Tensor& x, double x_scale, int64_t in_zero,
                                  const torch::Tensor& w, const torch::Tensor& w_scale,
                                  const torch::Tensor& bias, int64_t kh, int64_t kw,
                                  const std::vector<int64_t>& stride,
                                  const std::vector<int64_t>& padding,
                                  const std::vector<int64_t>& dilation, double out_scale,
                                  int64_t out_zero, double lo, double hi, bool hswish,
                                  const DwPacked* packed = nullptr,
                                  const DwRowSource* src = nullptr,
                                  const std::vector<int64_t>& shape = {},
                                  const DwRowSink* sink = nullptr) {
  // with src: no x, the rows of an input of ``shape`` come from src; with sink: the output
  // rows go there and no tensor is returned (the integer form only, codes out)
  TORCH_CHECK(src != nullptr || (x.dim() == 4 && x.scalar_type() == torch::kUInt8),
              "x: (N, C, H, W) uint8 codes");
  TORCH_CHECK(src == nullptr || (shape.size() == 4 && packed != nullptr &&
                                 dw_integer_form(kh, kw, dilation[1])),
              "a row source needs the integer form, its packed weights and the input's shape");
  TORCH_CHECK(sink == nullptr || (packed != nullptr && dw_integer_form(kh, kw, dilation[1]) &&
                                  out_scale > 0),
              "a row sink needs the integer form, its packed weights and codes out");
  const int64_t N = src ? shape[0] : x.size(0), C = src ? shape[1] : x.size(1);
  const int64_t H = src ? shape[2] : x.size(2), W = src ? shape[3] : x.size(3);
  const int64_t Cp = (C + 15) / 16 * 16, taps = kh * kw;
  TORCH_CHECK(taps > 0 && taps <= 49, "at most 49 taps (exact float32 sums)");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == taps && w.size(1) == Cp &&
                  w.scalar_type() == torch::kFloat32 && w.is_contiguous(),
              "w: (KH * KW, C padded to 16) float32");
  TORCH_CHECK(w_scale.numel() == Cp && w_scale.scalar_type() == torch::kFloat32 &&
                  w_scale.is_contiguous(),
              "w_scale: (C padded to 16) float32");
  TORCH_CHECK(bias.numel() == Cp && bias.scalar_type() == torch::kFloat32 && bias.is_contiguous(),
              "bias: (C padded to 16) float32 (zeros for no bias)");
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1];
  const int64_t dh = dilation[0], dw = dilation[1];
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "the kernel does not fit the padded input");
  const int64_t Wp = W + 2 * pw;
  const bool codes_out = out_scale > 0;
  // (N, C, OH, OW) channels-last: (N, OH, OW, C) in memory
  torch::Tensor out;
  if (sink == nullptr)
    out = torch::empty({N, C, OH, OW}, torch::dtype(codes_out ? torch::kUInt8 : torch::kFloat32)
                                           .memory_format(at::MemoryFormat::ChannelsLast));
  uint8_t* const ou = codes_out && sink == nullptr ? out.data_ptr<uint8_t>() : nullptr;
  float* const of = codes_out ? nullptr : out.data_ptr<float>();
  const uint8_t* const xp = src ? nullptr : x.data_ptr<uint8_t>();
  const int64_t xs0 = src ? 0 : x.stride(0), xs1 = src ? 1 : x.stride(1);
  const int64_t xs2 = src ? 0 : x.stride(2), xs3 = src ? 0 : x.stride(3);
  const float z = static_cast<float>(in_zero);
  const float* const wp = w.data_ptr<float>();
  const float* const wsp = w_scale.data_ptr<float>();
  const float* const bp = bias.data_ptr<float>();
  const float xsc = static_cast<float>(x_scale);
  const float s = static_cast<float>(out_scale), zo = static_cast<float>(out_zero);
  const float inv = 1.0f / s;  // oneDNN's form: a float32 reciprocal of the float32 scale
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  // One task = one output row of one image and one block of 16 channels. The input rows it
  // reads are converted to float32 (q - z, zeros in the padding) into a small per-thread ring
  // of `span` rows of (Wp, 16) floats, tagged with the padded row they hold, so consecutive
  // output rows of the same block convert each input row once and every tap reads from L1.
  // (The kernel used to fill a zeroed, padded float32 copy of the whole input first: 4x the
  // input's bytes, and at batch 1 its zero-fill alone took ~120 us per MobileNetV2 forward.)
  // Tasks are ordered image, band of rows, block, row: with one image, bands of 16 rows keep
  // the two threads on different rows (split by block they would write the same cache lines);
  // with more, a band is the whole image (a block's rows stay in one task).
  const int64_t band_rows = N > 1 ? OH : 16, bands = (OH + band_rows - 1) / band_rows;
  const int64_t CB = Cp / 16, span = (kh - 1) * dh + 1, row_floats = Wp * 16;
#if COMPACTNN_DW512
  const DwOut epi{_mm512_set1_ps(xsc), _mm512_set1_ps(inv), _mm512_set1_ps(zo),
                  _mm512_set1_ps(flo), _mm512_set1_ps(fhi), _mm512_set1_ps(s),
                  hswish, codes_out, ou, of};
#endif
#if COMPACTNN_DWVNNI
  if (dw_integer_form(kh, kw, dw)) {
    DwPacked own;
    if (packed == nullptr) {
      own = dw_pack(w, kh, kw, in_zero);
      packed = &own;
    }
    dw_conv_vnni({xp, xs0, xs1, xs2, xs3, N, C, H, W, Cp, kh, kw, sh, sw, ph, pw, dh, OH, OW,
                  static_cast<uint8_t>(in_zero), packed->w.data_ptr<int8_t>(),
                  packed->corr.data_ptr<int32_t>(), wsp, bp, epi, src, sink});
    return out;
  }
#endif
  at::parallel_for(0, N * bands * CB * band_rows, dw_grain_for(OW * 16 * taps),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> ring(span * row_floats);
    std::vector<int64_t> tag(span, -1);
    std::vector<const float*> rows(kh);
    int64_t held = -1;  // (n, block) whose rows the ring holds
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / (bands * CB * band_rows), band = (r / (CB * band_rows)) % bands;
      const int64_t cb = (r / band_rows) % CB, oh = band * band_rows + r % band_rows;
      if (oh >= OH) continue;
      if (n * CB + cb != held) {
        std::fill(tag.begin(), tag.end(), -1);
        held = n * CB + cb;
      }
      const int64_t c = cb * 16, cn = std::min<int64_t>(16, C - c);  // live channels
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t hp = oh * sh + i * dh, slot = hp % span, h = hp - ph;  // padded, input row
        float* buf = ring.data() + slot * row_floats;
        rows[i] = buf;
        if (tag[slot] == hp) continue;
        tag[slot] = hp;
        if (h < 0 || h >= H) {
          std::fill(buf, buf + row_floats, 0.0f);
          continue;
        }
        std::fill(buf, buf + pw * 16, 0.0f);
        std::fill(buf + (pw + W) * 16, buf + row_floats, 0.0f);
        const uint8_t* xr = xp + n * xs0 + h * xs2 + c * xs1;
        float* dst = buf + pw * 16;
        int64_t v = 0;
#if COMPACTNN_DW512
        if (xs1 == 1) {  // channels-last: one pixel's 16 codes per load
          const __m512 vz = _mm512_set1_ps(z);
          const __mmask16 m = cn == 16 ? 0xFFFF : static_cast<__mmask16>((1u << cn) - 1);
          for (; v < W; ++v) {
            const __m128i b = _mm_maskz_loadu_epi8(m, xr + v * xs3);
            const __m512 f = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), vz);
            _mm512_storeu_ps(dst + v * 16, _mm512_maskz_mov_ps(m, f));  // zeros past C
          }
        }
#endif
        for (; v < W; ++v)
          for (int64_t k = 0; k < 16; ++k)
            dst[v * 16 + k] = k < cn ? static_cast<float>(xr[v * xs3 + k * xs1]) - z : 0.0f;
      }
      const int64_t pix0 = (n * OH + oh) * OW;
      const int64_t pstep = sw * 16;  // floats from one output pixel's window to the next
#if COMPACTNN_DW512
      const __mmask16 m = cn == 16 ? 0xFFFF : static_cast<__mmask16>((1u << cn) - 1);
      const __m512 wsv = _mm512_loadu_ps(wsp + c), bv = _mm512_loadu_ps(bp + c);
      auto finish = [&](__m512 acc, int64_t ow) {
        dw_store(acc, (pix0 + ow) * C + c, m, wsv, bv, epi);
      };
      int64_t ow = 0;
      for (; ow + 4 <= OW; ow += 4) {  // four pixels share each weight load
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < kh; ++i) {
          const float* src = rows[i] + ow * pstep;
          for (int64_t j = 0; j < kw; ++j) {
            const __m512 wv = _mm512_loadu_ps(wp + (i * kw + j) * Cp + c);  // exact products
            const float* t = src + j * dw * 16;
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(t), wv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(t + pstep), wv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(t + 2 * pstep), wv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(t + 3 * pstep), wv, a3);
          }
        }
        finish(a0, ow);
        finish(a1, ow + 1);
        finish(a2, ow + 2);
        finish(a3, ow + 3);
      }
      for (; ow < OW; ++ow) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kw; ++j)
            a = _mm512_fmadd_ps(_mm512_loadu_ps(rows[i] + ow * pstep + j * dw * 16),
                                _mm512_loadu_ps(wp + (i * kw + j) * Cp + c), a);
        finish(a, ow);
      }
#else
      for (int64_t k = 0; k < cn; ++k) {
        for (int64_t ow = 0; ow < OW; ++ow) {
          float acc = 0.0f;
          for (int64_t i = 0; i < kh; ++i)
            for (int64_t j = 0; j < kw; ++j)
              acc += rows[i][ow * pstep + j * dw * 16 + k] * wp[(i * kw + j) * Cp + c + k];
          float y = (acc * xsc) * wsp[c + k] + bp[c + k];
          const int64_t at = (pix0 + ow) * C + c + k;
          if (hswish) y = (y * std::min(std::max(y + 3.0f, 0.0f), 6.0f)) / 6.0f;
          if (codes_out) {
            const float q = hswish ? std::nearbyint(y / s) + zo : std::nearbyint(y * inv + zo);
            ou[at] = static_cast<uint8_t>(std::min(std::max(q, flo), fhi));
          } else {
            of[at] = std::min(std::max(y, flo), fhi);
          }
        }
      }
#endif
    }
  });
  return out;
}

torch::Tensor DwConvPlan::run(const torch::Tensor& x) const {
  return dw_conv_impl(x, x_scale, in_zero, w, w_scale, bias, kh, kw, stride, padding, dilation,
                      out_scale, out_zero, lo, hi, hswish, &packed);
}

torch::Tensor DwConvPlan::run_from(const torch::Tensor& x, int64_t N, int64_t C, int64_t H,
                                   int64_t W, const DwRowSource* src,
                                   const DwRowSink* sink) const {
  return dw_conv_impl(x, x_scale, in_zero, w, w_scale, bias, kh, kw, stride, padding, dilation,
                      out_scale, out_zero, lo, hi, hswish, &packed, src,
                      std::vector<int64_t>{N, C, H, W}, sink);
}

// dw_conv_impl packing the weights for this call
torch::Tensor dw_conv(const torch::Tensor& x, double x_scale, int64_t in_zero,
                      const torch::Tensor& w, const torch::Tensor& w_scale,
                      const torch::Tensor& bias, int64_t kh, int64_t kw,
                      const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                      const std::vector<int64_t>& dilation, double out_scale, int64_t out_zero,
                      double lo, double hi, bool hswish) {
  return dw_conv_impl(x, x_scale, in_zero, w, w_scale, bias, kh, kw, stride, padding, dilation,
                      out_scale, out_zero, lo, hi, hswish);
}

void register_dwconv(pybind11::module& m) {
  m.def("dw_integer_form", &dw_integer_form,
        "whether dw_conv runs a (kh, kw) window of width dilation dilation_w on integer dots",
        pybind11::arg("kh"), pybind11::arg("kw"), pybind11::arg("dilation_w"));
  m.def("dw_conv", &dw_conv, "depthwise int8 convolution of uint8 codes, requantized in one pass");
  pybind11::class_<DwConvPlan>(m, "DwConvPlan")
      .def(pybind11::init([](double x_scale, int64_t in_zero, torch::Tensor w,
                             torch::Tensor w_scale, torch::Tensor bias, int64_t kh, int64_t kw,
                             std::vector<int64_t> stride, std::vector<int64_t> padding,
                             std::vector<int64_t> dilation, double out_scale, int64_t out_zero,
                             double lo, double hi, bool hswish) {
             TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                         "stride, padding, dilation: two values each");
             TORCH_CHECK(w.dim() == 2 && w.size(0) == kh * kw && w.scalar_type() == torch::kFloat32,
                         "w: (KH * KW, C padded to 16) float32");
             auto wc = w.contiguous();
             return DwConvPlan{x_scale, in_zero, wc, w_scale, bias, kh, kw, stride, padding,
                               dilation, out_scale, out_zero, lo, hi, hswish,
                               dw_pack(wc, kh, kw, in_zero)};
           }),
           "dw_conv's arguments after x")
      .def("__call__", [](const DwConvPlan& p, const torch::Tensor& x) { return p.run(x); });
}
