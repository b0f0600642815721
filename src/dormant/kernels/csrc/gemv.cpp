// Batch-1 matrix-vector kernels for decode on the CPU: dense rows, row gather, column-sparse.
// Specification: dormant/kernels/gemv_reference.py (formats and layouts: dormant/kernels/blocks.py);
// the Python side (dormant/kernels/gemv.py) builds this file once per machine and calls it through
// ctypes; csrc/decode_step.cpp includes it and calls the *_range functions inside one parallel region.
//
// Formats (GGUF blocks, byte for byte): F32, BF16, Q8_0 {fp16 d; int8 q[32]}, Q4_0 {fp16 d; u8 qs[16]},
// Q4_1 {fp16 d, m; u8 qs[16]} (4-bit q[j] = qs[j] & 15, q[j+16] = qs[j] >> 4).
//
// rows layout (blocks along the input): float formats accumulate w * x in fp32 (FMA). Quantised formats
// use integer dot products, llama.cpp's numerics: x is quantised once per input vector to 8 bits per
// block of 32 (quantize_x), and each weight block contributes fp32(dw * dx) * dot(qw, qx) (q4_0 folds
// the -8 offset in as -8 * sum(qx); q4_1 adds m * dx * sum(qx)). The block dot is AVX512-VNNI vpdpbusd
// (unsigned x signed bytes; q8_0 moves its sign onto x) or AVX2 maddubs + madd. One row at a time:
// on the machines measured, a core reads one sequential stream at full DRAM bandwidth but 2-4
// interleaved row streams at about half of it, so rows are not grouped (x stays in L1 anyway).
//
// cols layout (input-major, blocks along the output): y += x_i * W[:, i] for the active columns only,
// in float (scale * x_i broadcast per block, FMA), kColsPerPass columns per load/store of a y block,
// the columns ahead prefetched into L2. Threads split y by whole blocks, or the active columns
// (whole columns per thread, private partial y; see dormant_gemv_cols).
//
// Compile-time paths: AVX512-VNNI (+VL, BW) > AVX2 + FMA + F16C > scalar. The vector code is mostly
// 256-bit (Zen 4 executes 512-bit ops as two halves); AVX-512 adds the VNNI block dot and a 512-bit
// column update. -mno-avx512f / -mno-avx2 builds select the fallbacks (the tests build all three).

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DG_AVX2 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define DG_VNNI 1
#endif
#endif

