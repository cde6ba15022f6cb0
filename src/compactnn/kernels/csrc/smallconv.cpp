// Direct 2-D convolution for layers with few input channels (an image CNN's first layer: 1 or
// 3 channels), fused with the input's quantization and the output's requantization
// (compactnn.deployment.runner). oneDNN's int8 kernels block input channels by 4 or more, so
// a 1-channel 3x3 layer runs at a small fraction of their peak and costs more than the layers
// after it; here every output pixel is one pass over its KH * KW * C taps, with all output
// channels of every weight term in vector registers.
//
// Exactness: input codes q = clamp(nearbyint(x / s) + z, lo, hi) (the simulation's division and
// round-half-even in float32), values (q - z) and the int8 weight codes are small integers, so
// the float32 sums are exact integers (|acc| < 2^24 is checked by the caller) and equal the
// int32 dot products of the int8 kernel. Each term's dot is scaled by its per-channel
// multiplier, the bias is added to the first term's, the terms are summed in order, and the
// result is either clamped (float output) or quantized as nearbyint(y / scale) + zero clamped
// to the code bounds (which also apply a ReLU / Hardtanh: round is monotone).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kMaxCols = 256;  // terms * output channels held per pixel
constexpr int kPixels = 4;          // output pixels per dot_pixels call (vector path)

#if defined(__AVX512F__)
// One output pixel, NV * 16 columns in registers: acc[j] = sum_k src[tap[k]] * w[k][j] (exact
// integer sums; FMA or not gives the same result).
template <int NV>
inline void dot_pixel(const float* src, const int64_t* tap, int64_t K, const float* w,
                      float* acc) {
  __m512 a[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) a[v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 x = _mm512_set1_ps(src[tap[k]]);
    const float* wk = w + k * NV * 16;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) a[v] = _mm512_fmadd_ps(x, _mm512_loadu_ps(wk + v * 16), a[v]);
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + v * 16, a[v]);
}
#endif

#if defined(__AVX512F__)
// P output pixels at once (src + p * step is pixel p's window): P independent accumulator
// chains, each weight row loaded once for the P pixels. acc is P * NV * 16 wide.
template <int NV, int P>
inline void dot_pixels(const float* src, int64_t step, const int64_t* tap, int64_t K,
                       const float* w, float* acc) {
  // every small loop fully unrolled, so the accumulators live in registers (GCC otherwise
  // kept them on the stack: a store / reload per tap on the dependency chain, 46% of the time)
  __m512 a[P][NV];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) a[p][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * NV * 16;
    const float* sk = src + tap[k];
    __m512 wv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wk + v * 16);
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      const __m512 x = _mm512_set1_ps(sk[p * step]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) a[p][v] = _mm512_fmadd_ps(x, wv[v], a[p][v]);
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + (p * NV + v) * 16, a[p][v]);
}

// acc for kPixels pixels (p * TO + j); false when TO has no vector path (then one at a time)
inline bool dot_block(const float* src, int64_t step, const int64_t* tap, int64_t K,
                     const float* w, int64_t TO, float* acc) {
  switch (TO) {
    case 16: dot_pixels<1, kPixels>(src, step, tap, K, w, acc); return true;
    case 32: dot_pixels<2, kPixels>(src, step, tap, K, w, acc); return true;
    case 48: dot_pixels<3, kPixels>(src, step, tap, K, w, acc); return true;
    case 64: dot_pixels<4, kPixels>(src, step, tap, K, w, acc); return true;
    default: return false;
  }
}
#endif

// acc[j] for j < TO (TO a multiple of 16 on the vector path; w rows are TO wide)
inline void dot_any(const float* src, const int64_t* tap, int64_t K, const float* w,
                    int64_t TO, float* acc) {
#if defined(__AVX512F__)
  switch (TO) {
    case 16: return dot_pixel<1>(src, tap, K, w, acc);
    case 32: return dot_pixel<2>(src, tap, K, w, acc);
    case 48: return dot_pixel<3>(src, tap, K, w, acc);
    case 64: return dot_pixel<4>(src, tap, K, w, acc);
    default: break;
  }
#endif
  for (int64_t j = 0; j < TO; ++j) acc[j] = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float v = src[tap[k]];
    const float* wk = w + k * TO;
    for (int64_t j = 0; j < TO; ++j) acc[j] += v * wk[j];
  }
}

}  // namespace

