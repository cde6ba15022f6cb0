// Shared between termconv.cpp (which defines them) and squeeze.cpp (which chains them).
#pragma once

#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#define COMPACTNN_VNNI 1
#else
#define COMPACTNN_VNNI 0
#endif

// Shared with pointwise.cpp: the weight's column blocks and the threads' grain.
constexpr int64_t kBlock = 128;  // columns per weight block (8 vectors: the widest register tile)
// Work (multiply-accumulates) below which the dot loop runs on the calling thread: waking the
// second thread costs more than it saves (measured at batch 1 on 2 threads: 0.1-0.3 M-MAC
// calls took 9-10 us on two threads, 6 us on one). The padding copy stays parallel: run on one
// thread it let the idle OpenMP thread fall asleep before the next parallel loop, which then
// paid the wake-up (mnist-cnn batch 16: 0.48 -> 0.70 ms for the whole model).
constexpr int64_t kParallelWork = 512 * 1024;

// A grain for at::parallel_for: items of ``per_item`` work each run in one chunk until the
// total reaches kParallelWork.
inline int64_t grain_for(int64_t per_item) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, per_item));
}

// Above kBlock columns the weight is cut into ceil(TOp / kBlock) blocks of nearly equal width
// (multiples of 16 that differ by at most 16): 144 columns are 80 + 64, 192 are 96 + 96. The
// blocks are the threads' work items, so equal blocks keep both threads busy: with blocks of
// 128 and a last one of what is left (128 + 16 for 144) one thread did 8/9 of the work, and
// rounding TOp up to a multiple of 128 computed 256 columns for 144.
inline int64_t block_count(int64_t TOp) { return (TOp + kBlock - 1) / kBlock; }

// First column of block b
inline int64_t block_start(int64_t TOp, int64_t b) {
  const int64_t nv = TOp / 16, nb = block_count(TOp), base = nv / nb, extra = nv % nb;
  return 16 * (b * base + std::min(b, extra));
}

// Columns of block b (all TOp columns for a single block)
inline int64_t block_width(int64_t TOp, int64_t b = 0) {
  return block_start(TOp, b + 1) - block_start(TOp, b);
}

#if COMPACTNN_VNNI
// a[p][v] += the int32 dots of P pixels (pixel p's 4 * K4 input bytes at s + p * pstep) with NV
// vectors of 16 columns (channel group c4's weights at w + c4 * wstride, (16, 4) int8 each): per
// group, NV weight loads, then per pixel one broadcast of its 4 bytes and NV vpdpbusd. The inner
// loop of term_conv's window (one call per tap) and of pointwise.cpp's 1x1 tiles.
template <int NV, int P>
__attribute__((always_inline)) inline void vnni_dots(__m512i (&a)[P][NV], const uint8_t* s,
                                                     int64_t pstep, const int8_t* w,
                                                     int64_t wstride, int64_t K4) {
  for (int64_t c4 = 0; c4 < K4; ++c4) {
    __m512i wv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      wv[v] = _mm512_loadu_si512(reinterpret_cast<const void*>(w + c4 * wstride + v * 64));
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {
      int32_t word;
      std::memcpy(&word, s + p * pstep + c4 * 4, 4);
      const __m512i x = _mm512_set1_epi32(word);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) a[p][v] = _mm512_dpbusd_epi32(a[p][v], x, wv[v]);
    }
  }
}
#endif

// The 1x1 fast path of term_conv_impl (pointwise.cpp): a dense channels-last (M, 4 * K4) uint8
// input times the packed (K4, TOp, 4) weight (blocks of at most kBlock columns), requantized in
// registers in oneDNN's order. accum: optional (M, O) uint8 residual codes. out: (M, O) codes.
struct PointwiseArgs {
  const uint8_t* x;
  int64_t M, K4, TOp, O;
  const int8_t* w;
  const int32_t* corr;        // (TOp) z * sum(w)
  const float* mult;          // (TOp) weight scales, zero-padded
  const float* bias;          // (TOp) zero-padded (zeros for a layer without one)
  float x_scale, inv, zo, lo, hi;
  const uint8_t* accum;       // or nullptr
  float accum_scale, accum_zero;
  uint8_t* out;
};
void pointwise_conv(const PointwiseArgs& a);

// Pixels [p0, p1) of pointwise_conv ``a`` on the calling thread, the 16 codes of columns o..
// of pixel p stored at a.out + (p - p0) * ps + (o / 16) * bs: (ps, bs) = (O, 16) is the
// (M, O) output from a.out (pixel p0's row), (16, block bytes) a depthwise ring's (block,
// pixel, 16) row (dwconv.h). The residual (a.accum) is read at a.accum + p * O. The same tiles
// and epilogue as pointwise_conv, so equal codes.
void pointwise_tiles(const PointwiseArgs& a, int64_t p0, int64_t p1, int64_t ps, int64_t bs);

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

  bool pointwise(const torch::Tensor& x) const;  // whether x takes pointwise.cpp's path
  // whether an input of C channels in dense channels-last memory takes that path
  bool pointwise_fits(int64_t C) const;
  // pointwise_conv's arguments for M pixels of C channels at x (pointwise_fits(C) holds),
  // without a residual and with out = nullptr; mpad, bpad receive the scales and bias padded
  // to the packed columns
  PointwiseArgs pointwise_args(const uint8_t* x, int64_t M, int64_t C, std::vector<float>& mpad,
                               std::vector<float>& bpad) const;
  torch::Tensor run(const torch::Tensor& x, const c10::optional<torch::Tensor>& accum,
                    double accum_scale, int64_t accum_zero) const {
    return term_conv_impl(x, in_zero, packed, corr, mult, bias, 1, kh, kw, stride, padding,
                          dilation, out_scale, out_zero, lo, hi, x_scale, true, hswish, accum,
                          accum_scale, accum_zero);
  }
};