namespace dg {

enum Fmt : int32_t { F32 = 0, BF16 = 1, Q8_0 = 2, Q4_0 = 3, Q4_1 = 4 };
enum Layout : int32_t { ROWS = 0, COLS = 1 };
constexpr int QK = 32;

inline int64_t nblocks(int64_t n) { return (n + QK - 1) / QK; }
inline int64_t block_bytes(int32_t fmt) { return fmt == Q8_0 ? 34 : fmt == Q4_0 ? 18 : fmt == Q4_1 ? 20 : 0; }
inline bool quantized(int32_t fmt) { return fmt == Q8_0 || fmt == Q4_0 || fmt == Q4_1; }
inline bool valid_fmt(int32_t fmt) { return fmt >= F32 && fmt <= Q4_1; }

inline float half_to_float(uint16_t h) {
#ifdef DG_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    const float f = std::ldexp(static_cast<float>(man), -24);  // zero or subnormal
    std::memcpy(&u, &f, 4);
    u |= sign;
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A weight matrix W [out, in] in one format and layout. stride: bytes from one stored vector (a row in
// ROWS, a column in COLS) to the next.
struct Mat {
  const uint8_t* data;
  int64_t out, in;
  int32_t fmt, layout;
  int64_t stride;
};

inline int64_t vector_bytes(int32_t fmt, int64_t n) {
  if (quantized(fmt)) return nblocks(n) * block_bytes(fmt);
  return n * (fmt == F32 ? 4 : 2);
}

inline Mat make_mat(const void* data, int64_t out, int64_t in, int32_t fmt, int32_t layout) {
  Mat m{static_cast<const uint8_t*>(data), out, in, fmt, layout, 0};
  m.stride = vector_bytes(fmt, layout == ROWS ? in : out);
  return m;
}

// ---------------------------------------------------------------------------------------------------
// Input quantisation (the x side of the integer dots): per block d = max|x| / 127, q = rint(x * (1/d)).
// Padded to whole blocks with zeros. s = sum(q); ds = d * s (q4_1's m term).

struct XQ {
  int8_t* q;    // [nb * 32]
  float* d;     // [nb]
  int32_t* s;   // [nb]
  float* ds;    // [nb]
  int64_t nb;
};

// Owns the buffers of an XQ.
struct XQBuf {
  std::vector<int8_t> q;
  std::vector<float> d, ds;
  std::vector<int32_t> s;
  XQ view(int64_t n) {
    const int64_t nb = nblocks(n);
    if (static_cast<int64_t>(d.size()) < nb) {
      q.resize(nb * QK);
      d.resize(nb);
      ds.resize(nb);
      s.resize(nb);
    }
    return XQ{q.data(), d.data(), s.data(), ds.data(), nb};
  }
};

inline void quantize_block(const float* x, int8_t* q, float* d_out, int32_t* s_out) {
#ifdef DG_AVX2
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(x + 8 * k);
  __m256 am = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                            _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float amax = _mm_cvtss_f32(m4);
  const float d = amax / 127.0f;
  const float id = d > 0.0f ? 1.0f / d : 0.0f;
  const __m256 idv = _mm256_set1_ps(id);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  __m256i qi[4];
  for (int k = 0; k < 4; ++k)  // round half to even (the default MXCSR mode), then clamp
    qi[k] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(_mm256_mul_ps(v[k], idv),
                                                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))));
  __m256i sum = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
  const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
  const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  *d_out = d;
  *s_out = _mm_cvtsi128_si32(s4);
#else
  float amax = 0.0f;
  for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d > 0.0f ? 1.0f / d : 0.0f;
  int32_t s = 0;
  for (int j = 0; j < QK; ++j) {
    float r = std::nearbyint(x[j] * id);
    r = std::min(127.0f, std::max(-127.0f, r));
    q[j] = static_cast<int8_t>(r);
    s += q[j];
  }
  *d_out = d;
  *s_out = s;
#endif
}

inline void quantize_x(const float* x, int64_t n, const XQ& xq) {
  const int64_t full = n / QK;
  for (int64_t b = 0; b < full; ++b) quantize_block(x + b * QK, xq.q + b * QK, xq.d + b, xq.s + b);
  if (full < xq.nb) {
    float tmp[QK] = {0};
    for (int64_t j = full * QK; j < n; ++j) tmp[j - full * QK] = x[j];
    quantize_block(tmp, xq.q + full * QK, xq.d + full, xq.s + full);
    for (int64_t b = full + 1; b < xq.nb; ++b) {
      std::memset(xq.q + b * QK, 0, QK);
      xq.d[b] = 0.0f;
      xq.s[b] = 0;
    }
  }
  for (int64_t b = 0; b < xq.nb; ++b) xq.ds[b] = xq.d[b] * static_cast<float>(xq.s[b]);
}

// ---------------------------------------------------------------------------------------------------
// rows layout: y[r] = W[r] . x.

#ifdef DG_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// acc + sum over groups of 4 bytes of u (unsigned) * s (signed), per int32 lane.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#ifdef DG_VNNI
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// 32 nibbles of a 4-bit block in element order: bytes 0-15 low nibbles, 16-31 high nibbles.
inline __m256i nibbles(const uint8_t* qs) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0f));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
#endif

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_float(v); }

#define DG_INLINE inline __attribute__((always_inline))

// Software prefetch into L2 (T1). always_inline: GCC otherwise may find a prefetch-only function
// "const" and delete its calls. -DDG_NO_PREFETCH turns prefetching off for A/B timing.
#ifndef DG_PREFETCH_BYTES
#define DG_PREFETCH_BYTES 16384
#endif
constexpr int64_t kPrefetchBytes = DG_PREFETCH_BYTES;

int64_t prefetch_dist(int64_t part_bytes) {
  return std::max<int64_t>(2, std::min<int64_t>(64, kPrefetchBytes / std::max<int64_t>(1, part_bytes)));
}

DG_INLINE void prefetch_l2(const void* p) {
#if defined(DG_AVX2) && !defined(DG_NO_PREFETCH)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
#else
  (void)p;
#endif
}

