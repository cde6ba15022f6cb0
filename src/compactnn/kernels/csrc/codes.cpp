// Cheap ops of a deployed int8 graph on direct kernels (compactnn.deployment.runner):
//
// quantize_codes: float32 (N, C, H, W), any strides -> uint8 codes, channels-last, in one pass.
//   The PyTorch path (x.contiguous(channels_last), then divide, round, add, clamp, cast: six
//   ops) cost ~85 us for ResNet-18's 1x3x64x64 input, 5% of the deployed model. The float
//   operations are the simulation's: clamp(nearbyint(x / scale) + zero, lo, hi)
//   (round-half-even, division, not a multiplication by 1 / scale), so the codes are equal.
//
// gate_quantize: the tail of a squeeze-excitation block (MobileNetV3): Hardsigmoid of the
//   gate's (N, C, 1, 1) input, times x, then quantize_codes' rounding, in one pass instead of
//   three (Hardsigmoid, a broadcast multiply writing a float map, the quantization). PyTorch's
//   Hardsigmoid order min(max(g + 3, 0), 6) / 6 and one float multiply, so the same codes.
//
// dequantize_codes: uint8 codes (any strides) -> float32 (q - zero) * scale, channels-last, one
//   pass: the PyTorch path (q.float().sub_(zero).mul_(scale), three ops) cost ~58 us for
//   ResNet-18's last residual at 64x64 batch 1, a 512x2x2 map. Same float operations.
//
// maxpool_codes: max-pool of channels-last uint8 codes (max commutes with the monotone
//   quantizer, so pooling codes equals quantizing the pooled values). PyTorch's quantized
//   max-pool took ~85 us for ResNet-18's 64x32x32 map at batch 1. Padding is ignored (a
//   window's max over its in-bounds taps), as max_pool2d does; ceil_mode is not supported
//   (the caller keeps PyTorch's op then).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Work up to which the quantization and the max-pool run on the calling thread. Measured on 2
// threads (AMD Zen 4 VM) with the library's timing settings, OMP_WAIT_POLICY=PASSIVE and
// GOMP_SPINCOUNT=20000 (the threads spin ~0.5 ms after a parallel loop). Quantizing one
// 3x224x224 image: two threads 23 us, one 43 us (without the spin two threads took 56-59 us).
// ResNet-18's stem max-pool (64x112x112 codes): one thread 32 us, two 20-71 us (the second
// thread sometimes had gone to sleep); eight images: two threads 145-150 us.
constexpr int64_t kSerialValues = 64 * 1024;
constexpr int64_t kSerialPoolBytes = 2 * 1024 * 1024;

// 16 codes of 16 consecutive floats, each first multiplied by its gate when ``gate`` is given
// (the scalar loop's exact operations)
inline void quantize16(const float* src, const float* gate, float s, float z, float lo, float hi,
                       uint8_t* dst) {
#if defined(__AVX512F__)
  __m512 v = _mm512_loadu_ps(src);
  if (gate != nullptr) v = _mm512_mul_ps(v, _mm512_loadu_ps(gate));
  v = _mm512_div_ps(v, _mm512_set1_ps(s));
  v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, _mm512_set1_ps(z)), _mm512_set1_ps(lo)),
                    _mm512_set1_ps(hi));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(v)));
#else
  for (int i = 0; i < 16; ++i) {
    const float q = std::nearbyint((gate != nullptr ? src[i] * gate[i] : src[i]) / s) + z;
    dst[i] = static_cast<uint8_t>(std::min(std::max(q, lo), hi));
  }
#endif
}

inline uint8_t quantize1(float x, float s, float z, float lo, float hi) {
  const float q = std::nearbyint(x / s) + z;
  return static_cast<uint8_t>(std::min(std::max(q, lo), hi));
}

}  // namespace

