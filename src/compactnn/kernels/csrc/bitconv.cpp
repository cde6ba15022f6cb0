// Binary 2-D convolution on channel-packed bits (compactnn.kernels.bitconv).
//
// Values are +1 / -1; bit 1 means +1. Activations are packed NHWC, 64 input channels per
// uint64 word (N, H, W, CW); weights are packed per tap and word, output channels last
// (T * CW, OP) with T = KH * KW and OP the output channels padded to a multiple of 16.
// Bits past the real channel count are 0 in both operands, so XOR leaves them 0.
//
// For one output pixel and channel o, over the valid taps (inside the input):
//   dot = sum_taps (C - 2 * popcount(x XOR w)) = C * n_valid - 2 * popcount_sum
// A tap in the zero padding contributes 0 (not +-1): its activation words are set to 0, and
// the popcount of 0 XOR w (i.e. popcount(w), precomputed per tap and channel) is subtracted.
//
// Pixels are processed in blocks of P = 4 sharing each weight load; output channels in
// blocks of 16 (two 512-bit registers of 64-bit counters) with AVX-512 VPOPCNTDQ when the
// compiler target has it, a portable __builtin_popcountll loop otherwise. Output pixel
// blocks run in parallel through ATen's OpenMP parallel_for (torch.set_num_threads).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#include <immintrin.h>
#define COMPACTNN_VPOPCNT 1
#else
#define COMPACTNN_VPOPCNT 0
#endif

namespace {

constexpr int64_t P = 4;    // output pixels per block
constexpr int64_t OB = 16;  // output channels per block

// Accumulate popcount(x[p][k] ^ w[k][o]) over k for P pixels and OB channels starting at ob.
inline void popcount_block(const uint64_t* xbuf, int64_t K, const uint64_t* wt, int64_t OP,
                           int64_t ob, int64_t* acc /* P x OB */) {
#if COMPACTNN_VPOPCNT
  __m512i a[P][2];
  for (int64_t p = 0; p < P; ++p) a[p][0] = a[p][1] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; ++k) {
    const uint64_t* wrow = wt + k * OP + ob;
    __m512i w0 = _mm512_loadu_si512(reinterpret_cast<const void*>(wrow));
    __m512i w1 = _mm512_loadu_si512(reinterpret_cast<const void*>(wrow + 8));
    for (int64_t p = 0; p < P; ++p) {
      __m512i xb = _mm512_set1_epi64(static_cast<long long>(xbuf[p * K + k]));
      a[p][0] = _mm512_add_epi64(a[p][0], _mm512_popcnt_epi64(_mm512_xor_si512(xb, w0)));
      a[p][1] = _mm512_add_epi64(a[p][1], _mm512_popcnt_epi64(_mm512_xor_si512(xb, w1)));
    }
  }
  for (int64_t p = 0; p < P; ++p) {
    _mm512_storeu_si512(reinterpret_cast<void*>(acc + p * OB), a[p][0]);
    _mm512_storeu_si512(reinterpret_cast<void*>(acc + p * OB + 8), a[p][1]);
  }
#else
  for (int64_t i = 0; i < P * OB; ++i) acc[i] = 0;
  for (int64_t k = 0; k < K; ++k) {
    const uint64_t* wrow = wt + k * OP + ob;
    for (int64_t p = 0; p < P; ++p) {
      const uint64_t xb = xbuf[p * K + k];
      for (int64_t o = 0; o < OB; ++o) acc[p * OB + o] += __builtin_popcountll(xb ^ wrow[o]);
    }
  }
#endif
}

}  // namespace

