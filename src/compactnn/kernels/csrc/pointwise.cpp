// The 1x1 fast path of term_conv (termconv.cpp): a stride-1, unpadded 1x1 convolution of a dense
// channels-last input is a matrix product (pixels x channels) x (channels x outputs), and with
// few input channels (MobileNetV2's expansions read 16-160) the requantization of its outputs,
// not the dots, decides the time: the general path stores each row's int32 dots and reads them
// back to requantize them. Here a tile of P pixels x NV vectors of 16 columns stays in
// registers from the first dot to the uint8 store:
//
//   acc  = -z * sum(w)  (the zero-point correction as the dot's start; the same int32)
//   acc += q . w        (vpdpbusd: 4 uint8 x int8 products per 32-bit lane)
//   y    = ((float(acc) * x_scale) * w_scale[o]) + bias[o]   [fma(r - za, sa, y): a residual]
//   code = max(cvt(min(y * (1 / s) + zo, hi)), lo)
//
// The float operations and their order are the general path's (oneDNN's), so the codes are
// equal: cvt rounds to nearest even like nearbyint, and clamping to the integers lo / hi
// commutes with that rounding (-ffp-contract=off keeps the multiply and add apart).
#include "termconv.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

namespace {

constexpr int64_t kChunk = 120;  // pixels per work item at most

#if COMPACTNN_VNNI
struct Epilogue {
  const float* mult;
  const float* bias;
  const uint8_t* accum;
  uint8_t* out;
  int64_t O;
  __m512 xs, inv, zo, hi, sa, za;
  __m512i lo;
  // where 16 codes of columns o.. of pixel pix go: out + (pix - base) * ps + (o / 16) * bs;
  // (0, O, 16) for the (M, O) output, (row's first pixel, 16, block bytes) for a depthwise ring
  int64_t base, ps, bs;
};

// Requantize 16 columns (o, a multiple of 16; the last vector may be partial) of pixel ``pix``.
// bias: zeros when the layer has none (y + 0 rounds to the same code). A full vector is narrowed
// in a register and stored plainly: the fused form (vpmovusdb to memory) is slow on AMD Zen 4.
template <bool ACC>
inline void finish(const Epilogue& e, __m512i acc, int64_t pix, int64_t o) {
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), e.xs), _mm512_loadu_ps(e.mult + o));
  y = _mm512_add_ps(y, _mm512_loadu_ps(e.bias + o));
  const int64_t left = e.O - o;
  const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << left) - 1);
  if (ACC) {
    const __m128i r8 = _mm_maskz_loadu_epi8(mask, e.accum + pix * e.O + o);
    const __m512 r = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(r8));
    y = _mm512_fmadd_ps(_mm512_sub_ps(r, e.za), e.sa, y);
  }
  y = _mm512_min_ps(_mm512_add_ps(_mm512_mul_ps(y, e.inv), e.zo), e.hi);
  __m128i b = _mm512_cvtusepi32_epi8(_mm512_max_epi32(_mm512_cvtps_epi32(y), e.lo));
  uint8_t* const dst = e.out + (pix - e.base) * e.ps + (o >> 4) * e.bs;
  if (left >= 16) {
    __asm__("" : "+v"(b));  // keep the narrowing in a register
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), b);
  } else {
    _mm_mask_storeu_epi8(dst, mask, b);
  }
}

// P pixels from ``pix`` x NV vectors from column o0: x rows of 4 * K4 bytes; w the first of the
// NV vectors in a block's (K4, block width, 4) weight, rows ``wstride`` bytes apart
// (e by value: through a reference, every uint8 store may alias its fields, which the compiler
// then reloads after each store)
template <int NV, int P, bool ACC>
inline void tile(const uint8_t* x, int64_t K4, const int8_t* w, int64_t wstride,
                 const __m512i* start, const Epilogue e, int64_t pix, int64_t o0) {
  __m512i a[P][NV];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) a[p][v] = start[v];
  const int64_t row = 4 * K4;
  vnni_dots<NV, P>(a, x + pix * row, row, w, wstride, K4);
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      if (o0 + v * 16 < e.O) finish<ACC>(e, a[p][v], pix + p, o0 + v * 16);
}

// pixels [p0, p1) of NV vectors from column o0
template <int NV, bool ACC>
void block_rows(const uint8_t* x, int64_t K4, const int8_t* w, int64_t wstride,
                const int32_t* corr, const Epilogue e, int64_t p0, int64_t p1, int64_t o0) {
  // P * NV accumulators, NV weights and a broadcast in the 32 vector registers (wider tiles
  // spilled: 160 -> 960 columns at 7x7 ran 4x slower than oneDNN in tiles of 8 vectors)
  static_assert(NV >= 1 && NV <= 6, "at most 6 vectors per tile");
  constexpr int P = NV <= 3 ? 8 : (NV == 4 ? 6 : (NV == 5 ? 5 : 4));
  __m512i start[NV];
  for (int v = 0; v < NV; ++v)
    start[v] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(corr + o0 + v * 16));
  int64_t p = p0;
  for (; p + P <= p1; p += P) tile<NV, P, ACC>(x, K4, w, wstride, start, e, p, o0);
  for (; p < p1; ++p) tile<NV, 1, ACC>(x, K4, w, wstride, start, e, p, o0);
}