// x: (N, C, H, W) float32 or uint8 codes, any strides. w: (C * KH * KW, T * O) float32 integer
// codes, rows ordered (c, kh, kw), columns (t, o). mult: (T * O) float32. bias: (O) or None.
// out_scale > 0: uint8 codes clamp(nearbyint(y / out_scale) + out_zero, lo, hi); otherwise
// float32 clamp(y, lo, hi). Returns (N, O, OH, OW) in channels-last memory. x_scale > 0: each
// term is (acc * x_scale) * mult (mult = the weight scales) and codes are
// nearbyint(y * (1 / out_scale) + out_zero) (a float32 reciprocal, the zero point before the
// rounding): oneDNN's order, so bit-identical to its int8 convolution; x_scale <= 0:
// acc * mult (mult = x_scale * w_scale folded) and the division above.
torch::Tensor small_conv(torch::Tensor x, double in_scale, int64_t in_zero, int64_t in_lo,
                         int64_t in_hi, torch::Tensor w, torch::Tensor mult,
                         c10::optional<torch::Tensor> bias, int64_t terms, int64_t kh,
                         int64_t kw, std::vector<int64_t> stride, std::vector<int64_t> padding,
                         std::vector<int64_t> dilation, double out_scale, int64_t out_zero,
                         double lo, double hi, double x_scale) {
  TORCH_CHECK(x.dim() == 4, "x: (N, C, H, W)");
  const bool codes_in = x.scalar_type() == torch::kUInt8;
  TORCH_CHECK(codes_in || x.scalar_type() == torch::kFloat32, "x: float32 or uint8 codes");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = C * kh * kw;
  TORCH_CHECK(w.dim() == 2 && w.size(0) == K && w.scalar_type() == torch::kFloat32 &&
                  w.is_contiguous(),
              "w: (C * KH * KW, T * O) float32 contiguous");
  const int64_t TO = w.size(1), O = TO / terms;
  TORCH_CHECK(terms >= 1 && O * terms == TO && TO <= kMaxCols, "w columns: terms * O <= 256");
  TORCH_CHECK(mult.numel() == TO && mult.scalar_type() == torch::kFloat32 &&
                  mult.is_contiguous(),
              "mult: (T * O) float32");
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value()) {
    b = bias.value();
    TORCH_CHECK(b.numel() == O && b.scalar_type() == torch::kFloat32 && b.is_contiguous(),
                "bias: (O) float32");
    bp = b.data_ptr<float>();
  }
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1];
  const int64_t dh = dilation[0], dw = dilation[1];
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "the kernel does not fit the padded input");
  const bool codes_out = out_scale > 0;
  auto out = torch::empty({N, OH, OW, O}, codes_out ? torch::kUInt8 : torch::kFloat32);
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  const float s = static_cast<float>(in_scale), z = static_cast<float>(in_zero);
  const float qlo = static_cast<float>(in_lo), qhi = static_cast<float>(in_hi);
  const float os = static_cast<float>(out_scale), oz = static_cast<float>(out_zero);
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  const float* wp = w.data_ptr<float>();
  const float* mp = mult.data_ptr<float>();
  const auto xs = x.strides();
  uint8_t* ou = codes_out ? out.data_ptr<uint8_t>() : nullptr;
  float* of = codes_out ? nullptr : out.data_ptr<float>();
  const float* xf = codes_in ? nullptr : x.data_ptr<float>();
  const uint8_t* xu = codes_in ? x.data_ptr<uint8_t>() : nullptr;
  // tap offsets into the padded (C, Hp, Wp) buffer of one image
  std::vector<int64_t> tap(K);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j) tap[(c * kh + i) * kw + j] = (c * Hp + i * dh) * Wp + j * dw;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    // the captures copied into locals: through the captured references, every uint8 store
    // (char aliases anything) made the compiler reload each scalar and pointer per pixel
    const int64_t C_ = C, H_ = H, W_ = W, Hp_ = Hp, Wp_ = Wp, ph_ = ph, pw_ = pw;
    const int64_t sh_ = sh, sw_ = sw, OH_ = OH, OW_ = OW, K_ = K, TO_ = TO, O_ = O;
    const int64_t terms_ = terms, xs0_ = xs[0], xs1_ = xs[1], xs2_ = xs[2], xs3_ = xs[3];
    const float s_ = s, z_ = z, qlo_ = qlo, qhi_ = qhi, os_ = os, oz_ = oz, flo_ = flo;
    const float fhi_ = fhi;
    const bool codes_in_ = codes_in, codes_out_ = codes_out;
    const int64_t* const tap_ = tap.data();
    const float* const wp_ = wp;
    const float* const mp_ = mp;
    // x_scale > 0: each term is (acc * x_scale) * mult, oneDNN's order (mult = w_scale)
    const bool two_step = x_scale > 0;
    const float xsc = static_cast<float>(x_scale);
    const float oinv = 1.0f / os_;  // oneDNN's form: a float32 reciprocal of the float32 scale
    const float* const bp_ = bp;
    const float* const xf_ = xf;
    const uint8_t* const xu_ = xu;
    uint8_t* const ou_ = ou;
    float* const of_ = of;
    std::vector<float> buf(C_ * Hp_ * Wp_);
    alignas(64) float accs[kMaxCols * kPixels];
    for (int64_t n = begin; n < end; ++n) {
      // (q - z) of every input value, zero in the padding (the simulation pads with 0.0)
      std::fill(buf.begin(), buf.end(), 0.0f);
      for (int64_t c = 0; c < C_; ++c)
        for (int64_t h = 0; h < H_; ++h) {
          float* row = buf.data() + (c * Hp_ + h + ph_) * Wp_ + pw_;
          const int64_t base = n * xs0_ + c * xs1_ + h * xs2_;
          if (codes_in_) {
            for (int64_t v = 0; v < W_; ++v) row[v] = static_cast<float>(xu_[base + v * xs3_]) - z_;
          } else {
            for (int64_t v = 0; v < W_; ++v) {
              float q = std::nearbyint(xf_[base + v * xs3_] / s_) + z_;
              row[v] = std::min(std::max(q, qlo_), qhi_) - z_;
            }
          }
        }
      for (int64_t oh = 0; oh < OH_; ++oh)
        for (int64_t ow = 0; ow < OW_; ++ow) {
          const float* src = buf.data() + oh * sh_ * Wp_ + ow * sw_;
          const int64_t slot = ow % kPixels;  // which of the block's pixel sums this one reads
#if defined(__AVX512F__)
          if (slot == 0 && ow + kPixels <= OW_ && TO_ <= 64) {
            if (!dot_block(src, sw_, tap_, K_, wp_, TO_, accs)) {
              for (int p = 0; p < kPixels; ++p)
                dot_any(src + p * sw_, tap_, K_, wp_, TO_, accs + p * TO_);
            }
          } else if (ow + kPixels - slot > OW_ || TO_ > 64) {
            dot_any(src, tap_, K_, wp_, TO_, accs + slot * TO_);
          }
#else
          dot_any(src, tap_, K_, wp_, TO_, accs + slot * TO_);
#endif
          const float* acc = accs + slot * TO_;
          const int64_t pix = (n * OH_ + oh) * OW_ + ow;
          int64_t o = 0;
#if defined(__AVX512F__)
          if (terms_ == 1) {  // the common case, 16 channels at once (same float ops)
            const __m512 vos = _mm512_set1_ps(os_), voz = _mm512_set1_ps(oz_);
            const __m512 vlo = _mm512_set1_ps(flo_), vhi = _mm512_set1_ps(fhi_);
            for (; o + 16 <= O_; o += 16) {
              __m512 y = _mm512_loadu_ps(acc + o);
              if (two_step) y = _mm512_mul_ps(y, _mm512_set1_ps(xsc));
              y = _mm512_mul_ps(y, _mm512_loadu_ps(mp_ + o));
              if (bp_ != nullptr) y = _mm512_add_ps(y, _mm512_loadu_ps(bp_ + o));
              if (codes_out_) {
                y = two_step ? _mm512_add_ps(_mm512_mul_ps(y, _mm512_set1_ps(oinv)), voz)
                             : _mm512_div_ps(y, vos);
                y = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                if (!two_step) y = _mm512_add_ps(y, voz);
                y = _mm512_min_ps(_mm512_max_ps(y, vlo), vhi);
                _mm_storeu_si128(reinterpret_cast<__m128i*>(ou_ + pix * O_ + o),
                                 _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(y)));
              } else {
                _mm512_storeu_ps(of_ + pix * O_ + o, _mm512_min_ps(_mm512_max_ps(y, vlo), vhi));
              }
            }
          }
#endif
          for (; o < O_; ++o) {
            auto term = [&](int64_t j) {
              return two_step ? (acc[j] * xsc) * mp_[j] : acc[j] * mp_[j];
            };
            float y = term(o);
            if (bp_ != nullptr) y += bp_[o];
            for (int64_t t = 1; t < terms_; ++t) y += term(t * O_ + o);
            if (codes_out_) {
              const float q =
                  two_step ? std::nearbyint(y * oinv + oz_) : std::nearbyint(y / os_) + oz_;
              ou_[pix * O_ + o] = static_cast<uint8_t>(std::min(std::max(q, flo_), fhi_));
            } else {
              of_[pix * O_ + o] = std::min(std::max(y, flo_), fhi_);
            }
          }
        }
    }
  });
  return out.permute({0, 3, 1, 2});
}

void register_smallconv(pybind11::module& m) {
  m.def("small_conv", &small_conv,
        "direct convolution of few input channels, fused input quantization and requantization");
}
