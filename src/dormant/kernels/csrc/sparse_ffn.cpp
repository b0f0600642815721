// Sparse gated-FFN decode for one token on the CPU: y = down(h), h_i = act(gate_i . x) * (up_i . x),
// touching only the rows of active neurons. Specification: dormant/kernels/reference.py; the Python
// side (dormant/kernels/cpu.py) builds this file once per machine and calls it through ctypes.
//
// Weights: neuron i's gate row, up row and down column are contiguous rows of D elements at
// base + i * stride (down is stored neuron-major, i.e. down^T). Element types: float32 or bfloat16
// (bf16 <-> fp32 by 16-bit shifts). Accumulation is in fp32; the intermediates g, act(g), u and h are
// rounded to the weight dtype where the dense Hugging Face module rounds them, and thresholds zero
// |v| < T exactly as dormant.llm.sparsify does (so NaN passes and T = 0 is a no-op).
//
// Two modes:
//   gate-first (gate_first != 0, active ignored): phase 1 computes g for all I neurons (and u too when the MID
//     threshold is set, since |act(g) * u| needs u), keeps neurons whose activation survives; phase 2
//     reads the up row (if not yet read) and the down row of the survivors only.
//   given set (gate_first == 0): strictly increasing neuron indices from a predictor or an oracle;
//     only those neurons' gate, up and down rows are read (thresholds still apply).
// Neurons are processed 4 at a time (x and the y accumulator are loaded once per chunk for 4 rows, and
// 4 row streams are in flight); while one set of rows streams, the next set (gate -> up -> down -> the
// next group) is prefetched into L2 at the same offset (-DDORMANT_NO_PREFETCH turns this off for A/B).
// Threads (OpenMP, the runtime torch already loaded) split neurons; each keeps a private fp32
// partial of y, summed at the end. Layers under 1 MiB of weights per thread use fewer threads.

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DORMANT_AVX2 1
#endif

namespace {

enum DType : int { F32 = 0, BF16 = 1 };
enum Act : int { SILU = 0, GELU_TANH = 1 };

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }

template <typename W>
inline float round_to(float v);
template <>
inline float round_to<float>(float v) { return v; }
template <>
inline float round_to<uint16_t>(float v) { return bf16_to_f32(f32_to_bf16(v)); }

template <typename W>
inline void store(W* p, float v);
template <>
inline void store<float>(float* p, float v) { *p = v; }
template <>
inline void store<uint16_t>(uint16_t* p, float v) { *p = f32_to_bf16(v); }

inline float zero_below(float v, float t) { return std::fabs(v) < t ? 0.0f : v; }

inline float activation(float g, int act) {
  if (act == SILU) return g / (1.0f + std::exp(-g));
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * g * (1.0f + std::tanh(k * (g + 0.044715f * g * g * g)));
}

#ifdef DORMANT_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

constexpr int kGroup = 4;                        // neurons processed together
constexpr int64_t kMinBytesPerThread = 1 << 20;  // dense weight bytes per thread below which threads are not worth it

// Rows to be read next. While a loop streams its rows it prefetches these at the same offset, so the
// next rows (another neuron's, scattered in memory) arrive while the current ones are being used.
template <typename W>
struct Next {
  const W* rows[kGroup];
  int count = 0;
  void add(const W* p) { rows[count++] = p; }
};

template <typename W>
inline void prefetch(const Next<W>& nx, int64_t i) {
#if defined(DORMANT_AVX2) && !defined(DORMANT_NO_PREFETCH)  // -DDORMANT_NO_PREFETCH: for A/B timing
  for (int q = 0; q < nx.count; ++q) _mm_prefetch(reinterpret_cast<const char*>(nx.rows[q] + i), _MM_HINT_T1);
#endif
}

