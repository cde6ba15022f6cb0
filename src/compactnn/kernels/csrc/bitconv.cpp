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
#include <cmath>
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
    // captures copied into locals: through the captured references, every store that may
    // alias them (a uint8 store aliases anything) made the compiler reload them per item
    const auto C_ = C;
    const auto CW_ = CW;
    const auto H_ = H;
    const auto W_ = W;
    const auto op_ = op;
    const auto sc_ = sc;
    const auto shh_ = shh;
    const auto sn_ = sn;
    const auto sp_ = sp;
    const auto sw_ = sw;
    const auto xp_ = xp;
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H_, h = nh % H_;
      for (int64_t w = 0; w < W_; ++w) {
        const float* px = xp_ + n * sn_ + h * shh_ + w * sw_;
        uint64_t* dst = op_ + (nh * W_ + w) * CW_;
#if COMPACTNN_VPOPCNT
        if (sc_ == 1) {  // channels contiguous (channels-last input): 16 compares at once
          for (int64_t c0 = 0; c0 < C_; c0 += 16) {
            const int64_t left = std::min<int64_t>(16, C_ - c0);
            const __mmask16 valid = static_cast<__mmask16>((1u << left) - 1u);
            __m512 v = _mm512_maskz_loadu_ps(valid, px + c0);
            __m512 s = _mm512_maskz_loadu_ps(valid, sp_ + c0);
            // x - shift >= 0, ordered: NaN gives -1 as in the simulation
            __mmask16 ge = _mm512_mask_cmp_ps_mask(valid, _mm512_sub_ps(v, s),
                                                   _mm512_setzero_ps(), _CMP_GE_OQ);
            dst[c0 >> 6] |= static_cast<uint64_t>(ge) << (c0 & 63);
          }
          continue;
        }
#endif
        for (int64_t c = 0; c < C_; ++c) {
          // same float subtraction as the simulation, so the signs match bit for bit
          if (px[c * sc_] - sp_[c] >= 0.0f) dst[c >> 6] |= (uint64_t{1} << (c & 63));
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
    // captures copied into locals: through the captured references, every store that may
    // alias them (a uint8 store aliases anything) made the compiler reload them per item
    const auto stride0_ = stride[0];
    const auto stride1_ = stride[1];
    const auto padding0_ = padding[0];
    const auto padding1_ = padding[1];
    const auto dilation0_ = dilation[0];
    const auto dilation1_ = dilation[1];
    const auto C_ = C;
    const auto CW_ = CW;
    const auto H_ = H;
    const auto K_ = K;
    const auto KH_ = KH;
    const auto KW_ = KW;
    const auto M_ = M;
    const auto O_ = O;
    const auto OH_ = OH;
    const auto OP_ = OP;
    const auto OW_ = OW;
    const auto W_ = W;
    const auto bip_ = bip;
    const auto outf_ = outf;
    const auto outi_ = outi;
    const auto pcp_ = pcp;
    const auto scp_ = scp;
    const auto wp_ = wp;
    const auto xp_ = xp;
    std::vector<uint64_t> xbuf(P * K_);
    std::vector<int64_t> acc(P * OB), corr(P * OP_);
    std::vector<int64_t> nvalid(P);
    for (int64_t blk = begin; blk < end; ++blk) {
      // gather the receptive field of each pixel of the block (zeros outside the input)
      for (int64_t p = 0; p < P; ++p) {
        const int64_t m = blk * P + p;
        uint64_t* xb = xbuf.data() + p * K_;
        std::fill(xb, xb + K_, uint64_t{0});
        std::fill(corr.begin() + p * OP_, corr.begin() + (p + 1) * OP_, int64_t{0});
        nvalid[p] = 0;
        if (m >= M_) continue;  // tail of the last block: computed, never written
        const int64_t n = m / (OH_ * OW_), oh = (m / OW_) % OH_, ow = m % OW_;
        for (int64_t i = 0; i < KH_; ++i) {
          for (int64_t j = 0; j < KW_; ++j) {
            const int64_t t = i * KW_ + j;
            const int64_t ih = oh * stride0_ - padding0_ + i * dilation0_;
            const int64_t iw = ow * stride1_ - padding1_ + j * dilation1_;
            if (ih < 0 || ih >= H_ || iw < 0 || iw >= W_) {
              const int64_t* pc = pcp_ + t * OP_;  // popcount(0 ^ w) is counted: remove it
              for (int64_t o = 0; o < OP_; ++o) corr[p * OP_ + o] += pc[o];
              continue;
            }
            const uint64_t* src = xp_ + ((n * H_ + ih) * W_ + iw) * CW_;
            std::copy(src, src + CW_, xb + t * CW_);
            ++nvalid[p];
          }
        }
      }
      for (int64_t ob = 0; ob < OP_; ob += OB) {
        popcount_block(xbuf.data(), K_, wp_, OP_, ob, acc.data());
        for (int64_t p = 0; p < P; ++p) {
          const int64_t m = blk * P + p;
          if (m >= M_) break;
          const int64_t oend = std::min(OB, O_ - ob);
#if COMPACTNN_VPOPCNT
          if (oend == OB && outf_ != nullptr) {  // vector epilogue: 8 channels at a time
            const __m512i base = _mm512_set1_epi64(C_ * nvalid[p]);
            for (int64_t h = 0; h < OB; h += 8) {
              __m512i pc = _mm512_sub_epi64(_mm512_loadu_si512(acc.data() + p * OB + h),
                                            _mm512_loadu_si512(corr.data() + p * OP_ + ob + h));
              __m512i dot = _mm512_sub_epi64(base, _mm512_slli_epi64(pc, 1));
              __m256 f = _mm512_cvtepi64_ps(dot);  // |dot| < 2^24: exact in float
              __m256 b = bip_ != nullptr ? _mm256_loadu_ps(bip_ + ob + h) : _mm256_setzero_ps();
              __m256 r = _mm256_add_ps(_mm256_mul_ps(f, _mm256_loadu_ps(scp_ + ob + h)), b);
              _mm256_storeu_ps(outf_ + m * O_ + ob + h, r);
            }
            continue;
          }
#endif
          for (int64_t o = 0; o < oend; ++o) {
            const int64_t pc = acc[p * OB + o] - corr[p * OP_ + ob + o];
            const int64_t dot = C_ * nvalid[p] - 2 * pc;
            if (outf_ != nullptr) {
              const float b = bip_ != nullptr ? bip_[ob + o] : 0.0f;
              outf_[m * O_ + ob + o] = static_cast<float>(dot) * scp_[ob + o] + b;
            } else {
              outi_[m * O_ + ob + o] = static_cast<int32_t>(dot);
            }
          }
        }
      }
    }
  });
  return out;
}