// pixels [p0, p1) of a block of nvb vectors from column o0 (w: its (K4, nvb * 16, 4) weight),
// in tiles of at most 6 vectors (7 = 4 + 3, 8 = 4 + 4)
template <bool ACC>
void block_any(int64_t nvb, const uint8_t* x, int64_t K4, const int8_t* w, const int32_t* corr,
               const Epilogue& e, int64_t p0, int64_t p1, int64_t o0) {
  const int64_t wstride = nvb * 64;
  for (int64_t v0 = 0; v0 < nvb;) {
    const int64_t nv = nvb <= 6 ? nvb : std::min<int64_t>(4, nvb - v0);
    const int8_t* wv = w + v0 * 64;
    const int64_t o = o0 + v0 * 16;
    switch (nv) {
      case 1: block_rows<1, ACC>(x, K4, wv, wstride, corr, e, p0, p1, o); break;
      case 2: block_rows<2, ACC>(x, K4, wv, wstride, corr, e, p0, p1, o); break;
      case 3: block_rows<3, ACC>(x, K4, wv, wstride, corr, e, p0, p1, o); break;
      case 4: block_rows<4, ACC>(x, K4, wv, wstride, corr, e, p0, p1, o); break;
      case 5: block_rows<5, ACC>(x, K4, wv, wstride, corr, e, p0, p1, o); break;
      default: block_rows<6, ACC>(x, K4, wv, wstride, corr, e, p0, p1, o); break;
    }
    v0 += nv;
  }
}

Epilogue epilogue(const PointwiseArgs& a, int64_t base, int64_t ps, int64_t bs) {
  return {a.mult, a.bias, a.accum, a.out, a.O,
          _mm512_set1_ps(a.x_scale), _mm512_set1_ps(a.inv), _mm512_set1_ps(a.zo),
          _mm512_set1_ps(a.hi), _mm512_set1_ps(a.accum_scale),
          _mm512_set1_ps(a.accum_zero), _mm512_set1_epi32(static_cast<int32_t>(a.lo)),
          base, ps, bs};
}
#endif

}  // namespace

void pointwise_tiles(const PointwiseArgs& a, int64_t p0, int64_t p1, int64_t ps, int64_t bs) {
#if COMPACTNN_VNNI
  const Epilogue e = epilogue(a, p0, ps, bs);
  const int64_t column_bytes = a.K4 * 4;
  for (int64_t b = 0, blocks = block_count(a.TOp); b < blocks; ++b) {
    const int64_t o0 = block_start(a.TOp, b), nv = block_width(a.TOp, b) / 16;
    if (a.accum != nullptr) {
      block_any<true>(nv, a.x, a.K4, a.w + o0 * column_bytes, a.corr, e, p0, p1, o0);
    } else {
      block_any<false>(nv, a.x, a.K4, a.w + o0 * column_bytes, a.corr, e, p0, p1, o0);
    }
  }
#else
  TORCH_CHECK(false, "pointwise_tiles needs an AVX-512 VNNI build");
#endif
}

void pointwise_conv(const PointwiseArgs& a) {
#if COMPACTNN_VNNI
  const Epilogue e = epilogue(a, 0, a.O, 16);
  // pixel chunks of at most kChunk and of nearly equal size (196 pixels: 98 + 98, not 120 + 76,
  // which left one thread waiting at batch 1)
  const int64_t blocks = block_count(a.TOp), chunks = (a.M + kChunk - 1) / kChunk;
  const int64_t chunk = (a.M + chunks - 1) / chunks;
  const int64_t column_bytes = a.K4 * 4;
  const int64_t grain = grain_for(chunk * block_width(a.TOp) * a.K4 * 4);
  const uint8_t* x = a.x;
  const int8_t* w = a.w;
  const int32_t* corr = a.corr;
  const int64_t M = a.M, K4 = a.K4, TOp = a.TOp;
  // chunks outermost: each thread's half of the items holds every block alike (blocks
  // outermost gave one thread the 80-column block of 144 outputs and the other the 64-column
  // one). With one chunk (a small map at batch 1) the items are the blocks, as in
  // term_conv_impl, so the threads still share a large weight instead of each reading all of it
  at::parallel_for(0, blocks * chunks, grain, [=, &e](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i / blocks, b = i % blocks;
      const int64_t o0 = block_start(TOp, b), nv = block_width(TOp, b) / 16;
      const int64_t p0 = c * chunk, p1 = std::min(M, p0 + chunk);
      if (e.accum != nullptr) {
        block_any<true>(nv, x, K4, w + o0 * column_bytes, corr, e, p0, p1, o0);
      } else {
        block_any<false>(nv, x, K4, w + o0 * column_bytes, corr, e, p0, p1, o0);
      }
    }
  });
#else
  TORCH_CHECK(false, "pointwise_conv needs an AVX-512 VNNI build");
#endif
}