// out[r] = sum_d rows[r][d] * x[d] for R rows at once (x is loaded once per chunk; R streams in flight).
template <typename W, int R>
void dot_rows(const W* const* rows, const float* x, int64_t n, float* out, const Next<W>& nx) {
  int64_t i = 0;
  for (int r = 0; r < R; ++r) out[r] = 0.0f;
#ifdef DORMANT_AVX2
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    prefetch(nx, i);
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_fmadd_ps(load8(rows[r] + i), x0, a0[r]);
      a1[r] = _mm256_fmadd_ps(load8(rows[r] + i + 8), x1, a1[r]);
    }
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + i);
    for (int r = 0; r < R; ++r) a0[r] = _mm256_fmadd_ps(load8(rows[r] + i), x0, a0[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(a0[r], a1[r]));
#endif
  for (; i < n; ++i)
    for (int r = 0; r < R; ++r) out[r] += to_f32(rows[r][i]) * x[i];
}

// acc[d] += sum_r h[r] * rows[r][d] (acc is loaded and stored once per chunk for all R rows).
template <typename W, int R>
void axpy_rows(float* acc, const float* h, const W* const* rows, int64_t n, const Next<W>& nx) {
  int64_t i = 0;
#ifdef DORMANT_AVX2
  __m256 hv[R];
  for (int r = 0; r < R; ++r) hv[r] = _mm256_set1_ps(h[r]);
  for (; i + 16 <= n; i += 16) {
    prefetch(nx, i);
    __m256 a = _mm256_loadu_ps(acc + i), b = _mm256_loadu_ps(acc + i + 8);
    for (int r = 0; r < R; ++r) {
      a = _mm256_fmadd_ps(hv[r], load8(rows[r] + i), a);
      b = _mm256_fmadd_ps(hv[r], load8(rows[r] + i + 8), b);
    }
    _mm256_storeu_ps(acc + i, a);
    _mm256_storeu_ps(acc + i + 8, b);
  }
  for (; i + 8 <= n; i += 8) {
    __m256 a = _mm256_loadu_ps(acc + i);
    for (int r = 0; r < R; ++r) a = _mm256_fmadd_ps(hv[r], load8(rows[r] + i), a);
    _mm256_storeu_ps(acc + i, a);
  }
#endif
  for (; i < n; ++i) {
    float a = acc[i];
    for (int r = 0; r < R; ++r) a += h[r] * to_f32(rows[r][i]);
    acc[i] = a;
  }
}

template <typename W>
void dot_n(const W* const* rows, int count, const float* x, int64_t n, float* out, const Next<W>& nx) {
  switch (count) {
    case 4: dot_rows<W, 4>(rows, x, n, out, nx); break;
    case 3: dot_rows<W, 3>(rows, x, n, out, nx); break;
    case 2: dot_rows<W, 2>(rows, x, n, out, nx); break;
    case 1: dot_rows<W, 1>(rows, x, n, out, nx); break;
    default: break;
  }
}

template <typename W>
void axpy_n(float* acc, const float* h, const W* const* rows, int count, int64_t n, const Next<W>& nx) {
  switch (count) {
    case 4: axpy_rows<W, 4>(acc, h, rows, n, nx); break;
    case 3: axpy_rows<W, 3>(acc, h, rows, n, nx); break;
    case 2: axpy_rows<W, 2>(acc, h, rows, n, nx); break;
    case 1: axpy_rows<W, 1>(acc, h, rows, n, nx); break;
    default: break;
  }
}

struct Args {
  const void *gate, *up, *down;
  int64_t sg, su, sd;  // row strides in elements
  const void* x;
  void* y;
  int64_t D, I;
  const int64_t* active;
  int64_t n_active;
  bool gate_first;
  float t_gate, t_up, t_act, t_mid, t_out;  // already rounded to the weight dtype by the caller
  int act, n_threads;
};

// Scratch of the calling thread, reused across calls (OpenMP workers write into it by index).
struct Scratch {
  std::vector<float> x, a, h, partial;
  std::vector<int64_t> idx, counts;
};
thread_local Scratch scratch;