DG_INLINE void prefetch_row_l2(const uint8_t* p, int64_t bytes) {
  for (int64_t q = 0; q < bytes; q += 64) prefetch_l2(p + q);
}

// One block of one row: acc += fp32(dw * dx) * dot(qw, qx) (+ macc += m * dx * sum(qx) for q4_1).
#ifdef DG_AVX2
template <int FMT>
DG_INLINE void row_block(const uint8_t* blk, const XQ& x, int64_t b, __m256& acc, float& macc) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * QK));
  __m256i dot;
  if (FMT == Q4_0) {
    dot = dot_u8s8(_mm256_zextsi128_si256(_mm_cvtsi32_si128(-8 * x.s[b])), nibbles(blk + 2), xv);
  } else if (FMT == Q4_1) {
    dot = dot_u8s8(_mm256_setzero_si256(), nibbles(blk + 4), xv);
    macc += f16_at(blk + 2) * x.ds[b];
  } else {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    dot = dot_u8s8(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(xv, w));
  }
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(f16_at(blk) * x.d[b]), acc);
}
#endif

// One row of a quantised format; two accumulators (even / odd blocks) halve the FMA dependency chain.
template <int FMT>
float row_q(const uint8_t* row, const XQ& x) {
  constexpr int64_t bb = FMT == Q8_0 ? 34 : FMT == Q4_0 ? 18 : 20;
#ifdef DG_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  float m0 = 0.0f, m1 = 0.0f;
  int64_t b = 0;
  for (; b + 2 <= x.nb; b += 2) {
    row_block<FMT>(row + b * bb, x, b, a0, m0);
    row_block<FMT>(row + (b + 1) * bb, x, b + 1, a1, m1);
  }
  if (b < x.nb) row_block<FMT>(row + b * bb, x, b, a0, m0);
  return hsum(_mm256_add_ps(a0, a1)) + (m0 + m1);
#else
  float y = 0.0f;
  for (int64_t b = 0; b < x.nb; ++b) {
    const uint8_t* blk = row + b * bb;
    const int8_t* xq = x.q + b * QK;
    int32_t dot = 0;
    if (FMT == Q8_0) {
      const int8_t* w = reinterpret_cast<const int8_t*>(blk + 2);
      for (int j = 0; j < QK; ++j) dot += w[j] * xq[j];
    } else {
      const uint8_t* qs = blk + (FMT == Q4_0 ? 2 : 4);
      for (int j = 0; j < 16; ++j) dot += (qs[j] & 15) * xq[j] + (qs[j] >> 4) * xq[j + 16];
      if (FMT == Q4_0) dot -= 8 * x.s[b];
    }
    y += static_cast<float>(dot) * (f16_at(blk) * x.d[b]);
    if (FMT == Q4_1) y += f16_at(blk + 2) * x.ds[b];
  }
  return y;
#endif
}

// One row of a float format (W = float or bf16 bits).
template <typename W>
float row_float(const W* row, const float* x, int64_t n) {
  int64_t i = 0;
  float y = 0.0f;
#ifdef DG_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(load8(row + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(load8(row + i + 8), _mm256_loadu_ps(x + i + 8), a1);
  }
  y = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; i < n; ++i) y += to_float(row[i]) * x[i];
  return y;
}

template <int FMT>
DG_INLINE float row_dot(const Mat& m, const uint8_t* row, const float* x, const XQ& xq) {
  if (FMT == F32) return row_float(reinterpret_cast<const float*>(row), x, m.in);
  if (FMT == BF16) return row_float(reinterpret_cast<const uint16_t*>(row), x, m.in);
  return row_q<FMT>(row, xq);
}

// Rows in order are one sequential stream, which the hardware prefetchers follow (software
// prefetching measured slower here). Gathered rows are scattered: the rows `dist` ahead are
// prefetched into L2 (see prefetch_dist below).
template <int FMT>
void rows_range_t(const Mat& m, const float* x, const XQ& xq, int64_t r0, int64_t r1, float* y) {
  for (int64_t r = r0; r < r1; ++r) y[r] = row_dot<FMT>(m, m.data + r * m.stride, x, xq);
}