// Sign codes of x (N, C, H, W) float32, any strides, for the int8 kernel: uint8 129 where
// x - shift >= 0 (+1 around zero point 128), else 127 (-1; NaN too, as in the simulation).
// Returns (N, C, H, W) uint8 in channels-last memory (one pass instead of five).
torch::Tensor sign_codes(torch::Tensor x, torch::Tensor shift) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "x: (N, C, H, W) float32");
  TORCH_CHECK(shift.numel() == x.size(1), "shift: one value per input channel");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto sh = shift.contiguous().to(torch::kFloat32);
  auto out = torch::empty({N, C, H, W}, torch::dtype(torch::kUInt8)
                                            .memory_format(at::MemoryFormat::ChannelsLast));
  const float* xp = x.data_ptr<float>();
  const float* sp = sh.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  const int64_t sn = x.stride(0), sc = x.stride(1), shh = x.stride(2), sw = x.stride(3);
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    // captures copied into locals: through the captured references, every store that may
    // alias them (a uint8 store aliases anything) made the compiler reload them per item
    const auto C_ = C;
    const auto H_ = H;
    const auto W_ = W;
    const auto op_ = op;
    const auto sc_ = sc;
    const auto shh_ = shh;
    const auto sn_ = sn;
    const auto sp_ = sp;
    const auto sw_ = sw;
    const auto xp_ = xp;
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H_, h = nh % H_;
      for (int64_t w = 0; w < W_; ++w) {
        const float* px = xp_ + n * sn_ + h * shh_ + w * sw_;
        uint8_t* dst = op_ + (nh * W_ + w) * C_;
        int64_t c = 0;
#if COMPACTNN_VPOPCNT && defined(__AVX512BW__) && defined(__AVX512VL__)
        if (sc_ == 1) {  // channels contiguous: 16 compares and 16 byte codes at once
          const __m128i plus = _mm_set1_epi8(static_cast<char>(129));
          const __m128i minus = _mm_set1_epi8(static_cast<char>(127));
          for (; c < C_; c += 16) {
            const int64_t left = std::min<int64_t>(16, C_ - c);
            const __mmask16 valid = static_cast<__mmask16>((1u << left) - 1u);
            __m512 v = _mm512_maskz_loadu_ps(valid, px + c);
            __m512 s = _mm512_maskz_loadu_ps(valid, sp_ + c);
            __mmask16 ge = _mm512_cmp_ps_mask(_mm512_sub_ps(v, s), _mm512_setzero_ps(),
                                              _CMP_GE_OQ);
            _mm_mask_storeu_epi8(dst + c, valid, _mm_mask_blend_epi8(ge, minus, plus));
          }
        }
#endif
        for (; c < C_; ++c) dst[c] = (px[c * sc_] - sp_[c] >= 0.0f) ? 129 : 127;
      }
    }
  });
  return out;
}