template <typename W>
int64_t run(const Args& p) {
  const W* gate = static_cast<const W*>(p.gate);
  const W* up = static_cast<const W*>(p.up);
  const W* down = static_cast<const W*>(p.down);
  const int64_t D = p.D, I = p.I;
  const bool gate_first = p.gate_first;
  const bool need_all_u = gate_first && p.t_mid > 0.0f;  // the MID test needs u of every neuron
  // Small layers run on fewer threads: waking a thread costs more than streaming ~1 MiB of weights.
  const int64_t max_threads = (3 * D * I * static_cast<int64_t>(sizeof(W))) / kMinBytesPerThread;
  int nt = p.n_threads > 0 ? p.n_threads : 1;
  if (nt > max_threads) nt = max_threads > 1 ? static_cast<int>(max_threads) : 1;
  const int64_t dpad = (D + 15) / 16 * 16;  // keep each thread's partial on its own cache lines

  Scratch& s = scratch;
  s.x.resize(D);
  s.partial.resize(static_cast<size_t>(nt) * dpad);
  s.counts.assign(nt + 1, 0);
  if (gate_first) {
    s.a.resize(I);
    s.h.resize(I);
    s.idx.resize(I);
  }
  const W* xw = static_cast<const W*>(p.x);
  for (int64_t d = 0; d < D; ++d) s.x[d] = to_f32(xw[d]);
  float* xs = s.x.data();
  float* a_buf = s.a.data();
  float* h_buf = s.h.data();
  int64_t* idx = s.idx.data();
  int64_t* counts = s.counts.data();
  float* partial = s.partial.data();
  int64_t n_list = gate_first ? 0 : p.n_active;
  const int64_t* list = gate_first ? idx : p.active;
  int64_t n_used = 0;

#pragma omp parallel num_threads(nt) reduction(+ : n_used)
  {
    const int t = omp_get_thread_num();
    const int T = omp_get_num_threads();
    const W* rows[kGroup];
    float v[kGroup];
    int64_t js[kGroup];
    if (gate_first) {
      // Phase 1: every neuron's gate (and up, for the MID test); survivors go to idx[lo, lo + cnt).
      const int64_t lo = I * t / T, hi = I * (t + 1) / T;
      int64_t cnt = 0;
      for (int64_t j0 = lo; j0 < hi; j0 += kGroup) {
        const int m = static_cast<int>(hi - j0 < kGroup ? hi - j0 : kGroup);
        Next<W> nx;  // the next group's gate rows
        for (int64_t j = j0 + kGroup; j < j0 + 2 * kGroup && j < hi; ++j) nx.add(gate + j * p.sg);
        for (int r = 0; r < m; ++r) rows[r] = gate + (j0 + r) * p.sg;
        float g[kGroup];
        dot_n(rows, m, xs, D, g, nx);
        int c = 0;
        for (int r = 0; r < m; ++r) {
          const float a = zero_below(round_to<W>(activation(zero_below(round_to<W>(g[r]), p.t_gate), p.act)), p.t_act);
          if (a == 0.0f) continue;  // h = 0 whatever u is (finite weights)
          a_buf[j0 + r] = a;
          js[c++] = j0 + r;
        }
        if (need_all_u && c > 0) {
          for (int r = 0; r < c; ++r) rows[r] = up + js[r] * p.su;
          dot_n(rows, c, xs, D, v, Next<W>{});
        }
        for (int r = 0; r < c; ++r) {
          if (need_all_u) {
            const float h = zero_below(round_to<W>(a_buf[js[r]] * zero_below(round_to<W>(v[r]), p.t_up)), p.t_mid);
            if (h == 0.0f) continue;
            h_buf[js[r]] = h;
          }
          idx[lo + cnt++] = js[r];
        }
      }
      counts[t + 1] = cnt;
#pragma omp barrier
#pragma omp single
      {
        // Compact the per-thread segments into one list; destinations never overtake sources.
        int64_t n = 0;
        for (int k = 0; k < T; ++k) {
          const int64_t seg = I * k / T, c = counts[k + 1];
          if (seg != n) std::memmove(idx + n, idx + seg, static_cast<size_t>(c) * sizeof(int64_t));
          n += c;
        }
        n_list = n;
      }  // implicit barrier
    }

    // Phase 2: this thread's share of the list -> private partial of y, kGroup neurons at a time.
    float* acc = partial + t * dpad;
    std::memset(acc, 0, static_cast<size_t>(D) * sizeof(float));
    const int64_t k0 = n_list * t / T, k1 = n_list * (t + 1) / T;
    // Prefetch chain within a group: gate rows -> up rows -> down rows -> the next group's first rows.
    auto first_rows = [&](int64_t kb, Next<W>& nx) {
      for (int64_t k = kb; k < kb + kGroup && k < k1; ++k) {
        const int64_t j = list[k];
        nx.add(need_all_u ? down + j * p.sd : gate_first ? up + j * p.su : gate + j * p.sg);
      }
    };
    for (int64_t kb = k0; kb < k1; kb += kGroup) {
      const int m = static_cast<int>(k1 - kb < kGroup ? k1 - kb : kGroup);
      float h[kGroup], a[kGroup];
      int c = 0;
      if (need_all_u) {
        for (int r = 0; r < m; ++r) {
          js[r] = list[kb + r];
          h[r] = h_buf[js[r]];
        }
        c = m;
      } else {
        if (gate_first) {
          for (int r = 0; r < m; ++r) {
            js[r] = list[kb + r];
            a[r] = a_buf[js[r]];
          }
          c = m;
        } else {
          Next<W> nx;
          for (int r = 0; r < m; ++r) {
            rows[r] = gate + list[kb + r] * p.sg;
            nx.add(up + list[kb + r] * p.su);
          }
          dot_n(rows, m, xs, D, v, nx);
          for (int r = 0; r < m; ++r) {
            const float ar = zero_below(round_to<W>(activation(zero_below(round_to<W>(v[r]), p.t_gate), p.act)), p.t_act);
            if (ar == 0.0f) continue;
            js[c] = list[kb + r];
            a[c++] = ar;
          }
        }
        Next<W> nx;
        for (int r = 0; r < c; ++r) {
          rows[r] = up + js[r] * p.su;
          nx.add(down + js[r] * p.sd);
        }
        dot_n(rows, c, xs, D, v, nx);
        for (int r = 0; r < c; ++r) h[r] = zero_below(round_to<W>(a[r] * zero_below(round_to<W>(v[r]), p.t_up)), p.t_mid);
      }
      int nz = 0;
      for (int r = 0; r < c; ++r) {
        if (h[r] == 0.0f) continue;
        h[nz] = h[r];
        rows[nz++] = down + js[r] * p.sd;
      }
      Next<W> nx;
      first_rows(kb + kGroup, nx);
      axpy_n(acc, h, rows, nz, D, nx);
      n_used += nz;
    }
#pragma omp barrier
    // Sum the partials over threads, round, apply the OUT threshold; threads split d.
    W* y = static_cast<W*>(p.y);
    const int64_t d0 = D * t / T, d1 = D * (t + 1) / T;
    for (int64_t d = d0; d < d1; ++d) {
      float v = 0.0f;
      for (int r = 0; r < T; ++r) v += partial[r * dpad + d];
      store<W>(y + d, zero_below(round_to<W>(v), p.t_out));
    }
  }
  return n_used;
}

}  // namespace

extern "C" {

// Returns the number of neurons whose down row was read (>= 0), or a negative error code:
// -1 unknown dtype, -2 active indices out of range or not strictly increasing.
int64_t dormant_sparse_ffn(const void* gate, const void* up, const void* down, int64_t stride_gate,
                           int64_t stride_up, int64_t stride_down, const void* x, void* y, int64_t D, int64_t I,
                           const int64_t* active, int64_t n_active, int gate_first, float t_gate, float t_up,
                           float t_act, float t_mid, float t_out, int dtype, int act, int n_threads) {
  if (!gate_first) {
    for (int64_t k = 0; k < n_active; ++k) {
      if (active[k] < 0 || active[k] >= I || (k > 0 && active[k] <= active[k - 1])) return -2;
    }
  }
  Args p{gate, up, down, stride_gate, stride_up, stride_down, x, y, D, I, active, n_active, gate_first != 0,
         t_gate, t_up, t_act, t_mid, t_out, act, n_threads};
  if (dtype == F32) return run<float>(p);
  if (dtype == BF16) return run<uint16_t>(p);
  return -1;
}

int dormant_sparse_ffn_simd() {
#ifdef DORMANT_AVX2
  return 1;
#else
  return 0;
#endif
}
}