template <int FMT>
void gather_range_t(const Mat& m, const float* x, const XQ& xq, const int32_t* idx, int64_t k0, int64_t k1,
                    float* y) {
  auto row = [&](int64_t k) { return m.data + static_cast<int64_t>(idx[k]) * m.stride; };
  const int64_t dist = prefetch_dist(m.stride);
  for (int64_t k = k0; k < std::min(k1, k0 + dist); ++k) prefetch_row_l2(row(k), m.stride);
  for (int64_t k = k0; k < k1; ++k) {
    if (k + dist < k1) prefetch_row_l2(row(k + dist), m.stride);
    y[k] = row_dot<FMT>(m, row(k), x, xq);
  }
}

// y[r] = W[r] . x for r in [r0, r1). xq: x quantised (quantised formats only).
inline void rows_range(const Mat& m, const float* x, const XQ& xq, int64_t r0, int64_t r1, float* y) {
  switch (m.fmt) {
    case F32: rows_range_t<F32>(m, x, xq, r0, r1, y); break;
    case BF16: rows_range_t<BF16>(m, x, xq, r0, r1, y); break;
    case Q8_0: rows_range_t<Q8_0>(m, x, xq, r0, r1, y); break;
    case Q4_0: rows_range_t<Q4_0>(m, x, xq, r0, r1, y); break;
    case Q4_1: rows_range_t<Q4_1>(m, x, xq, r0, r1, y); break;
    default: break;
  }
}

// y[k] = W[idx[k]] . x for k in [k0, k1).
inline void gather_range(const Mat& m, const float* x, const XQ& xq, const int32_t* idx, int64_t k0, int64_t k1,
                         float* y) {
  switch (m.fmt) {
    case F32: gather_range_t<F32>(m, x, xq, idx, k0, k1, y); break;
    case BF16: gather_range_t<BF16>(m, x, xq, idx, k0, k1, y); break;
    case Q8_0: gather_range_t<Q8_0>(m, x, xq, idx, k0, k1, y); break;
    case Q4_0: gather_range_t<Q4_0>(m, x, xq, idx, k0, k1, y); break;
    case Q4_1: gather_range_t<Q4_1>(m, x, xq, idx, k0, k1, y); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------------
// cols layout: y[o] = sum_k xv[k] * W[o, idx[k]] over output blocks [b0, b1) (float formats: blocks of
// 32 outputs too, so threads split the same way). y must have room for whole blocks (padded).
// A quantised column stores its nb block scales first (fp16 d[nb]; q4_1 then fp16 m[nb]) and then the
// block quants (q8_0: int8 [nb][32]; q4: u8 [nb][16], same nibble order as GGUF) -- the bytes of nb
// GGUF blocks, reordered so that a column's scales convert 8 or 16 at a time.
// kColsPerPass columns are added per load/store of a y block (this thread's part of y stays in L1 by
// chunks of kColsChunk blocks). Active columns are scattered and a thread's part of one is short, which
// the hardware prefetchers do not follow, so while columns stream, the columns `dist` ahead are
// prefetched into L2 at the same offsets (rate-matched: a few lines per 16 blocks), with dist =
// kPrefetchBytes / (bytes per column part), 2..64: measured here, 50%-random 0.3-4 KB chunks read at
// 1.5-2x the speed of no prefetching or of whole-column prefetches into L1; 4 columns per pass cut the
// compute per block by ~25% over one. The block-constant terms (q4_0: -8 d x, q4_1: m x) are summed per
// block over all columns and added once.

inline int64_t quant_bytes(int32_t fmt) { return fmt == Q8_0 ? 32 : 16; }  // per block, after the scales
inline int64_t scale_bytes(int32_t fmt) { return fmt == Q4_1 ? 4 : 2; }    // per block, before the quants

// sc[j] = x * d[j] for j < n (n <= 16); cs[j] += the block constant (-8 sc[j] / x m[j]).
template <int FMT>
DG_INLINE void column_scales(const uint8_t* d, const uint8_t* m, float x, int n, float* sc, float* cs) {
#ifdef DG_AVX2
  if (n == 16) {
    const __m256 xv = _mm256_set1_ps(x);
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_mul_ps(xv, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + 16 * h))));
      _mm256_storeu_ps(sc + 8 * h, s);
      __m256 c = _mm256_loadu_ps(cs + 8 * h);
      if (FMT == Q4_0) c = _mm256_fmadd_ps(_mm256_set1_ps(-8.0f), s, c);
      if (FMT == Q4_1)
        c = _mm256_fmadd_ps(xv, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + 16 * h))), c);
      if (FMT != Q8_0) _mm256_storeu_ps(cs + 8 * h, c);
    }
    return;
  }