// The float tail of a binary block, in place on y (N, OH, OW, O) float32 contiguous, one pass:
//   v = y + shortcut[n, o / rep, oh, ow]    (when shortcut is given; rep: channel repeat)
//     pool == 2: the shortcut is (N, O / rep, 2 OH, 2 OW) and each value is its 2x2 average,
//     ((((0 + s00) + s01) + s10) + s11) / 4, the order of avg_pool2d(s, 2, 2) channels-last
//   v = PReLU(v - gamma) + zeta             (ReActNet's RPReLU, when gamma is given)
//   v = max(v, 0)                           (when relu)
// The float operations and their order are those of the PyTorch ops they replace, so the
// result is bit-identical to them.
torch::Tensor binary_tail(torch::Tensor y, c10::optional<torch::Tensor> shortcut, int64_t rep,
                          c10::optional<torch::Tensor> gamma, c10::optional<torch::Tensor> slope,
                          c10::optional<torch::Tensor> zeta, bool relu, int64_t pool) {
  TORCH_CHECK(y.dim() == 4 && y.scalar_type() == torch::kFloat32 && y.is_contiguous(),
              "y: (N, OH, OW, O) float32 contiguous");
  const int64_t N = y.size(0), OH = y.size(1), OW = y.size(2), O = y.size(3);
  const bool has_sc = shortcut.has_value() && shortcut->defined();
  const bool has_pr = gamma.has_value() && gamma->defined();
  torch::Tensor sct, g, sl, z;
  int64_t sn = 0, scs = 0, sh = 0, sw = 0;
  if (has_sc) {
    sct = *shortcut;
    TORCH_CHECK(pool == 1 || pool == 2, "pool: 1 or 2");
    TORCH_CHECK(sct.dim() == 4 && sct.scalar_type() == torch::kFloat32 && rep >= 1 &&
                    sct.size(0) == N && sct.size(1) * rep == O && sct.size(2) == OH * pool &&
                    sct.size(3) == OW * pool,
                "shortcut: (N, O / rep, OH * pool, OW * pool) float32");
    sn = sct.stride(0), scs = sct.stride(1), sh = sct.stride(2), sw = sct.stride(3);
  }
  if (has_pr) {
    g = gamma->contiguous().to(torch::kFloat32);
    sl = slope->contiguous().to(torch::kFloat32);
    z = zeta->contiguous().to(torch::kFloat32);
    TORCH_CHECK(g.numel() == O && sl.numel() == O && z.numel() == O, "RPReLU: O values each");
  }
  float* yp = y.data_ptr<float>();
  const float* sp = has_sc ? sct.data_ptr<float>() : nullptr;
  const float* gp = has_pr ? g.data_ptr<float>() : nullptr;
  const float* lp = has_pr ? sl.data_ptr<float>() : nullptr;
  const float* zp = has_pr ? z.data_ptr<float>() : nullptr;
#if COMPACTNN_VPOPCNT
  // vector path: channels-last shortcut whose repeat divides 16 (channel o reads o / rep)
  const bool vec = O % 16 == 0 && (!has_sc || (scs == 1 && 16 % rep == 0));
  __m512i rep_idx = _mm512_setzero_si512();
  __mmask16 rep_mask = 0xFFFF;
  if (vec && has_sc) {
    alignas(64) int32_t idx[16];
    for (int i = 0; i < 16; ++i) idx[i] = static_cast<int32_t>(i / rep);
    rep_idx = _mm512_load_si512(reinterpret_cast<const void*>(idx));
    rep_mask = static_cast<__mmask16>((1u << (16 / rep)) - 1u);
  }
#else
  const bool vec = false;
  (void)vec;
#endif
  at::parallel_for(0, N * OH, 1, [&](int64_t begin, int64_t end) {
    // captures copied into locals: through the captured references, every store that may
    // alias them (a uint8 store aliases anything) made the compiler reload them per item
    const auto O_ = O;
    const auto OH_ = OH;
    const auto OW_ = OW;
    const auto gp_ = gp;
    const auto lp_ = lp;
    const auto pool_ = pool;
    const auto relu_ = relu;
    const auto rep_ = rep;
    const auto rep_idx_ = rep_idx;
    const auto rep_mask_ = rep_mask;
    const auto scs_ = scs;
    const auto sh_ = sh;
    const auto sn_ = sn;
    const auto sp_ = sp;
    const auto sw_ = sw;
    const auto vec_ = vec;
    const auto yp_ = yp;
    const auto zp_ = zp;
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / OH_, h = nh % OH_;
      for (int64_t w = 0; w < OW_; ++w) {
        float* v = yp_ + (nh * OW_ + w) * O_;
        const float* s = sp_ != nullptr ? sp_ + n * sn_ + h * pool_ * sh_ + w * pool_ * sw_ : nullptr;
#if COMPACTNN_VPOPCNT
        if (vec_) {
          const __m512 zero = _mm512_setzero_ps();
          for (int64_t o = 0; o < O_; o += 16) {
            __m512 a = _mm512_loadu_ps(v + o);
            if (s != nullptr) {
              auto at = [&](const float* p) {
                return rep_ == 1 ? _mm512_loadu_ps(p + o)
                                : _mm512_permutexvar_ps(
                                      rep_idx_, _mm512_maskz_loadu_ps(rep_mask_, p + o / rep_));
              };
              __m512 b = at(s);
              if (pool_ == 2) {
                b = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(zero, b), at(s + sw_)),
                                                at(s + sh_)),
                                  at(s + sh_ + sw_));
                b = _mm512_div_ps(b, _mm512_set1_ps(4.0f));
              }
              a = _mm512_add_ps(a, b);
            }
            if (gp_ != nullptr) {  // where(t >= 0, t, slope * t) + zeta, t = v - gamma
              __m512 t = _mm512_sub_ps(a, _mm512_loadu_ps(gp_ + o));
              __mmask16 ge = _mm512_cmp_ps_mask(t, zero, _CMP_GE_OQ);
              __m512 m = _mm512_mul_ps(_mm512_loadu_ps(lp_ + o), t);
              a = _mm512_add_ps(_mm512_mask_blend_ps(ge, m, t), _mm512_loadu_ps(zp_ + o));
            }
            if (relu_) {  // v > 0 ? v : 0, NaN kept
              __mmask16 keep = _mm512_cmp_ps_mask(a, zero, _CMP_GT_OQ) |
                               _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
              a = _mm512_maskz_mov_ps(keep, a);
            }
            _mm512_storeu_ps(v + o, a);
          }
          continue;
        }
#endif
        if (s != nullptr) {
          for (int64_t o = 0; o < O_; ++o) {
            const int64_t c = (o / rep_) * scs_;
            const float b = pool_ == 1
                                ? s[c]
                                : ((((0.0f + s[c]) + s[c + sw_]) + s[c + sh_]) + s[c + sh_ + sw_]) / 4.0f;
            v[o] = v[o] + b;
          }
        }
        if (gp_ != nullptr) {
          for (int64_t o = 0; o < O_; ++o) {
            const float t = v[o] - gp_[o];
            v[o] = (t >= 0.0f ? t : lp_[o] * t) + zp_[o];
          }
        }
        if (relu_) {
          for (int64_t o = 0; o < O_; ++o) v[o] = v[o] > 0.0f ? v[o] : (v[o] != v[o] ? v[o] : 0.0f);
        }
      }
    }
  });
  return y;
}

