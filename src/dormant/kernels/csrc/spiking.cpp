// Integrate-and-fire recursion of a spiking layer over T steps, fused: one pass over the input currents.
// Specification: dormant/kernels/spiking_reference.py (the step-by-step torch loop); the Python side
// (dormant/kernels/spiking.py) builds this file once per machine and calls it through ctypes.
//
// Per element of a [N, C, S] membrane and step t (reset by subtraction, H(0) = 1):
//     d = x[t] + beta[t, c]      (skipped when there is no beta: d = x[t])
//     v = v + d
//     o[t] = v >= theta[c] ? theta[c] : 0
//     v = v - o[t]
// The same IEEE float32 additions in the same order as the reference, so the outputs are identical bit for
// bit (there are no products to contract into FMAs). x is [T, N, C, S] with step stride `x_tstride`
// elements: N*C*S for a time-varying input, 0 for one that is the same at every step (the analog image's
// first layer), which is then read once from cache instead of being copied T times.
//
// Threads split the (n, c) rows; a row keeps its S membranes in registers/L1 across the T steps, so the
// membrane is read and written once per call instead of once per step. For S < 8 (linear layers) rows
// would be too short to vectorise: threads split n and the inner loop runs over channels.

#include <omp.h>

#include <cstdint>

namespace {

inline void if_row(const float* x, int64_t x_tstride, const float* beta, int64_t beta_tstride, float th,
                   float* v, float* out, int64_t out_tstride, int64_t T, int64_t S) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * x_tstride;
    float* ot = out + t * out_tstride;
    if (beta) {
      const float b = beta[t * beta_tstride];
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) {
        const float d = xt[s] + b;
        const float m = v[s] + d;
        const float o = m >= th ? th : 0.0f;
        ot[s] = o;
        v[s] = m - o;
      }
    } else {
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) {
        const float m = v[s] + xt[s];
        const float o = m >= th ? th : 0.0f;
        ot[s] = o;
        v[s] = m - o;
      }
    }
  }
}

}  // namespace

extern "C" {

// x: [T, N, C, S] with step stride x_tstride (0: the same input at every step); beta: [T, C] or null;
// theta: [C]; v: [N, C, S] membranes (in: v[t0], out: v[t0 + T]); out: [T, N, C, S] contiguous.
void dormant_if_forward(const float* x, int64_t x_tstride, const float* beta, const float* theta, float* v,
                        float* out, int64_t T, int64_t N, int64_t C, int64_t S, int32_t threads) {
  const int64_t step = N * C * S;
  if (S >= 8) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < N * C; ++r) {
      const int64_t c = r % C;
      if_row(x + r * S, x_tstride, beta ? beta + c : nullptr, C, theta[c], v + r * S, out + r * S, step, T, S);
    }
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * x_tstride + n * C * S;
      float* ot = out + t * step + n * C * S;
      float* vn = v + n * C * S;
      for (int64_t c = 0; c < C; ++c) {
        const float th = theta[c];
        const float b = beta ? beta[t * C + c] : 0.0f;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = c * S + s;
          const float d = beta ? xt[i] + b : xt[i];
          const float m = vn[i] + d;
          const float o = m >= th ? th : 0.0f;
          ot[i] = o;
          vn[i] = m - o;
        }
      }
    }
  }
}

// FTBC's probe of one step: diff = (v + (x + beta) >= theta ? theta : 0) - target, v unchanged.
// x, v, target, diff: [N, C, S]; beta: [C] or null.
void dormant_if_probe(const float* x, const float* beta, const float* theta, const float* v,
                      const float* target, float* diff, int64_t N, int64_t C, int64_t S, int32_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < N * C; ++r) {
    const int64_t c = r % C;
    const float th = theta[c];
    const float b = beta ? beta[c] : 0.0f;
    const float* xr = x + r * S;
    const float* vr = v + r * S;
    const float* tr = target + r * S;
    float* dr = diff + r * S;
#pragma omp simd
    for (int64_t s = 0; s < S; ++s) {
      const float d = beta ? xr[s] + b : xr[s];
      const float m = vr[s] + d;
      dr[s] = (m >= th ? th : 0.0f) - tr[s];
    }
  }
}

// Non-zero elements of each of T rows of `per_step` floats (spike counts for the monitors): counts[t].
void dormant_count_nonzero(const float* x, int64_t T, int64_t per_step, int64_t* counts, int32_t threads) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * per_step;
    int64_t total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(threads)
    for (int64_t i = 0; i < per_step; ++i) total += xt[i] != 0.0f;
    counts[t] = total;
  }
}

}  // extern "C"