#endif
  for (int j = 0; j < n; ++j) {
    sc[j] = x * f16_at(d + 2 * j);
    if (FMT == Q4_0) cs[j] += -8.0f * sc[j];
    if (FMT == Q4_1) cs[j] += x * f16_at(m + 2 * j);
  }
}

// y[32] += sum_c s[c] * q[c] over NC columns' quants of one block (y loaded and stored once).
template <int FMT, int NC>
DG_INLINE void axpy_block(const uint8_t* const* q, const float* s, float* y) {
#if defined(DG_AVX2) && defined(__AVX512F__)
  __m512 a0 = _mm512_loadu_ps(y), a1 = _mm512_loadu_ps(y + 16);
  for (int c = 0; c < NC; ++c) {
    const __m512 sv = _mm512_set1_ps(s[c]);
    if (FMT == Q8_0) {
      a0 = _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[c])))), a0);
      a1 = _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[c] + 16)))), a1);
    } else {
      const __m512i bq = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[c])));
      a0 = _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(_mm512_and_si512(bq, _mm512_set1_epi32(0x0f))), a0);
      a1 = _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(_mm512_srli_epi32(bq, 4)), a1);
    }
  }
  _mm512_storeu_ps(y, a0);
  _mm512_storeu_ps(y + 16, a1);
#elif defined(DG_AVX2)
  __m256 a[4];
  for (int k = 0; k < 4; ++k) a[k] = _mm256_loadu_ps(y + 8 * k);
  for (int c = 0; c < NC; ++c) {
    const __m256 sv = _mm256_set1_ps(s[c]);
    if (FMT == Q8_0) {
      for (int k = 0; k < 4; ++k) {
        const __m256i qi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q[c] + 8 * k)));
        a[k] = _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(qi), a[k]);
      }
    } else {
      const __m256i m4 = _mm256_set1_epi32(0x0f);
      const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q[c])));
      const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q[c] + 8)));
      a[0] = _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(_mm256_and_si256(b0, m4)), a[0]);
      a[1] = _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(_mm256_and_si256(b1, m4)), a[1]);
      a[2] = _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), a[2]);
      a[3] = _mm256_fmadd_ps(sv, _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)), a[3]);
    }
  }
  for (int k = 0; k < 4; ++k) _mm256_storeu_ps(y + 8 * k, a[k]);
#else
  for (int c = 0; c < NC; ++c) {
    if (FMT == Q8_0) {
      const int8_t* qi = reinterpret_cast<const int8_t*>(q[c]);
      for (int o = 0; o < QK; ++o) y[o] += s[c] * static_cast<float>(qi[o]);
    } else {
      for (int o = 0; o < 16; ++o) {
        y[o] += s[c] * static_cast<float>(q[c][o] & 15);
        y[o + 16] += s[c] * static_cast<float>(q[c][o] >> 4);
      }
    }
  }
#endif
}

#ifndef DG_COLS_PER_PASS
#define DG_COLS_PER_PASS 4
#endif
constexpr int kColsPerPass = DG_COLS_PER_PASS;  // columns whose blocks are added per load/store of y
#ifndef DG_COLS_CHUNK
#define DG_COLS_CHUNK 64
#endif
constexpr int64_t kColsChunk = DG_COLS_CHUNK;
#ifndef DG_STREAM_BELOW_BYTES
#define DG_STREAM_BELOW_BYTES 1024
#endif
constexpr int64_t kStreamBelowBytes = DG_STREAM_BELOW_BYTES;  // columns at most this long are streamed
#ifdef DG_NO_STREAM
constexpr bool kStreamColumns = false;
#else
constexpr bool kStreamColumns = true;
#endif