namespace {

// x (N, C, H, W) float32 -> channels-last codes; ``gates`` (N * C floats) multiply x first
torch::Tensor quantize_impl(const torch::Tensor& x, const float* gates, double scale, int64_t zero,
                            int64_t lo, int64_t hi) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "x: (N, C, H, W) float32");
  TORCH_CHECK(scale > 0 && 0 <= lo && lo <= hi && hi <= 255,
              "grid: scale > 0, 0 <= lo <= hi <= 255");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto out = torch::empty({N, C, H, W}, torch::dtype(torch::kUInt8)
                                            .memory_format(at::MemoryFormat::ChannelsLast));
  const float* xp = x.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  const float fs = static_cast<float>(scale), fz = static_cast<float>(zero);
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  // rows of kSerialValues values or fewer in all run on the calling thread
  const int64_t grain = std::max<int64_t>(4, kSerialValues / std::max<int64_t>(1, W * C));
  at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
    // captures copied into locals (a uint8 store may alias them: see termconv.cpp)
    const int64_t C_ = C, H_ = H, W_ = W, s0_ = s0, s1_ = s1, s2_ = s2, s3_ = s3;
    const float s = fs, z = fz, l = flo, h = fhi;
    const float* const xp_ = xp;
    const float* const gates_ = gates;
    uint8_t* const op_ = op;
    alignas(64) uint8_t tmp[16];
    alignas(64) float gv[16];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / H_, y = r % H_;
      const float* row = xp_ + n * s0_ + y * s2_;
      const float* g = gates_ == nullptr ? nullptr : gates_ + n * C_;
      uint8_t* dst = op_ + r * W_ * C_;  // (n, y, 0, 0) of the channels-last output
      if (s1_ == 1) {  // channels innermost: vectors along C
        for (int64_t w = 0; w < W_; ++w) {
          const float* px = row + w * s3_;
          uint8_t* d = dst + w * C_;
          int64_t c = 0;
          for (; c + 16 <= C_; c += 16) quantize16(px + c, g ? g + c : nullptr, s, z, l, h, d + c);
          for (; c < C_; ++c) d[c] = quantize1(g ? px[c] * g[c] : px[c], s, z, l, h);
        }
      } else if (s3_ == 1) {  // rows contiguous (NCHW): vectors along W, bytes to stride C
#if defined(__AVX512VBMI__)
        if (C_ <= 4 && g == nullptr) {  // an image: 16 pixels' codes of every channel at once,
          // interleaved by one byte permutation and written as 16 * C consecutive bytes (byte
          // by byte this pass took 60 us for one 3x224x224 image)
          alignas(64) uint8_t idx[64];
          for (int k = 0; k < 64; ++k)
            idx[k] = static_cast<uint8_t>(k < 16 * C_ ? (k % C_) * 16 + k / C_ : 0);
          const __m512i perm = _mm512_load_si512(reinterpret_cast<const void*>(idx));
          const __mmask64 all =  // the 16 * C_ bytes of 16 pixels
              C_ == 4 ? ~__mmask64{0} : (__mmask64{1} << (16 * C_)) - 1;
          alignas(64) uint8_t lanes[64] = {};
          int64_t w = 0;
          for (; w + 16 <= W_; w += 16) {
            for (int64_t c = 0; c < C_; ++c) quantize16(row + c * s1_ + w, nullptr, s, z, l, h,
                                                        lanes + 16 * c);
            const __m512i v = _mm512_load_si512(reinterpret_cast<const void*>(lanes));
            _mm512_mask_storeu_epi8(dst + w * C_, all, _mm512_permutexvar_epi8(perm, v));
          }
          for (; w < W_; ++w)
            for (int64_t c = 0; c < C_; ++c)
              dst[w * C_ + c] = quantize1(row[c * s1_ + w], s, z, l, h);
          continue;
        }
#endif
        for (int64_t c = 0; c < C_; ++c) {
          const float* pc = row + c * s1_;
          if (g) std::fill(gv, gv + 16, g[c]);
          int64_t w = 0;
          for (; w + 16 <= W_; w += 16) {
            quantize16(pc + w, g ? gv : nullptr, s, z, l, h, tmp);
            for (int i = 0; i < 16; ++i) dst[(w + i) * C_ + c] = tmp[i];
          }
          for (; w < W_; ++w) dst[w * C_ + c] = quantize1(g ? pc[w] * g[c] : pc[w], s, z, l, h);
        }
      } else {
        for (int64_t w = 0; w < W_; ++w)
          for (int64_t c = 0; c < C_; ++c) {
            const float v = row[w * s3_ + c * s1_];
            dst[w * C_ + c] = quantize1(g ? v * g[c] : v, s, z, l, h);
          }
      }
    }
  });
  return out;
}

}  // namespace

torch::Tensor quantize_codes(torch::Tensor x, double scale, int64_t zero, int64_t lo, int64_t hi) {
  return quantize_impl(x, nullptr, scale, zero, lo, hi);
}

torch::Tensor gate_quantize(torch::Tensor x, torch::Tensor pre, double scale, int64_t zero,
                            int64_t lo, int64_t hi) {
  TORCH_CHECK(x.dim() == 4 && pre.dim() == 4 && pre.scalar_type() == torch::kFloat32 &&
                  pre.size(0) == x.size(0) && pre.size(1) == x.size(1) && pre.size(2) == 1 &&
                  pre.size(3) == 1,
              "gate_quantize: x (N, C, H, W) float32 and its gate's input (N, C, 1, 1) float32");
  // PyTorch's Hardsigmoid, min(max(g + 3, 0), 6) / 6, per (n, c); then x * gate in the pass
  const int64_t N = x.size(0), C = x.size(1);
  std::vector<float> gates(N * C);
  const float* pp = pre.data_ptr<float>();
  const int64_t p0 = pre.stride(0), p1 = pre.stride(1);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      gates[n * C + c] = std::min(std::max(pp[n * p0 + c * p1] + 3.0f, 0.0f), 6.0f) / 6.0f;
  return quantize_impl(x, gates.data(), scale, zero, lo, hi);
}