// Sum of two stacked int8-kernel outputs, quantized (compactnn.deployment.lowbit): y is
// (M, 2 * O) float32 contiguous with channels ordered (groups, 2, O / groups); returns
// (M, O) uint8 codes clamp(nearbyint((y_term0 + y_term1) / scale) + zero, lo, hi): the
// simulation's division and round-half-even, bit-identical to the PyTorch ops, one pass.
torch::Tensor stacked_quantize(torch::Tensor y, int64_t groups, double scale, int64_t zero,
                               int64_t lo, int64_t hi) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == torch::kFloat32 && y.is_contiguous(),
              "y: (M, 2 * O) float32 contiguous");
  const int64_t M = y.size(0), O = y.size(1) / 2;
  TORCH_CHECK(y.size(1) == 2 * O && groups >= 1 && O % groups == 0, "y: (M, 2 * O)");
  TORCH_CHECK(0 <= lo && lo <= hi && hi <= 255, "codes lo..hi within 0..255");
  const int64_t og = O / groups;
  const float s = static_cast<float>(scale), z = static_cast<float>(zero);
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  auto out = torch::empty({M, O}, torch::kUInt8);
  const float* yp = y.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    // captures copied into locals: through the captured references, every store that may
    // alias them (a uint8 store aliases anything) made the compiler reload them per item
    const auto O_ = O;
    const auto fhi_ = fhi;
    const auto flo_ = flo;
    const auto groups_ = groups;
    const auto og_ = og;
    const auto op_ = op;
    const auto s_ = s;
    const auto yp_ = yp;
    const auto z_ = z;
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t g = 0; g < groups_; ++g) {
        const float* a = yp_ + m * 2 * O_ + g * 2 * og_;
        const float* b = a + og_;
        uint8_t* dst = op_ + m * O_ + g * og_;
        int64_t j = 0;
#if COMPACTNN_VPOPCNT
        const __m512 vs = _mm512_set1_ps(s_), vz = _mm512_set1_ps(z_);
        const __m512 vlo = _mm512_set1_ps(flo_), vhi = _mm512_set1_ps(fhi_);
        for (; j + 16 <= og_; j += 16) {
          __m512 v = _mm512_div_ps(_mm512_add_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j)),
                                   vs);
          v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, vz), vlo), vhi);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                           _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(v)));
        }
