// The integer form of the depthwise kernel (see dwconv.cpp): windows of up to 7 x 8 taps
// without width dilation, on a VNNI + VBMI build. Outputs equal the float form's and oneDNN's.
#include "dwconv.h"

#include <cstring>
#include <vector>

bool dw_integer_form(int64_t kh, int64_t kw, int64_t dilation_w) {
  return COMPACTNN_DWVNNI && dilation_w == 1 && kh >= 1 && kh <= kMaxRows && kw >= 1 &&
         kw <= kMaxCols;
}

DwPacked dw_pack(const torch::Tensor& w, int64_t kh, int64_t kw, int64_t in_zero) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == kh * kw && w.scalar_type() == torch::kFloat32 &&
                  w.is_contiguous(),
              "w: (KH * KW, C padded to 16) float32");
  const int64_t Cp = w.size(1), G = (kw + 3) / 4;
  auto wq = torch::zeros({kh * G, Cp * 4}, torch::kInt8);
  auto corr = torch::zeros({Cp}, torch::kInt32);
  const float* wp = w.data_ptr<float>();
  int8_t* q = wq.data_ptr<int8_t>();
  int32_t* cp = corr.data_ptr<int32_t>();
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j)
      for (int64_t c = 0; c < Cp; ++c) {
        const int v = static_cast<int>(wp[(i * kw + j) * Cp + c]);  // int8 codes held as floats
        q[(i * G + j / 4) * Cp * 4 + c * 4 + j % 4] = static_cast<int8_t>(v);
        cp[c] += v * static_cast<int32_t>(in_zero);
      }
  return {wq, corr};
}

#if COMPACTNN_DWVNNI
// Blocks of 8 output pixels (8 independent dot chains hide vpdpbusd's latency) of a KH x
// (4 * G) window with the taps unrolled; returns the first pixel left for the caller's loop.
template <int KH, int G, class Finish, class Taps>
inline int64_t dw_dots(const uint8_t* const* base, const __m512i* wv, int64_t pstep, int64_t OW,
                       Finish& finish, Taps& taps) {
  constexpr int P = 8;
  __m512i w[KH * G];
#pragma GCC unroll 16
  for (int k = 0; k < KH * G; ++k) w[k] = wv[k];
  int64_t ow = 0;
  for (; ow + P <= OW; ow += P) {
    __m512i a[P];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) a[p] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int i = 0; i < KH; ++i)
#pragma GCC unroll 2
      for (int g = 0; g < G; ++g) {
        const uint8_t* t = base[i] + ow * pstep + g * 64;
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p)
          a[p] = _mm512_dpbusd_epi32(a[p], taps(t + p * pstep), w[i * G + g]);
      }
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) finish(a[p], ow + p);
  }
  return ow;
}