torch::Tensor dequantize_codes(torch::Tensor q, double scale, int64_t zero) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kUInt8, "q: (N, C, H, W) uint8 codes");
  const int64_t N = q.size(0), C = q.size(1), H = q.size(2), W = q.size(3);
  auto out = torch::empty({N, C, H, W}, torch::dtype(torch::kFloat32)
                                            .memory_format(at::MemoryFormat::ChannelsLast));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t s0 = q.stride(0), s1 = q.stride(1), s2 = q.stride(2), s3 = q.stride(3);
  const float fs = static_cast<float>(scale), fz = static_cast<float>(zero);
  at::parallel_for(0, N * H, 16, [&](int64_t begin, int64_t end) {
    const int64_t C_ = C, H_ = H, W_ = W, s0_ = s0, s1_ = s1, s2_ = s2, s3_ = s3;
    const float s = fs, z = fz;
    const uint8_t* const qp_ = qp;
    float* const op_ = op;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / H_, y = r % H_;
      const uint8_t* row = qp_ + n * s0_ + y * s2_;
      float* dst = op_ + r * W_ * C_;
      for (int64_t w = 0; w < W_; ++w)
        for (int64_t c = 0; c < C_; ++c)
          dst[w * C_ + c] = (static_cast<float>(row[w * s3_ + c * s1_]) - z) * s;
    }
  });
  return out;
}

torch::Tensor maxpool_codes(torch::Tensor q, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                            int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kUInt8 &&
                  q.is_contiguous(at::MemoryFormat::ChannelsLast),
              "q: (N, C, H, W) uint8 channels-last");
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && dh > 0 && dw > 0 && ph >= 0 && pw >= 0 &&
                  2 * ph <= kh && 2 * pw <= kw,
              "pool geometry: positive sizes, padding at most half the kernel");
  const int64_t N = q.size(0), C = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "the pool window does not fit the padded input");
  auto out = torch::empty({N, C, OH, OW}, torch::dtype(torch::kUInt8)
                                              .memory_format(at::MemoryFormat::ChannelsLast));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  // an output row reads about sh input rows: calls of up to kSerialPoolBytes input bytes run
  // on the calling thread
  const int64_t grain = std::max<int64_t>(4, kSerialPoolBytes / std::max<int64_t>(1, sh * W * C));
  at::parallel_for(0, N * OH, grain, [&](int64_t begin, int64_t end) {
    const int64_t C_ = C, H_ = H, W_ = W, OH_ = OH, OW_ = OW, kh_ = kh, kw_ = kw;
    const int64_t sh_ = sh, sw_ = sw, ph_ = ph, pw_ = pw, dh_ = dh, dw_ = dw;
    const uint8_t* const qp_ = qp;
    uint8_t* const op_ = op;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / OH_, oy = r % OH_;
      for (int64_t ox = 0; ox < OW_; ++ox) {
        uint8_t* d = op_ + (r * OW_ + ox) * C_;
        auto each_tap = [&](auto&& visit) {  // the window's taps inside the input, in order
          for (int64_t i = 0; i < kh_; ++i) {
            const int64_t iy = oy * sh_ - ph_ + i * dh_;
            if (iy < 0 || iy >= H_) continue;
            for (int64_t j = 0; j < kw_; ++j) {
              const int64_t ix = ox * sw_ - pw_ + j * dw_;
              if (ix >= 0 && ix < W_) visit(qp_ + ((n * H_ + iy) * W_ + ix) * C_);
            }
          }
        };
        // codes are >= 0 and every window has a tap inside the input, so the maxima start at 0
#if defined(__AVX512BW__)
        // 64 channels per register, the window's maximum kept in it across the taps (a byte
        // loop loading and storing the output once per tap took 56 us on ResNet-18's stem
        // pool at batch 1)
        for (int64_t c = 0; c < C_; c += 64) {
          const __mmask64 m = C_ - c >= 64 ? ~__mmask64{0} : (__mmask64{1} << (C_ - c)) - 1;
          __m512i best = _mm512_setzero_si512();
          each_tap([&](const uint8_t* px) {
            best = _mm512_max_epu8(best, _mm512_maskz_loadu_epi8(m, px + c));
          });
          _mm512_mask_storeu_epi8(d + c, m, best);
        }
#else
        std::fill(d, d + C_, uint8_t{0});
        each_tap([&](const uint8_t* px) {
          for (int64_t c = 0; c < C_; ++c) d[c] = std::max(d[c], px[c]);
        });
#endif
      }
    }
  });
  return out;
}

void register_codes(pybind11::module& m) {
  m.def("quantize_codes", &quantize_codes,
        "float32 (any strides) -> channels-last uint8 codes, the simulation's rounding, one pass");
  m.def("gate_quantize", &gate_quantize,
        "Hardsigmoid(pre) * x, quantized like quantize_codes, one pass (a squeeze-excitation tail)");
  m.def("dequantize_codes", &dequantize_codes, "uint8 codes -> channels-last float32, one pass");
  m.def("maxpool_codes", &maxpool_codes, "max-pool of channels-last uint8 codes");
}