// NC columns (pointers col[c], inputs x[c]) over blocks [c0, c1) of one chunk; next[c]: columns to
// prefetch (or null).
template <int FMT, int NC>
DG_INLINE void cols_pass(const uint8_t* const* col, const uint8_t* const* next, const float* x, int64_t nb,
                         int64_t c0, int64_t c1, float* cs, float* y) {
  const int64_t qb = quant_bytes(FMT), s_end = nb * scale_bytes(FMT);
  alignas(64) float sc[NC][16];
  const uint8_t* q[NC];
  float s[NC];
  for (int c = 0; c < NC; ++c) q[c] = col[c] + s_end + c0 * qb;
  for (int64_t s0 = c0; s0 < c1; s0 += 16) {
    const int cnt = static_cast<int>(std::min<int64_t>(16, c1 - s0));
    for (int c = 0; c < NC; ++c) {
      if (next[c] != nullptr) {  // the same blocks of the column `dist` ahead: scales (and m), quants
        prefetch_l2(next[c] + 2 * s0);
        if (FMT == Q4_1) prefetch_l2(next[c] + 2 * nb + 2 * s0);
        for (int64_t o = s0 * qb; o < (s0 + cnt) * qb; o += 64) prefetch_l2(next[c] + s_end + o);
      }
      column_scales<FMT>(col[c] + 2 * s0, col[c] + 2 * nb + 2 * s0, x[c], cnt, sc[c], cs + (s0 - c0));
    }
    for (int j = 0; j < cnt; ++j) {
      for (int c = 0; c < NC; ++c) s[c] = sc[c][j];
      axpy_block<FMT, NC>(q, s, y + (s0 + j) * QK);
      for (int c = 0; c < NC; ++c) q[c] += qb;
    }
  }
}

// y[o0, o1) += x * col[o0, o1); next: the same span of a later column (prefetched) or null.
template <typename W>
DG_INLINE void axpy_span(const W* col, const W* next, float x, int64_t o0, int64_t o1, float* y) {
  int64_t o = o0;
#ifdef DG_AVX2
  constexpr int64_t per_line = 64 / sizeof(W);
  const __m256 xv = _mm256_set1_ps(x);
  for (; o + 16 <= o1; o += 16) {
    if (next != nullptr && (o - o0) % per_line == 0) prefetch_l2(next + o);
    _mm256_storeu_ps(y + o, _mm256_fmadd_ps(xv, load8(col + o), _mm256_loadu_ps(y + o)));
    _mm256_storeu_ps(y + o + 8, _mm256_fmadd_ps(xv, load8(col + o + 8), _mm256_loadu_ps(y + o + 8)));
  }
#else
  (void)next;
#endif
  for (; o < o1; ++o) y[o] += x * to_float(col[o]);
}