#endif
        for (; j < og_; ++j) {
          float v = std::nearbyint((a[j] + b[j]) / s_) + z_;
          v = std::min(std::max(v, flo_), fhi_);
          dst[j] = static_cast<uint8_t>(v);
        }
      }
    }
  });
  return out;
}

bool has_vpopcnt() { return COMPACTNN_VPOPCNT != 0; }

void register_smallconv(pybind11::module& m);  // smallconv.cpp: few-input-channel convolution
void register_termconv(pybind11::module& m);   // termconv.cpp: one- or two-term int8 convolution
void register_head(pybind11::module& m);       // head.cpp: pool + quantize, small linear
void register_codes(pybind11::module& m);      // codes.cpp: quantize and max-pool of codes
void register_dwconv(pybind11::module& m);     // dwconv.cpp: depthwise int8 convolution
void register_squeeze(pybind11::module& m);    // squeeze.cpp: a squeeze-excitation block
void register_dwblock(pybind11::module& m);    // dwblock.cpp: [1x1 ->] depthwise [-> 1x1]

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_signs", &pack_signs, "pack sign(x - shift) of (N, C, H, W) into NHWC words");
  m.def("bitconv2d", &bitconv2d, "binary convolution on packed bits");
  m.def("sign_codes", &sign_codes, "uint8 sign codes 127 / 129 of x - shift (channels-last)");
  m.def("binary_tail", &binary_tail, "shortcut add, RPReLU and ReLU in place, one pass");
  m.def("stacked_quantize", &stacked_quantize, "sum two stacked kernel outputs, quantize");
  m.def("has_vpopcnt", &has_vpopcnt, "whether the AVX-512 VPOPCNTDQ path was compiled");
  register_smallconv(m);
  register_termconv(m);
  register_head(m);
  register_codes(m);
  register_dwconv(m);
  register_squeeze(m);
  register_dwblock(m);
}