// The integer form. A task is one output row of one image, all channels; consecutive rows of a
// thread's range share a ring of input rows held as uint8 codes in blocks of 16 channels
// (block, pixel, 16), the zero point in the padding and 4 spare pixels at the end of each
// block so every 64-byte load stays inside. For 16 channels of one output pixel and 4 taps of
// a kernel row, one 64-byte load holds the 4 input pixels, one byte permutation (VBMI) turns
// it into 16 words of those 4 taps and one vpdpbusd adds their 4 products per channel: a 3x3
// window is 3 dots per 16 outputs. The dot is exact, so acc - z * sum(w) is the integer sum of
// (q - z) * w that the float form (and oneDNN) computes; the same epilogue follows. Each input
// row is read once, whole, and each output row is written whole (the float form walks an
// image once per block of 16 channels: at batch 8 it ran at ~25 cycles per 16 outputs).
// Output rows [begin, end) (image-major) of the integer form
static void dw_vnni_rows(int64_t begin, int64_t end, const DwVnni args) {
  const uint8_t* const xp = args.xp;
  const int64_t xs0 = args.xs0, xs1 = args.xs1, xs2 = args.xs2, xs3 = args.xs3;
  const int64_t C = args.C, H = args.H, W = args.W, Cp = args.Cp, kh = args.kh, kw = args.kw;
  const int64_t sh = args.sh, sw = args.sw, ph = args.ph, pw = args.pw, dh = args.dh;
  const int64_t OH = args.OH, OW = args.OW;
  const uint8_t z = args.z;
  const int8_t* const wq = args.wq;
  const int32_t* const corr = args.corr;
  const float* const wsp = args.wsp;
  const float* const bp = args.bp;
  const DwOut epi = args.epi;
  const int64_t G = (kw + 3) / 4, KG = kh * G, CB = Cp / 16, span = (kh - 1) * dh + 1;
  const int64_t Wp = W + 2 * pw, block_bytes = (Wp + 4) * 16, row_bytes = CB * block_bytes;
  alignas(64) uint8_t idx_bytes[64];  // word c of the result: byte c of pixels 0, 1, 2, 3
  for (int t = 0; t < 4; ++t)
    for (int c = 0; c < 16; ++c) idx_bytes[4 * c + t] = static_cast<uint8_t>(16 * t + c);
  const __m512i idx = _mm512_load_si512(reinterpret_cast<const void*>(idx_bytes));
  std::vector<uint8_t> ring(span * row_bytes);
  std::vector<int64_t> tag(span, -1);  // n * (H + 2 * ph) + padded row held in each slot
  const DwRowSink* const sink = args.sink;
  std::vector<uint8_t> row(sink != nullptr ? OW * C : 0);
  const uint8_t* rows[kMaxRows] = {};
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / OH, oh = r % OH;
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t hp = oh * sh + i * dh, slot = hp % span, h = hp - ph;
      uint8_t* buf = ring.data() + slot * row_bytes;
      rows[i] = buf;
      const int64_t key = n * (H + 2 * ph) + hp;
      if (tag[slot] == key) continue;
      tag[slot] = key;
      if (h < 0 || h >= H) {
        std::memset(buf, z, row_bytes);
        continue;
      }
      const uint8_t* xr = xp + n * xs0 + h * xs2;
      for (int64_t cb = 0; cb < CB; ++cb) {
        uint8_t* blk = buf + cb * block_bytes;
        std::memset(blk, z, pw * 16);
        std::memset(blk + (pw + W) * 16, z, block_bytes - (pw + W) * 16);
      }
      uint8_t* dst = buf + pw * 16;
      if (args.src != nullptr) {
        args.src->fill(args.src->ctx, n, h, dst, block_bytes);
      } else if (xs1 == 1) {  // channels-last: the row is read in order, each pixel whole
        const int64_t tail = C - (CB - 1) * 16;
        const __mmask16 mt = tail == 16 ? 0xFFFF : static_cast<__mmask16>((1u << tail) - 1);
        for (int64_t v = 0; v < W; ++v) {
          const uint8_t* px = xr + v * xs3;
          for (int64_t cb = 0; cb + 1 < CB; ++cb)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + cb * block_bytes + v * 16),
                             _mm_loadu_si128(reinterpret_cast<const __m128i*>(px + cb * 16)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (CB - 1) * block_bytes + v * 16),
                           _mm_maskz_loadu_epi8(mt, px + (CB - 1) * 16));
        }
      } else {
        for (int64_t cb = 0; cb < CB; ++cb)
          for (int64_t v = 0; v < W; ++v)
            for (int64_t k = 0; k < 16; ++k) {
              const int64_t c = cb * 16 + k;
              dst[cb * block_bytes + v * 16 + k] = c < C ? xr[v * xs3 + c * xs1] : 0;
            }
      }
    }
    const int64_t pix0 = (n * OH + oh) * OW, pstep = sw * 16;
    // with a sink the row's codes go to ``row`` (pixel ow at ow * C), then to the sink
    const DwOut e = sink != nullptr ? dw_out_at(epi, row.data()) : epi;
    const int64_t at0 = sink != nullptr ? 0 : pix0;
    for (int64_t cb = 0; cb < CB; ++cb) {
      const int64_t c = cb * 16, cn = std::min<int64_t>(16, C - c);
      const __mmask16 m = cn == 16 ? 0xFFFF : static_cast<__mmask16>((1u << cn) - 1);
      __m512i wv[kMaxTapGroups];
      for (int64_t k = 0; k < KG; ++k)
        wv[k] = _mm512_loadu_si512(reinterpret_cast<const void*>(wq + (k * Cp + c) * 4));
      const __m512i cv = _mm512_loadu_si512(reinterpret_cast<const void*>(corr + c));
      const __m512 wsv = _mm512_loadu_ps(wsp + c), bv = _mm512_loadu_ps(bp + c);
      auto finish = [&](__m512i acc, int64_t ow) {
        const __m512 a = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, cv));  // exact: < 2^24
        dw_store(a, (at0 + ow) * C + c, m, wsv, bv, e);
      };
      auto taps = [&](const uint8_t* src) {  // 4 taps of 16 channels as words
        return _mm512_permutexvar_epi8(
            idx, _mm512_loadu_si512(reinterpret_cast<const void*>(src)));
      };
      const uint8_t* base[kMaxRows];  // this block's part of each ring row
      for (int64_t i = 0; i < kh; ++i) base[i] = rows[i] + cb * block_bytes;
      int64_t ow = 0;
      if (kh == 3 && G == 1) {
        ow = dw_dots<3, 1>(base, wv, pstep, OW, finish, taps);
      } else if (kh == 5 && G == 2) {
        ow = dw_dots<5, 2>(base, wv, pstep, OW, finish, taps);
      }
      for (; ow < OW; ++ow) {
        __m512i a = _mm512_setzero_si512();
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t g = 0; g < G; ++g)
            a = _mm512_dpbusd_epi32(a, taps(base[i] + ow * pstep + g * 64), wv[i * G + g]);
        finish(a, ow);
      }
    }
    if (sink != nullptr) sink->consume(sink->ctx, n, oh, row.data());
  }
}

void dw_conv_vnni(const DwVnni& args) {
  const int64_t source = args.src == nullptr ? 0 : args.src->row_work * args.sh;
  const int64_t sink = args.sink == nullptr ? 0 : args.sink->row_work;
  at::parallel_for(0, args.N * args.OH,
                   dw_grain_for(args.OW * args.Cp * args.kh * args.kw + source + sink),
                   [args](int64_t begin, int64_t end) { dw_vnni_rows(begin, end, args); });
}
#endif