// Pack sign(x - shift) (bit 1 where x - shift >= 0) of x (N, C, H, W), any strides, float32,
// into (N, H, W, CW) words.
torch::Tensor pack_signs(torch::Tensor x, torch::Tensor shift) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "x: (N, C, H, W) float32");
  TORCH_CHECK(shift.numel() == x.size(1), "shift: one value per input channel");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t CW = (C + 63) / 64;
  auto sh = shift.contiguous().to(torch::kFloat32);
  auto out = torch::zeros({N, H, W, CW}, torch::kInt64);
  const float* xp = x.data_ptr<float>();
  const float* sp = sh.data_ptr<float>();
  uint64_t* op = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  const int64_t sn = x.stride(0), sc = x.stride(1), shh = x.stride(2), sw = x.stride(3);
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      for (int64_t w = 0; w < W; ++w) {
        const float* px = xp + n * sn + h * shh + w * sw;
        uint64_t* dst = op + (nh * W + w) * CW;
#if COMPACTNN_VPOPCNT
        if (sc == 1) {  // channels contiguous (channels-last input): 16 compares at once
          for (int64_t c0 = 0; c0 < C; c0 += 16) {
            const int64_t left = std::min<int64_t>(16, C - c0);
            const __mmask16 valid = static_cast<__mmask16>((1u << left) - 1u);
            __m512 v = _mm512_maskz_loadu_ps(valid, px + c0);
            __m512 s = _mm512_maskz_loadu_ps(valid, sp + c0);
            // x - shift >= 0, ordered: NaN gives -1 as in the simulation
            __mmask16 ge = _mm512_mask_cmp_ps_mask(valid, _mm512_sub_ps(v, s),
                                                   _mm512_setzero_ps(), _CMP_GE_OQ);
            dst[c0 >> 6] |= static_cast<uint64_t>(ge) << (c0 & 63);
          }
          continue;
        }
#endif
        for (int64_t c = 0; c < C; ++c) {
          // same float subtraction as the simulation, so the signs match bit for bit
          if (px[c * sc] - sp[c] >= 0.0f) dst[c >> 6] |= (uint64_t{1} << (c & 63));
        }
      }
    }
  });
  return out;
}

