// Depthwise int8 convolution of uint8 codes (one weight per channel and tap), requantized in
// the same pass (compactnn.deployment.runner). oneDNN spends ~40-60 us per depthwise call at
// batch 1 whatever its size (MobileNetV3-Small has 11); here the input is converted once to
// float32 (q - z), and each output row runs 16 channels per vector, four pixels sharing each
// weight load.
//
// Exactness: (q - z) and the int8 weights are small integers and a window has at most 49 taps,
// so every float32 product and sum is an exact integer (|acc| <= 49 * 255 * 128 < 2^24) and
// equals the int32 dot of oneDNN's kernel. Then oneDNN's float order: y = (acc * x_scale) *
// w_scale[c] + bias[c]; codes nearbyint(y * (1 / s) + zo) clamped to [lo, hi] (which also
// apply a ReLU / Hardtanh), or float32 clamp(y, lo, hi); -ffp-contract=off. With hswish, PyTorch's
// Hardswish (y * min(max(y + 3, 0), 6)) / 6 follows, then (codes) the simulation's quantization
// nearbyint(h / s) + zo: the convolution, its Hardswish and the next quantization in one pass.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Work (multiply-accumulates, or values converted) below which a loop runs on the calling
// thread: at batch 1 on 2 threads MobileNetV3-Small's depthwise layers at 64x64 took 19-27 us
// on two threads, 6-9 us on one (waking the second thread costs more than it saves).
constexpr int64_t kParallelWork = 128 * 1024;

inline int64_t grain_for(int64_t per_item) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, per_item));
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define COMPACTNN_DW512 1
#else
#define COMPACTNN_DW512 0
#endif

// x: (N, C, H, W) uint8 codes, any strides (channels-last is the fast case). w: (KH * KW, Cp)
// float32 integer codes, Cp = C rounded up to 16; w_scale, bias: (Cp) float32 (zeros after C,
// so every vector load stays inside).
// Returns (N, C, OH, OW) in channels-last memory: uint8 codes (out_scale > 0) or float32.
torch::Tensor dw_conv(const torch::Tensor& x, double x_scale, int64_t in_zero,
                      const torch::Tensor& w, const torch::Tensor& w_scale,
                      const torch::Tensor& bias, int64_t kh, int64_t kw,
                      const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                      const std::vector<int64_t>& dilation, double out_scale, int64_t out_zero,
                      double lo, double hi, bool hswish) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kUInt8, "x: (N, C, H, W) uint8 codes");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
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
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  // the padded (Hp, Wp, Cp) float32 copy of every image holding q - z (0 in the padding):
  // converted once per input value rather than once per tap that reads it
  auto padded = torch::zeros({N, Hp, Wp, Cp}, torch::kFloat32);
  float* const pp = padded.data_ptr<float>();
  const uint8_t* const xp = x.data_ptr<uint8_t>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2), xs3 = x.stride(3);
  const float z = static_cast<float>(in_zero);
  at::parallel_for(0, N * H, grain_for(W * C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / H, h = r % H;
      float* row = pp + ((n * Hp + h + ph) * Wp + pw) * Cp;
      const uint8_t* xr = xp + n * xs0 + h * xs2;
      for (int64_t v = 0; v < W; ++v) {
        int64_t c = 0;
#if COMPACTNN_DW512
        if (xs1 == 1) {  // channels-last: 16 codes at a time
          const __m512 vz = _mm512_set1_ps(z);
          for (; c < C; c += 16) {
            const __mmask16 m = C - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (C - c)) - 1);
            const __m128i b = _mm_maskz_loadu_epi8(m, xr + v * xs3 + c);
            const __m512 f = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), vz);
            _mm512_mask_storeu_ps(row + v * Cp + c, m, f);
          }
        }