template <int FMT>
void cols_range_t(const Mat& m, const int32_t* idx, const float* xv, int64_t n, int64_t b0, int64_t b1, float* y) {
  const int64_t o0 = b0 * QK, o1 = std::min(b1 * QK, m.out);
  auto column = [&](int64_t k) { return m.data + static_cast<int64_t>(idx[k]) * m.stride; };
  if (!quantized(FMT)) {
    using W = typename std::conditional<FMT == F32, float, uint16_t>::type;
    const int64_t dist = prefetch_dist((o1 - o0) * static_cast<int64_t>(sizeof(W)));
    for (int64_t k = 0; k < std::min(dist, n); ++k)  // the first columns: whole, before the loop
      for (int64_t q = o0 * static_cast<int64_t>(sizeof(W)); q < o1 * static_cast<int64_t>(sizeof(W)); q += 64)
        prefetch_l2(column(k) + q);
    for (int64_t k = 0; k < n; ++k) {
      const W* next = k + dist < n ? reinterpret_cast<const W*>(column(k + dist)) : nullptr;
      axpy_span(reinterpret_cast<const W*>(column(k)), next, xv[k], o0, o1, y);
    }
    return;
  }
  // Chunks of up to kColsChunk blocks: each pass over the active columns reads that part of every column.
  const int64_t nb = nblocks(m.out);
  constexpr int P = kColsPerPass;
  float cs[kColsChunk];
  for (int64_t c0 = b0; c0 < b1; c0 += kColsChunk) {
    const int64_t c1 = std::min(b1, c0 + kColsChunk);
    std::fill(cs, cs + (c1 - c0), 0.0f);
    const int64_t dist = prefetch_dist((c1 - c0) * block_bytes(FMT));
    const int64_t qb = quant_bytes(FMT), s_end = nb * scale_bytes(FMT);
    // Whole short columns (this thread reads every block of them): stream the memory from the first
    // active column to the one `dist` ahead, inactive columns included -- one sequential stream of
    // prefetches reads faster here than scattered sub-KB chunks, and the skipped bytes are few (the gap
    // between active columns is stride / density). Otherwise prefetch the active columns' parts only.
    const bool stream = kStreamColumns && c0 == 0 && c1 == nb && m.stride <= kStreamBelowBytes && n > 0;
    const uint8_t* pf = stream ? column(0) : nullptr;  // next line to prefetch when streaming
    auto stream_to = [&](int64_t k) {  // prefetch up to the end of active column k
      const uint8_t* end = column(std::min(k, n - 1)) + m.stride;
      for (; pf < end; pf += 64) prefetch_l2(pf);
    };
    if (stream) {
      stream_to(std::min<int64_t>(3, n - 1));
    } else {
      for (int64_t k = 0; k < std::min(dist, n); ++k) {  // the first columns, whole
        const uint8_t* p = column(k);
        for (int64_t o = 2 * c0; o < 2 * c1; o += 64) prefetch_l2(p + o);
        if (FMT == Q4_1)
          for (int64_t o = 2 * c0; o < 2 * c1; o += 64) prefetch_l2(p + 2 * nb + o);
        for (int64_t o = c0 * qb; o < c1 * qb; o += 64) prefetch_l2(p + s_end + o);
      }
    }
    const uint8_t* col[P];
    const uint8_t* next[P];
    for (int64_t k = 0; k < n; k += P) {
      const int nc = static_cast<int>(std::min<int64_t>(P, n - k));
      for (int c = 0; c < nc; ++c) {
        col[c] = column(k + c);
        next[c] = !stream && k + c + dist < n ? column(k + c + dist) : nullptr;
      }
      if (stream) stream_to(k + nc - 1 + dist);
      switch (nc) {
        case 4: cols_pass<FMT, (P >= 4 ? 4 : 1)>(col, next, xv + k, nb, c0, c1, cs, y); break;
        case 3: cols_pass<FMT, (P >= 3 ? 3 : 1)>(col, next, xv + k, nb, c0, c1, cs, y); break;
        case 2: cols_pass<FMT, (P >= 2 ? 2 : 1)>(col, next, xv + k, nb, c0, c1, cs, y); break;
        default: cols_pass<FMT, 1>(col, next, xv + k, nb, c0, c1, cs, y); break;
      }
    }
    if (FMT != Q8_0) {
      for (int64_t b = c0; b < c1; ++b) {
        const float c = cs[b - c0];
        for (int o = 0; o < QK; ++o) y[b * QK + o] += c;
      }
    }
  }
}

// y[b0*32, b1*32) = sum_k xv[k] * W[:, idx[k]] over the n active columns (y is overwritten).
inline void cols_range(const Mat& m, const int32_t* idx, const float* xv, int64_t n, int64_t b0, int64_t b1,
                       float* y) {
  if (b1 <= b0) return;
  std::memset(y + b0 * QK, 0, static_cast<size_t>(b1 - b0) * QK * sizeof(float));
  switch (m.fmt) {
    case F32: cols_range_t<F32>(m, idx, xv, n, b0, b1, y); break;
    case BF16: cols_range_t<BF16>(m, idx, xv, n, b0, b1, y); break;
    case Q8_0: cols_range_t<Q8_0>(m, idx, xv, n, b0, b1, y); break;
    case Q4_0: cols_range_t<Q4_0>(m, idx, xv, n, b0, b1, y); break;
    case Q4_1: cols_range_t<Q4_1>(m, idx, xv, n, b0, b1, y); break;
    default: break;
  }
}

// The active channels of x under per-channel thresholds t (null: every channel): not |x_i| < t_i
// (so NaN passes), and x_i != 0 (a zero channel adds nothing). Returns their count.
inline int64_t select_active(const float* x, const float* t, int64_t n, int32_t* idx, float* xv) {
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    if (v == 0.0f || (t != nullptr && std::fabs(v) < t[i])) continue;
    idx[k] = static_cast<int32_t>(i);
    xv[k++] = v;
  }
  return k;
}

// Split [0, n) into T parts aligned to `align`; part t.
inline void split(int64_t n, int64_t align, int t, int T, int64_t* lo, int64_t* hi) {
  const int64_t units = (n + align - 1) / align;
  *lo = std::min(n, units * t / T * align);
  *hi = std::min(n, units * (t + 1) / T * align);
}