// xw: (N, H, W, CW) packed activations; wt: (T * CW, OP) packed weights; wpc: (T, OP) int64
// popcount of each tap's weight words. Returns (N, OH, OW, O): int32 dots, or
// float32 dot * scale[o] + bias[o] when scale is given (bias may be empty).
torch::Tensor bitconv2d(torch::Tensor xw, torch::Tensor wt, torch::Tensor wpc, int64_t C,
                        int64_t O, int64_t KH, int64_t KW, std::vector<int64_t> stride,
                        std::vector<int64_t> padding, std::vector<int64_t> dilation,
                        c10::optional<torch::Tensor> scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(xw.dim() == 4 && xw.scalar_type() == torch::kInt64, "xw: (N, H, W, CW) int64");
  xw = xw.contiguous();
  wt = wt.contiguous();
  wpc = wpc.contiguous();
  const int64_t N = xw.size(0), H = xw.size(1), W = xw.size(2), CW = xw.size(3);
  const int64_t T = KH * KW, K = T * CW, OP = wt.size(1);
  TORCH_CHECK(wt.size(0) == K && OP % OB == 0 && OP >= O, "wt: (KH*KW*CW, OP), OP % 16 == 0");
  TORCH_CHECK(CW == (C + 63) / 64, "C does not match the packed activation words");
  const int64_t OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) / stride[0] + 1;
  const int64_t OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "output would be empty");
  const bool affine = scale.has_value() && scale->defined();
  torch::Tensor sc, bi;
  if (affine) {
    sc = scale->contiguous().to(torch::kFloat32);
    TORCH_CHECK(sc.numel() == O, "scale: one value per output channel");
    if (bias.has_value() && bias->defined()) {
      bi = bias->contiguous().to(torch::kFloat32);
      TORCH_CHECK(bi.numel() == O, "bias: one value per output channel");
    }
  }
  auto out = torch::empty({N, OH, OW, O}, affine ? torch::kFloat32 : torch::kInt32);
  const uint64_t* xp = reinterpret_cast<const uint64_t*>(xw.data_ptr<int64_t>());
  const uint64_t* wp = reinterpret_cast<const uint64_t*>(wt.data_ptr<int64_t>());
  const int64_t* pcp = wpc.data_ptr<int64_t>();
  float* outf = affine ? out.data_ptr<float>() : nullptr;
  int32_t* outi = affine ? nullptr : out.data_ptr<int32_t>();
  const float* scp = affine ? sc.data_ptr<float>() : nullptr;
  const float* bip = bi.defined() ? bi.data_ptr<float>() : nullptr;
  const int64_t M = N * OH * OW;
  const int64_t nblocks = (M + P - 1) / P;

  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> xbuf(P * K);
    std::vector<int64_t> acc(P * OB), corr(P * OP);
    std::vector<int64_t> nvalid(P);
    for (int64_t blk = begin; blk < end; ++blk) {
      // gather the receptive field of each pixel of the block (zeros outside the input)
      for (int64_t p = 0; p < P; ++p) {
        const int64_t m = blk * P + p;
        uint64_t* xb = xbuf.data() + p * K;
        std::fill(xb, xb + K, uint64_t{0});
        std::fill(corr.begin() + p * OP, corr.begin() + (p + 1) * OP, int64_t{0});
        nvalid[p] = 0;
        if (m >= M) continue;  // tail of the last block: computed, never written
        const int64_t n = m / (OH * OW), oh = (m / OW) % OH, ow = m % OW;
        for (int64_t i = 0; i < KH; ++i) {
          for (int64_t j = 0; j < KW; ++j) {
            const int64_t t = i * KW + j;
            const int64_t ih = oh * stride[0] - padding[0] + i * dilation[0];
            const int64_t iw = ow * stride[1] - padding[1] + j * dilation[1];
            if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
              const int64_t* pc = pcp + t * OP;  // popcount(0 ^ w) is counted: remove it
              for (int64_t o = 0; o < OP; ++o) corr[p * OP + o] += pc[o];
              continue;
            }
            const uint64_t* src = xp + ((n * H + ih) * W + iw) * CW;
            std::copy(src, src + CW, xb + t * CW);
            ++nvalid[p];
          }
        }
      }
      for (int64_t ob = 0; ob < OP; ob += OB) {
        popcount_block(xbuf.data(), K, wp, OP, ob, acc.data());
        for (int64_t p = 0; p < P; ++p) {
          const int64_t m = blk * P + p;
          if (m >= M) break;
          const int64_t oend = std::min(OB, O - ob);
#if COMPACTNN_VPOPCNT
          if (oend == OB && outf != nullptr) {  // vector epilogue: 8 channels at a time
            const __m512i base = _mm512_set1_epi64(C * nvalid[p]);
            for (int64_t h = 0; h < OB; h += 8) {
              __m512i pc = _mm512_sub_epi64(_mm512_loadu_si512(acc.data() + p * OB + h),
                                            _mm512_loadu_si512(corr.data() + p * OP + ob + h));
              __m512i dot = _mm512_sub_epi64(base, _mm512_slli_epi64(pc, 1));
              __m256 f = _mm512_cvtepi64_ps(dot);  // |dot| < 2^24: exact in float
              __m256 b = bip != nullptr ? _mm256_loadu_ps(bip + ob + h) : _mm256_setzero_ps();
              __m256 r = _mm256_add_ps(_mm256_mul_ps(f, _mm256_loadu_ps(scp + ob + h)), b);
              _mm256_storeu_ps(outf + m * O + ob + h, r);
            }
            continue;
          }
#endif
          for (int64_t o = 0; o < oend; ++o) {
            const int64_t pc = acc[p * OB + o] - corr[p * OP + ob + o];
            const int64_t dot = C * nvalid[p] - 2 * pc;
            if (outf != nullptr) {
              const float b = bip != nullptr ? bip[ob + o] : 0.0f;
              outf[m * O + ob + o] = static_cast<float>(dot) * scp[ob + o] + b;
            } else {
              outi[m * O + ob + o] = static_cast<int32_t>(dot);
            }
          }
        }
      }
    }
  });
  return out;
}

bool has_vpopcnt() { return COMPACTNN_VPOPCNT != 0; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_signs", &pack_signs, "pack sign(x - shift) of (N, C, H, W) into NHWC words");
  m.def("bitconv2d", &bitconv2d, "binary convolution on packed bits");
  m.def("has_vpopcnt", &has_vpopcnt, "whether the AVX-512 VPOPCNTDQ path was compiled");
}