#endif
        for (; c < C; ++c) row[v * Cp + c] = static_cast<float>(xr[v * xs3 + c * xs1]) - z;
      }
    }
  });
  const bool codes_out = out_scale > 0;
  // (N, C, OH, OW) channels-last: (N, OH, OW, C) in memory
  auto out = torch::empty({N, C, OH, OW}, torch::dtype(codes_out ? torch::kUInt8 : torch::kFloat32)
                                              .memory_format(at::MemoryFormat::ChannelsLast));
  uint8_t* const ou = codes_out ? out.data_ptr<uint8_t>() : nullptr;
  float* const of = codes_out ? nullptr : out.data_ptr<float>();
  const float* const wp = w.data_ptr<float>();
  const float* const wsp = w_scale.data_ptr<float>();
  const float* const bp = bias.data_ptr<float>();
  const float xsc = static_cast<float>(x_scale);
  const float s = static_cast<float>(out_scale), zo = static_cast<float>(out_zero);
  const float inv = 1.0f / s;  // oneDNN's form: a float32 reciprocal of the float32 scale
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  std::vector<int64_t> tap(taps);
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j) tap[i * kw + j] = (i * dh * Wp + j * dw) * Cp;
  const int64_t* const tp = tap.data();
  const int64_t pstep = sw * Cp;  // floats from one output pixel's window to the next
  at::parallel_for(0, N * OH, grain_for(OW * Cp * taps), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      const float* const rowp = pp + (n * Hp + oh * sh) * Wp * Cp;
      const int64_t pix0 = (n * OH + oh) * OW;
      int64_t c = 0;
#if COMPACTNN_DW512
      const __m512 vxs = _mm512_set1_ps(xsc), vinv = _mm512_set1_ps(inv);
      const __m512 vzo = _mm512_set1_ps(zo), vlo = _mm512_set1_ps(flo), vhi = _mm512_set1_ps(fhi);
      for (; c < C; c += 16) {
        const __mmask16 m = C - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (C - c)) - 1);
        const __m512 wsv = _mm512_loadu_ps(wsp + c), bv = _mm512_loadu_ps(bp + c);
        auto finish = [&](__m512 acc, int64_t ow) {
          __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(acc, vxs), wsv), bv);
          const int64_t at = (pix0 + ow) * C + c;
          if (hswish) {
            const __m512 t = _mm512_min_ps(
                _mm512_max_ps(_mm512_add_ps(y, _mm512_set1_ps(3.0f)), _mm512_setzero_ps()),
                _mm512_set1_ps(6.0f));
            y = _mm512_div_ps(_mm512_mul_ps(y, t), _mm512_set1_ps(6.0f));
          }
          if (codes_out && hswish) {
            y = _mm512_roundscale_ps(_mm512_div_ps(y, _mm512_set1_ps(s)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            y = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(y, vzo), vlo), vhi);
            _mm_mask_storeu_epi8(ou + at, m, _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(y)));
          } else if (codes_out) {
            y = _mm512_roundscale_ps(_mm512_add_ps(_mm512_mul_ps(y, vinv), vzo),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            y = _mm512_min_ps(_mm512_max_ps(y, vlo), vhi);
            _mm_mask_storeu_epi8(ou + at, m, _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(y)));
          } else {
            _mm512_mask_storeu_ps(of + at, m, _mm512_min_ps(_mm512_max_ps(y, vlo), vhi));
          }
        };
        int64_t ow = 0;
        for (; ow + 4 <= OW; ow += 4) {  // four pixels share each weight load
          const float* src = rowp + ow * pstep + c;
          __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (int64_t k = 0; k < taps; ++k) {
            const __m512 wv = _mm512_loadu_ps(wp + k * Cp + c);  // exact integer products
            const float* t = src + tp[k];
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(t), wv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(t + pstep), wv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(t + 2 * pstep), wv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(t + 3 * pstep), wv, a3);
          }
          finish(a0, ow);
          finish(a1, ow + 1);
          finish(a2, ow + 2);
          finish(a3, ow + 3);
        }
        for (; ow < OW; ++ow) {
          const float* src = rowp + ow * pstep + c;
          __m512 a = _mm512_setzero_ps();
          for (int64_t k = 0; k < taps; ++k)
            a = _mm512_fmadd_ps(_mm512_loadu_ps(src + tp[k]), _mm512_loadu_ps(wp + k * Cp + c), a);
          finish(a, ow);
        }
      }
#endif
      for (; c < C; ++c) {
        for (int64_t ow = 0; ow < OW; ++ow) {
          const float* src = rowp + ow * pstep;
          float acc = 0.0f;
          for (int64_t k = 0; k < taps; ++k) acc += src[tp[k] + c] * wp[k * Cp + c];
          float y = (acc * xsc) * wsp[c] + bp[c];
          const int64_t at = (pix0 + ow) * C + c;
          if (hswish) y = (y * std::min(std::max(y + 3.0f, 0.0f), 6.0f)) / 6.0f;
          if (codes_out) {
            const float q = hswish ? std::nearbyint(y / s) + zo : std::nearbyint(y * inv + zo);
            ou[at] = static_cast<uint8_t>(std::min(std::max(q, flo), fhi));
          } else {
            of[at] = std::min(std::max(y, flo), fhi);
          }
        }
      }
    }
  });
  return out;
}

// dw_conv with every constant argument bound once (one tensor converted per call)
struct DwConvPlan {
  double x_scale;
  int64_t in_zero;
  torch::Tensor w, w_scale, bias;
  int64_t kh, kw;
  std::vector<int64_t> stride, padding, dilation;
  double out_scale;
  int64_t out_zero;
  double lo, hi;
  bool hswish;
};

void register_dwconv(pybind11::module& m) {
  m.def("dw_conv", &dw_conv, "depthwise int8 convolution of uint8 codes, requantized in one pass");
  pybind11::class_<DwConvPlan>(m, "DwConvPlan")
      .def(pybind11::init([](double x_scale, int64_t in_zero, torch::Tensor w,
                             torch::Tensor w_scale, torch::Tensor bias, int64_t kh, int64_t kw,
                             std::vector<int64_t> stride, std::vector<int64_t> padding,
                             std::vector<int64_t> dilation, double out_scale, int64_t out_zero,
                             double lo, double hi, bool hswish) {
             TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                         "stride, padding, dilation: two values each");
             return DwConvPlan{x_scale, in_zero, w, w_scale, bias, kh, kw, stride, padding,
                               dilation, out_scale, out_zero, lo, hi, hswish};
           }),
           "dw_conv's arguments after x")
      .def("__call__", [](const DwConvPlan& p, const torch::Tensor& x) {
        return dw_conv(x, p.x_scale, p.in_zero, p.w, p.w_scale, p.bias, p.kh, p.kw, p.stride,
                       p.padding, p.dilation, p.out_scale, p.out_zero, p.lo, p.hi, p.hswish);
      });
}