int simd_level() {
#if defined(DG_VNNI)
  return 2;
#elif defined(DG_AVX2)
  return 1;
#else
  return 0;
#endif
}

}  // namespace dg

extern "C" {

// 2: AVX512-VNNI, 1: AVX2/FMA, 0: scalar.
int dormant_gemv_simd() { return dg::simd_level(); }

// q [nb*32], d [nb], s [nb] for nb = ceil(n / 32): the x side of the integer dots.
void dormant_gemv_quantize_x(const float* x, int64_t n, int8_t* q, float* d, int32_t* s) {
  std::vector<float> ds(static_cast<size_t>(dg::nblocks(n)));
  dg::XQ xq{q, d, s, ds.data(), dg::nblocks(n)};
  dg::quantize_x(x, n, xq);
}

// y[out] = W x (rows layout), or, when gather != 0, y[k] = W[rows[k]] . x for k < n_rows.
// Returns 0, -1 (bad format/layout) or -2 (row index out of range).
int64_t dormant_gemv_rows(const void* w, int64_t out, int64_t in, int32_t fmt, const float* x, const int64_t* rows,
                          int64_t n_rows, int32_t gather, float* y, int32_t n_threads) {
  if (!dg::valid_fmt(fmt)) return -1;
  const dg::Mat m = dg::make_mat(w, out, in, fmt, dg::ROWS);
  std::vector<int32_t> idx;
  if (gather) {
    idx.resize(static_cast<size_t>(n_rows));
    for (int64_t k = 0; k < n_rows; ++k) {
      if (rows[k] < 0 || rows[k] >= out) return -2;
      idx[k] = static_cast<int32_t>(rows[k]);
    }
  }
  dg::XQBuf buf;
  const dg::XQ xq = buf.view(in);
  if (dg::quantized(fmt)) dg::quantize_x(x, in, xq);
  const int64_t n = gather ? n_rows : out;
#pragma omp parallel num_threads(n_threads > 0 ? n_threads : 1)
  {
    int64_t lo, hi;
    dg::split(n, 1, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    if (gather) dg::gather_range(m, x, xq, idx.data(), lo, hi, y);
    else dg::rows_range(m, x, xq, lo, hi, y);
  }
  return 0;
}

// y[out] = sum_{i active} x_i W[:, i] (cols layout), active = not |x_i| < t_i and x_i != 0 (t null: all).
// y_pad must hold ceil(out / 32) * 32 floats. Threads split the output blocks (split_columns = 0) or
// the active columns (1: each thread reads whole columns into a private y, summed in thread order).
// Returns the number of active columns, or -1.
int64_t dormant_gemv_cols(const void* w, int64_t out, int64_t in, int32_t fmt, const float* x, const float* t,
                          float* y_pad, int32_t n_threads, int32_t split_columns) {
  if (!dg::valid_fmt(fmt)) return -1;
  const dg::Mat m = dg::make_mat(w, out, in, fmt, dg::COLS);
  std::vector<int32_t> idx(static_cast<size_t>(in));
  std::vector<float> xv(static_cast<size_t>(in));
  const int64_t n = dg::select_active(x, t, in, idx.data(), xv.data());
  const int64_t nbo = dg::nblocks(out), T = n_threads > 0 ? n_threads : 1;
  std::vector<float> part(split_columns ? static_cast<size_t>(T * nbo * dg::QK) : 0);
#pragma omp parallel num_threads(T)
  {
    const int th = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t lo, hi;
    if (split_columns) {
      dg::split(n, 1, th, nt, &lo, &hi);
      dg::cols_range(m, idx.data() + lo, xv.data() + lo, hi - lo, 0, nbo, part.data() + th * nbo * dg::QK);
#pragma omp barrier
      dg::split(nbo * dg::QK, dg::QK, th, nt, &lo, &hi);
      for (int64_t o = lo; o < hi; ++o) {
        float v = 0.0f;
        for (int k = 0; k < nt; ++k) v += part[k * nbo * dg::QK + o];
        y_pad[o] = v;
      }
    } else {
      dg::split(nbo, 1, th, nt, &lo, &hi);
      dg::cols_range(m, idx.data(), xv.data(), n, lo, hi, y_pad);
    }
  }
  return n;
}
}
