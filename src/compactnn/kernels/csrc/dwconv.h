// Shared by the depthwise kernel's two forms (dwconv.cpp: the float form, dispatch and
// bindings; dwconv_int.cpp: the integer form): the output side, the integer weights.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// Work (multiply-accumulates, or values converted) below which a loop runs on the calling
// thread: at batch 1 on 2 threads MobileNetV3-Small's depthwise layers at 64x64 took 19-27 us
// on two threads, 6-9 us on one (waking the second thread costs more than it saves).
inline constexpr int64_t kDwParallelWork = 128 * 1024;

inline int64_t dw_grain_for(int64_t per_item) {
  return std::max<int64_t>(1, kDwParallelWork / std::max<int64_t>(1, per_item));
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define COMPACTNN_DW512 1
#else
#define COMPACTNN_DW512 0
#endif

// The integer form (below) needs VNNI's byte dots and VBMI's byte permutation
#if COMPACTNN_DW512 && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define COMPACTNN_DWVNNI 1
#else
#define COMPACTNN_DWVNNI 0
#endif

#if COMPACTNN_DW512
// The output side of both forms, for 16 channels of one pixel
struct DwOut {
  __m512 vxs, vinv, vzo, vlo, vhi, vs;
  bool hswish, codes_out;
  uint8_t* ou;
  float* of;
};

// e with its codes written from ``ou``
inline DwOut dw_out_at(DwOut e, uint8_t* ou) {
  e.ou = ou;
  return e;
}

// 16 codes (float values already rounded and clamped to [0, 255]) to memory. A full vector is
// narrowed in a register and stored plainly: the compiler's fused form (vpmovusdb to memory)
// is several times slower on AMD Zen 4.
inline void dw_store_codes(uint8_t* dst, __mmask16 m, __m512 y) {
  __m128i b = _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(y));
  if (m == 0xFFFF) {
    __asm__("" : "+v"(b));  // keep the narrowing in a register
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), b);
  } else {
    _mm_mask_storeu_epi8(dst, m, b);
  }
}

// y = (acc * x_scale) * w_scale + bias, then Hardswish, codes or floats, stored at ``at``
inline void dw_store(__m512 acc, int64_t at, __mmask16 m, __m512 wsv, __m512 bv,
                     const DwOut& e) {
  __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(acc, e.vxs), wsv), bv);
  if (e.hswish) {
    const __m512 t = _mm512_min_ps(
        _mm512_max_ps(_mm512_add_ps(y, _mm512_set1_ps(3.0f)), _mm512_setzero_ps()),
        _mm512_set1_ps(6.0f));
    y = _mm512_div_ps(_mm512_mul_ps(y, t), _mm512_set1_ps(6.0f));
  }
  if (e.codes_out && e.hswish) {
    y = _mm512_roundscale_ps(_mm512_div_ps(y, e.vs),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    y = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(y, e.vzo), e.vlo), e.vhi);
    dw_store_codes(e.ou + at, m, y);
  } else if (e.codes_out) {
    y = _mm512_roundscale_ps(_mm512_add_ps(_mm512_mul_ps(y, e.vinv), e.vzo),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    y = _mm512_min_ps(_mm512_max_ps(y, e.vlo), e.vhi);
    dw_store_codes(e.ou + at, m, y);
  } else {
    _mm512_mask_storeu_ps(e.of + at, m, _mm512_min_ps(_mm512_max_ps(y, e.vlo), e.vhi));
  }
}
#endif

// The integer form's largest window (rows x taps per row) and its groups of 4 taps in registers
constexpr int64_t kMaxRows = 7, kMaxCols = 8;
constexpr int64_t kMaxTapGroups = kMaxRows * ((kMaxCols + 3) / 4);

// Whether a window runs on the integer form: a VNNI + VBMI build, taps adjacent along the row
// (no dilation there), at most 7 rows of 8
bool dw_integer_form(int64_t kh, int64_t kw, int64_t dilation_w);

// Weights for the integer form: taps along a kernel row in groups of 4, one 32-bit word of
// 4 int8 taps per channel: (KH * G, Cp, 4) int8 with G = ceil(KW / 4), zeros past KW and past
// C; and z * sum of each channel's taps (Cp) int32, the zero point's share of the dot.
struct DwPacked {
  torch::Tensor w;     // (KH * G, Cp * 4) int8
  torch::Tensor corr;  // (Cp) int32
};

// w: (KH * KW, Cp) float32 integer codes, as dw_conv takes them
DwPacked dw_pack(const torch::Tensor& w, int64_t kh, int64_t kw, int64_t in_zero);

// Where the integer form's input rows come from when not from a tensor: fill(ctx, n, h, dst,
// block_bytes) writes input row h of image n into a ring row in its (block, pixel, 16) layout,
// the 16 channels of block cb and pixel v at dst + cb * block_bytes + v * 16 (dst is past the
// left padding, which the kernel fills). Called on the thread whose output rows read it.
struct DwRowSource {
  void (*fill)(const void* ctx, int64_t n, int64_t h, uint8_t* dst, int64_t block_bytes);
  const void* ctx;
  int64_t row_work;  // the source's work per input row (multiply-accumulates), for the grain
};

// Where the integer form's output rows go when not to its output tensor (codes out only):
// consume(ctx, n, oh, row) takes output row oh of image n, (OW, C) codes, on the thread that
// computed it; the buffer is reused for the thread's next row.
struct DwRowSink {
  void (*consume)(const void* ctx, int64_t n, int64_t oh, const uint8_t* row);
  const void* ctx;
  int64_t row_work;  // the sink's work per output row (multiply-accumulates), for the grain
};

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
  DwPacked packed;  // the integer form's weights, packed once

  torch::Tensor run(const torch::Tensor& x) const;
  // Whether run_from can take this plan: the integer form
  bool from_rows() const { return dw_integer_form(kh, kw, dilation[1]); }
  // The integer form (from_rows() holds) on an (N, C, H, W) input: x, or (x undefined) the
  // rows ``src`` writes; its output rows to ``sink`` (then the result is undefined) or to
  // the returned tensor
  torch::Tensor run_from(const torch::Tensor& x, int64_t N, int64_t C, int64_t H, int64_t W,
                         const DwRowSource* src, const DwRowSink* sink) const;
};

#if COMPACTNN_DWVNNI
// The integer form's arguments, passed by value: a uint8 store may alias anything, so values
// reached through a reference or a lambda's captures are reloaded after every store.
struct DwVnni {
  const uint8_t* xp;
  int64_t xs0, xs1, xs2, xs3, N, C, H, W, Cp, kh, kw, sh, sw, ph, pw, dh, OH, OW;
  uint8_t z;
  const int8_t* wq;
  const int32_t* corr;
  const float *wsp, *bp;
  DwOut epi;
  const DwRowSource* src;  // nullptr: the rows come from xp
  const DwRowSink* sink;   // nullptr: the rows go to epi
};

// The integer form over every output row (dwconv_int.cpp)
void dw_conv_vnni(const DwVnni& args);
#endif
