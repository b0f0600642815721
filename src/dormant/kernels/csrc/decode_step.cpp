// One decode step of a pre-norm decoder-only transformer, in one C call: token -> logits.
// Specification: dormant/llm/decode/reference.py (the same step in torch); the Python side
// (dormant/kernels/decode_step.py) builds this file, describes the weights with ctypes structs and
// calls dormant_decode_step once per token.
//
// The block (Llama / Mistral / Qwen2 / Qwen3 / Gemma shapes; the caller folds Gemma's 1 + w into the
// norm weights and its sqrt(d) into emb_scale):
//   x = emb[token] * emb_scale
//   per layer:  a = rmsnorm(x) * w_attn;  q, k, v = Wq a (+bq), Wk a (+bk), Wv a (+bv)
//               [q, k = rmsnorm per head * w_qn / w_kn]; q, k = rope(q, k, pos); cache[pos] = k, v
//               o = softmax(q K^T * scale) V per head (GQA: head h reads kv head h / (H / H_kv))
//               x += Wo o (+bo);  f = rmsnorm(x) * w_ffn
//               g = Wg f; u = Wu f; h = act(g) * u; x += Wd h
//   logits = W_head (rmsnorm(x) * w_final)   (W_head in cols: only input channels with not |x_i| < t_i)
// with the sparsity of the step's plan: a projection whose weight is in the cols layout reads only
// the input channels with not |x_i| < t_i (its threshold vector); the FFN "mid" threshold zeroes
// |h| < mid before down (down in cols reads only the survivors); the "act" threshold (CATS) zeroes
// |act(g)| < act, then only the surviving up rows (a row gather) and down columns are read.
//
// Threads: one OpenMP parallel region per step (the runtime torch loaded), barriers between
// dependent phases. Each GEMV splits its output rows (rows layout) or output blocks (cols layout)
// over the threads; norms, input quantisation and active-channel lists are tiny and computed by every
// thread into its own scratch, which saves a barrier each. Attention splits heads.
// KV cache: fp32 [slots][layers][2][kv_heads][max_seq][head_dim], preallocated by the caller.

#include <chrono>

#include "gemv.cpp"

namespace dstep {

using namespace dg;

// ctypes mirrors (dormant/kernels/decode_step.py) ------------------------------------------------

struct MatDesc {
  const void* data;
  int64_t out, in;
  int32_t fmt, layout;
  const float* thr;   // [in] input thresholds (cols layout) or null (every channel)
  const float* bias;  // [out] or null
};

struct LayerDesc {
  const float* attn_norm;
  const float* ffn_norm;
  const float* q_norm;  // [head_dim] or null
  const float* k_norm;
  MatDesc q, k, v, o, gate, up, down;
  float mid;  // FFN intermediate threshold (0: off)
  float act;  // act(gate) threshold, CATS (0: off)
  // Fused cols weights (data null: not fused): [q | k | v] and [gate | up] stacked along the output, one
  // longer column per input channel (their inputs share one threshold vector). q/k/v (gate/up) are then
  // empty and the fused bias holds [bq | bk | bv].
  MatDesc qkv, gate_up;
};

struct ModelDesc {
  int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, inter, vocab, max_seq;
  float eps, emb_scale, attn_scale;
  int32_t act_fn;  // 0 silu, 1 gelu_tanh
  MatDesc emb;     // [vocab, dim], rows layout
  MatDesc head;    // [vocab, dim], rows layout, or cols with input thresholds (a cols copy when tied)
  const float* final_norm;
  const float* rope_cos;  // [max_seq, head_dim]
  const float* rope_sin;
  const LayerDesc* layers;
};

// Optional per-layer tensors recorded during a step (calibration): null pointers are skipped.
struct TraceDesc {
  float* attn_in;  // [n_layers, dim]    input of q/k/v (after the norm)
  float* o_in;     // [n_layers, H * hd] input of o (attention output)
  float* ffn_in;   // [n_layers, dim]    input of gate/up
  float* act;      // [n_layers, inter]  act(gate), before the act threshold
  float* mid;      // [n_layers, inter]  act(g) * u, before the mid threshold (the input of down)
};

enum Proj { PQ = 0, PK, PV, PO, PGATE, PUP, PDOWN, NPROJ };

// Phases of a step timed by thread 0 when profiling (each ends at a barrier, so waiting for the
// slowest thread is included): see PHASES in decode_step.py.
enum Phase { T_QKV = 0, T_ROPE, T_ATTN, T_O, T_GATE_UP, T_ACT, T_DOWN, T_HEAD, NPHASE };

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Engine state ---------------------------------------------------------------------------------

struct Scratch {  // one per thread
  std::vector<float> xn, xr;  // normed input; the residual stream as this thread sees it
  XQBuf xq;
  std::vector<int32_t> idx;
  std::vector<float> xv;
  std::vector<float> scores;
};

struct Engine {
  ModelDesc m;
  std::vector<LayerDesc> layers;
  float* kv;
  int64_t n_slots;
  std::vector<float> x, x_alt, q, k, v, att, ybuf, g, u, h, hc, qkv, gu;
  // Per-thread partial outputs of column-split cols projections: out (q/k/v, gate/up; summed by their
  // consumer phase) and res (o, down; summed into the residual stream by the next norm).
  std::vector<float> part_out, part_res;
  int64_t w_out = 0, w_res = 0, n_part = 0;
  int32_t split_mode = 2;  // column split: 0 never, 1 always (threads > 1), 2 auto (short per-thread parts)
  std::vector<Scratch> scratch;
  std::vector<int64_t> counts;  // [n_layers][NPROJ] + [1] (the LM head) channels (cols) / rows (gather) read
  int64_t steps = 0;
  bool profile = false;
  int64_t phase_ns[NPHASE] = {0};
};

inline int64_t pad(int64_t n) { return nblocks(n) * QK; }

inline Mat mat(const MatDesc& d) { return make_mat(d.data, d.out, d.in, d.fmt, d.layout); }

inline void rmsnorm(const float* x, const float* w, int64_t n, float eps, float* out) {
  float ss = 0.0f;
  int64_t i = 0;
#ifdef DG_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  ss = hsum(acc);
#endif
  for (; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t j = 0; j < n; ++j) out[j] = (x[j] * inv) * w[j];
}

inline float activation(float g, int32_t fn) {
  if (fn == 0) return g / (1.0f + std::exp(-g));
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * g * (1.0f + std::tanh(c * (g + 0.044715f * g * g * g)));
}

#ifdef DG_AVX2
// e^x for 8 floats: 2^n e^r with n = rint(x / ln 2), r = x - n ln 2 (ln 2 split in two), e^r by the
// Cephes expf polynomial (about 1 ulp); x clamped to [-87.3, 88.3] (no inf, no denormal results).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// act(g) for 8 floats: silu g / (1 + e^-g); gelu_tanh 0.5 g (1 + tanh(z)), tanh(z) = 1 - 2 / (1 + e^2z).
inline __m256 activation8(__m256 g, int32_t fn) {
  const __m256 one = _mm256_set1_ps(1.0f);
  if (fn == 0) return _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
  const __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                 _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), g), _mm256_mul_ps(g, g), g));
  const __m256 th = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(one, exp8(_mm256_add_ps(z, z)))));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), g), _mm256_add_ps(one, th));
}

inline __m256 zero_below8(__m256 v, float t) {  // |v| < t -> 0 (NaN is kept: the compare is false)
  const __m256 small = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), v), _mm256_set1_ps(t), _CMP_LT_OQ);
  return _mm256_andnot_ps(small, v);
}
#endif

// FFN middle over [i0, i1) (i0 a multiple of 8; buffers padded to whole blocks, so the vector loop may
// run past i1 up to the next multiple of 8 -- only the last thread's range is not a multiple of 8):
//   plain:  h = Z(act(g) * u, mid)            CATS (u == null):  h = Z(act(g), act)
// a_out / h_out (trace, may be null) get act(g) and the unthresholded h.
inline void ffn_middle(const float* g, const float* u, int64_t i0, int64_t i1, float thr, int32_t fn, float* h,
                       float* a_out, float* h_out) {
#ifdef DG_AVX2
  for (int64_t i = i0; i < i1; i += 8) {
    const __m256 a = activation8(_mm256_loadu_ps(g + i), fn);
    const __m256 hv = u != nullptr ? _mm256_mul_ps(a, _mm256_loadu_ps(u + i)) : a;
    float tmp_a[8], tmp_h[8];
    if (a_out != nullptr || h_out != nullptr) {
      _mm256_storeu_ps(tmp_a, a);
      _mm256_storeu_ps(tmp_h, hv);
      for (int j = 0; j < 8 && i + j < i1; ++j) {
        if (a_out != nullptr) a_out[i + j] = tmp_a[j];
        if (h_out != nullptr) h_out[i + j] = tmp_h[j];
      }
    }
    _mm256_storeu_ps(h + i, zero_below8(hv, thr));
  }
#else
  for (int64_t i = i0; i < i1; ++i) {
    const float a = activation(g[i], fn);
    const float hv = u != nullptr ? a * u[i] : a;
    if (a_out != nullptr) a_out[i] = a;
    if (h_out != nullptr) h_out[i] = hv;
    h[i] = std::fabs(hv) < thr ? 0.0f : hv;
  }
#endif
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#ifdef DG_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  s = hsum(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Dequantise row r of a rows-layout matrix into out[in] (the embedding lookup).
inline void row_to_float(const Mat& m, int64_t r, float scale, float* out) {
  const uint8_t* row = m.data + r * m.stride;
  if (m.fmt == F32) {
    const float* p = reinterpret_cast<const float*>(row);
    for (int64_t i = 0; i < m.in; ++i) out[i] = p[i] * scale;
  } else if (m.fmt == BF16) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(row);
    for (int64_t i = 0; i < m.in; ++i) out[i] = bf16_to_float(p[i]) * scale;
  } else {
    const int64_t bb = block_bytes(m.fmt);
    for (int64_t i = 0; i < m.in; ++i) {
      const uint8_t* blk = row + (i / QK) * bb;
      const int j = static_cast<int>(i % QK);
      float w;
      if (m.fmt == Q8_0) {
        w = f16_at(blk) * static_cast<float>(reinterpret_cast<const int8_t*>(blk + 2)[j]);
      } else {
        const uint8_t* qs = blk + (m.fmt == Q4_0 ? 2 : 4);
        const int q = j < 16 ? (qs[j] & 15) : (qs[j - 16] >> 4);
        w = m.fmt == Q4_0 ? f16_at(blk) * static_cast<float>(q - 8) : f16_at(blk) * static_cast<float>(q) + f16_at(blk + 2);
      }
      out[i] = w * scale;
    }
  }
}

// This thread's share of y = W x (+ bias) for one projection. rows: output rows [lo, hi); cols:
// output blocks, y padded. x: the input (shared or this thread's copy); s.xq already holds x
// quantised when W is rows + quantised; for cols, s.idx / s.xv / n_act hold the active channels.
inline void project(const MatDesc& d, const float* x, const Scratch& s, const XQ& xq, int64_t n_act, int t, int T,
                    float* y, int64_t* lo_out, int64_t* hi_out) {
  const Mat m = mat(d);
  int64_t lo, hi;
  if (d.layout == ROWS) {
    split(d.out, 1, t, T, &lo, &hi);
    rows_range(m, x, xq, lo, hi, y);
  } else {
    int64_t b0, b1;
    split(nblocks(d.out), 1, t, T, &b0, &b1);
    cols_range(m, s.idx.data(), s.xv.data(), n_act, b0, b1, y);
    lo = std::min(d.out, b0 * QK);
    hi = std::min(d.out, b1 * QK);
  }
  if (d.bias != nullptr)
    for (int64_t r = lo; r < hi; ++r) y[r] += d.bias[r];
  *lo_out = lo;
  *hi_out = hi;
}

// Prepare this thread's view of an input x[n] for the projections that read it: the quantisation
// (if any rows-layout quantised weight reads it) and, per cols-layout weight, the active list.
inline bool needs_xq(const MatDesc& d) { return d.layout == ROWS && quantized(d.fmt); }

inline int64_t active_of(const MatDesc& d, const float* x, Scratch& s) {
  return select_active(x, d.thr, d.in, s.idx.data(), s.xv.data());
}

// Column split: threads divide a cols projection's active columns (each reads whole columns into a
// private partial y) instead of its output blocks, when a thread's part of each column would be short:
// measured here, scattered sub-KB chunks read at well under half the sequential bandwidth, and longer
// chunks read better. The partials are summed in thread order by the phase that consumes the output.
constexpr int64_t kSplitBelowBlocks = 64;  // auto: split when a thread's part is < 64 blocks (2048 outputs)

inline bool column_split(const Engine& e, const MatDesc& d, int T) {
  if (d.layout != COLS || T < 2 || e.split_mode == 0) return false;
  return e.split_mode == 1 || nblocks(d.out) / T < kSplitBelowBlocks;
}

void run_step(Engine& e, int64_t token, int64_t pos, int64_t slot, float* logits, int T, const TraceDesc* tr) {
  const ModelDesc& M = e.m;
  const int64_t D = M.dim, H = M.n_heads, HK = M.n_kv_heads, hd = M.head_dim, I = M.inter;
  const int64_t Hd = H * hd, KVd = HK * hd, group = H / HK;
  float* kv_slot = e.kv + slot * M.n_layers * 2 * HK * M.max_seq * hd;
  float *A = e.att.data(), *Y = e.ybuf.data();
  float *Hh = e.h.data(), *HC = e.hc.data();
  const float* cosp = M.rope_cos + pos * hd;
  const float* sinp = M.rope_sin + pos * hd;
  int64_t* counts = e.counts.data();
  const bool prof = e.profile;
  int64_t* phase_ns = e.phase_ns;
  float* part_out = e.part_out.data();
  float* part_res = e.part_res.data();
  const int64_t w_out = e.w_out, w_res = e.w_res;

#pragma omp parallel num_threads(T)
  {
    const int t = omp_get_thread_num();
    const int TT = omp_get_num_threads();
    Scratch& s = e.scratch[t];
    // The residual stream: X, or, while `pending`, X + sum of the partials of a column-split o / down
    // (+ its bias); every thread then adds them up itself and writes its slice into X_alt, and after the
    // next barrier X_alt becomes X. All threads take the same branches, so the swaps stay in step.
    float* X = e.x.data();
    float* X_alt = e.x_alt.data();
    bool pending = false;
    const float* pending_bias = nullptr;
    float *Q, *K, *V, *G, *U;  // this layer's q/k/v and gate/up outputs
    int64_t t_mark = prof && t == 0 ? now_ns() : 0;
    auto mark = [&](int phase) {  // thread 0, after a barrier: time since the previous mark
      if (prof && t == 0) {
        const int64_t n = now_ns();
        phase_ns[phase] += n - t_mark;
        t_mark = n;
      }
    };
    auto residual_in = [&]() -> const float* {  // the current residual stream, full width
      if (!pending) return X;
      int64_t d0, d1;
      split(D, 1, t, TT, &d0, &d1);
      for (int64_t j = 0; j < D; ++j) {
        float v = X[j] + (pending_bias != nullptr ? pending_bias[j] : 0.0f);
        for (int k = 0; k < TT; ++k) v += part_res[k * w_res + j];
        s.xr[j] = v;
      }
      std::memcpy(X_alt + d0, s.xr.data() + d0, (d1 - d0) * sizeof(float));
      return s.xr.data();
    };
    auto settle = [&]() {  // after a barrier: X_alt complete
      if (pending) {
        std::swap(X, X_alt);
        pending = false;
      }
    };
    // y = W x for this thread's share: output rows / blocks into y, or (column split) its columns into
    // its partial at part + t * width; the caller sums partials. Returns whether it split.
    auto run_proj = [&](const MatDesc& d, const float* x, const XQ& xq, int64_t n_act, float* y, float* part,
                        int64_t width, int64_t* lo, int64_t* hi) {
      if (column_split(e, d, TT)) {
        int64_t k0, k1;
        split(n_act, 1, t, TT, &k0, &k1);
        cols_range(mat(d), s.idx.data() + k0, s.xv.data() + k0, k1 - k0, 0, nblocks(d.out), part + t * width);
        *lo = *hi = 0;
        return true;
      }
      project(d, x, s, xq, n_act, t, TT, y, lo, hi);
      return false;
    };
    auto sum_parts = [&](const float* part, int64_t width, int64_t r0, int64_t r1, const float* bias, float* dst) {
      for (int64_t r = r0; r < r1; ++r) {
        float v = bias != nullptr ? bias[r - r0] : 0.0f;
        for (int k = 0; k < TT; ++k) v += part[k * width + r];
        dst[r - r0] = v;
      }
    };

    if (t == 0) row_to_float(mat(M.emb), token, M.emb_scale, X);
#pragma omp barrier
    for (int64_t l = 0; l < M.n_layers; ++l) {
      const LayerDesc& L = e.layers[l];
      float* kc = kv_slot + (l * 2 + 0) * HK * M.max_seq * hd;
      float* vc = kv_slot + (l * 2 + 1) * HK * M.max_seq * hd;
      int64_t lo, hi;
      const XQ xq = s.xq.view(std::max(D, std::max(Hd, I)));
      const XQ xqa{xq.q, xq.d, xq.s, xq.ds, nblocks(D)};
      // ---- attention input and q, k, v (partials of split ones at offsets 0, pad(Hd), pad(Hd) + pad(KVd))
      rmsnorm(residual_in(), L.attn_norm, D, M.eps, s.xn.data());
      if (tr != nullptr && tr->attn_in != nullptr && t == 0) std::memcpy(tr->attn_in + l * D, s.xn.data(), D * 4);
      const bool fused_qkv = L.qkv.data != nullptr;
      bool split_q = false, split_k = false, split_v = false;
      const int64_t off_k = pad(Hd), off_v = pad(Hd) + pad(KVd);
      if (fused_qkv) {
        Q = e.qkv.data();
        K = Q + Hd;
        V = K + KVd;
        const int64_t n_act = active_of(L.qkv, s.xn.data(), s);
        if (t == 0)
          for (int p : {PQ, PK, PV}) counts[l * NPROJ + p] += n_act;
        split_q = split_k = split_v = run_proj(L.qkv, s.xn.data(), xqa, n_act, Q, part_out, w_out, &lo, &hi);
      } else {
        Q = e.q.data();
        K = e.k.data();
        V = e.v.data();
        if (needs_xq(L.q) || needs_xq(L.k) || needs_xq(L.v)) quantize_x(s.xn.data(), D, xqa);
        const MatDesc* mats[3] = {&L.q, &L.k, &L.v};
        float* outs[3] = {Q, K, V};
        const int64_t offs[3] = {0, off_k, off_v};
        bool* splits[3] = {&split_q, &split_k, &split_v};
        for (int p = 0; p < 3; ++p) {
          int64_t n_act = 0;
          if (mats[p]->layout == COLS) {
            n_act = active_of(*mats[p], s.xn.data(), s);
            if (t == 0) counts[l * NPROJ + p] += n_act;
          }
          *splits[p] = run_proj(*mats[p], s.xn.data(), xqa, n_act, outs[p], part_out + offs[p], w_out, &lo, &hi);
        }
      }
#pragma omp barrier
      settle();
      mark(T_QKV);
      // ---- (split: sum partials), q/k norms, RoPE, cache write: units = q heads then kv heads
      const float* b_q = fused_qkv ? L.qkv.bias : L.q.bias;
      const float* b_k = fused_qkv ? (L.qkv.bias != nullptr ? L.qkv.bias + Hd : nullptr) : L.k.bias;
      const float* b_v = fused_qkv ? (L.qkv.bias != nullptr ? L.qkv.bias + Hd + KVd : nullptr) : L.v.bias;
      const int64_t po_k = fused_qkv ? Hd : off_k, po_v = fused_qkv ? Hd + KVd : off_v;
      for (int64_t unit = t; unit < H + HK; unit += TT) {
        const bool is_q = unit < H;
        const int64_t g = is_q ? unit : unit - H;
        float* vec = is_q ? Q + g * hd : K + g * hd;
        if (is_q && split_q) sum_parts(part_out, w_out, g * hd, (g + 1) * hd, b_q ? b_q + g * hd : nullptr, vec);
        if (!is_q && split_k) sum_parts(part_out, w_out, po_k + g * hd, po_k + (g + 1) * hd, b_k ? b_k + g * hd : nullptr, vec);
        if (!is_q && split_v) sum_parts(part_out, w_out, po_v + g * hd, po_v + (g + 1) * hd, b_v ? b_v + g * hd : nullptr, V + g * hd);
        const float* nw = is_q ? L.q_norm : L.k_norm;
        if (nw != nullptr) rmsnorm(vec, nw, hd, M.eps, vec);
        const int64_t half = hd / 2;
        for (int64_t j = 0; j < half; ++j) {
          const float a = vec[j], b = vec[j + half];
          vec[j] = a * cosp[j] - b * sinp[j];
          vec[j + half] = b * cosp[j + half] + a * sinp[j + half];
        }
        if (!is_q) {
          std::memcpy(kc + (g * M.max_seq + pos) * hd, vec, hd * 4);
          std::memcpy(vc + (g * M.max_seq + pos) * hd, V + g * hd, hd * 4);
        }
      }
#pragma omp barrier
      mark(T_ROPE);
      // ---- attention over positions 0..pos, heads split over threads
      s.scores.resize(pos + 1);
      for (int64_t hh = t; hh < H; hh += TT) {
        const float* qh = Q + hh * hd;
        const int64_t g = hh / group;
        const float* kg = kc + g * M.max_seq * hd;
        const float* vg = vc + g * M.max_seq * hd;
        float mx = -INFINITY;
        for (int64_t p = 0; p <= pos; ++p) {
          s.scores[p] = dot(qh, kg + p * hd, hd) * M.attn_scale;
          mx = std::max(mx, s.scores[p]);
        }
        float sum = 0.0f;
        for (int64_t p = 0; p <= pos; ++p) {
          s.scores[p] = std::exp(s.scores[p] - mx);
          sum += s.scores[p];
        }
        const float inv = 1.0f / sum;
        float* out = A + hh * hd;
        std::fill(out, out + hd, 0.0f);
        for (int64_t p = 0; p <= pos; ++p) {
          const float w = s.scores[p] * inv;
          const float* vp = vg + p * hd;
          for (int64_t j = 0; j < hd; ++j) out[j] += w * vp[j];
        }
      }
#pragma omp barrier
      mark(T_ATTN);
      // ---- o projection + residual
      if (tr != nullptr && tr->o_in != nullptr && t == 0) std::memcpy(tr->o_in + l * Hd, A, Hd * 4);
      {
        int64_t n_act = 0;
        const XQ xqo{xq.q, xq.d, xq.s, xq.ds, nblocks(Hd)};
        if (needs_xq(L.o)) quantize_x(A, Hd, xqo);
        if (L.o.layout == COLS) {
          n_act = active_of(L.o, A, s);
          if (t == 0) counts[l * NPROJ + PO] += n_act;
        }
        if (run_proj(L.o, A, xqo, n_act, Y, part_res, w_res, &lo, &hi)) {
          pending = true;
          pending_bias = L.o.bias;
        } else {
          for (int64_t r = lo; r < hi; ++r) X[r] += Y[r];
        }
      }
#pragma omp barrier
      mark(T_O);
      // ---- FFN: gate/up (partials of split ones at offsets 0 and pad(I))
      rmsnorm(residual_in(), L.ffn_norm, D, M.eps, s.xn.data());
      if (tr != nullptr && tr->ffn_in != nullptr && t == 0) std::memcpy(tr->ffn_in + l * D, s.xn.data(), D * 4);
      const bool fused_gu = L.gate_up.data != nullptr;
      const bool cats = L.act > 0.0f;
      bool split_g = false, split_u = false;
      if (fused_gu) {
        G = e.gu.data();
        U = G + I;
        const int64_t n_act = active_of(L.gate_up, s.xn.data(), s);
        if (t == 0)
          for (int p : {PGATE, PUP}) counts[l * NPROJ + p] += n_act;
        split_g = split_u = run_proj(L.gate_up, s.xn.data(), xqa, n_act, G, part_out, w_out, &lo, &hi);
      } else {
        G = e.g.data();
        U = e.u.data();
        if (needs_xq(L.gate) || needs_xq(L.up)) quantize_x(s.xn.data(), D, xqa);
        int64_t n_act = 0;
        if (L.gate.layout == COLS) {
          n_act = active_of(L.gate, s.xn.data(), s);
          if (t == 0) counts[l * NPROJ + PGATE] += n_act;
        }
        split_g = run_proj(L.gate, s.xn.data(), xqa, n_act, G, part_out, w_out, &lo, &hi);
        if (!cats) {
          n_act = 0;
          if (L.up.layout == COLS) {
            n_act = active_of(L.up, s.xn.data(), s);
            if (t == 0) counts[l * NPROJ + PUP] += n_act;
          }
          split_u = run_proj(L.up, s.xn.data(), xqa, n_act, U, part_out + pad(I), w_out, &lo, &hi);
        }
      }
#pragma omp barrier
      settle();
      mark(T_GATE_UP);
      int64_t i0, i1;
      split(I, 8, t, TT, &i0, &i1);
      const int64_t pu = fused_gu ? I : pad(I);
      if (split_g) sum_parts(part_out, w_out, i0, i1, nullptr, G + i0);
      if (split_u) sum_parts(part_out, w_out, pu + i0, pu + i1, nullptr, U + i0);
      float* tr_act = tr != nullptr && tr->act != nullptr ? tr->act + l * I : nullptr;
      float* tr_mid = tr != nullptr && tr->mid != nullptr ? tr->mid + l * I : nullptr;
      if (!cats) {
        ffn_middle(G, U, i0, i1, L.mid, M.act_fn, Hh, tr_act, tr_mid);
#pragma omp barrier
        mark(T_ACT);
        // ---- down + residual
        int64_t n_act = 0;
        const XQ xqh{xq.q, xq.d, xq.s, xq.ds, nblocks(I)};
        if (L.down.layout == ROWS) {
          if (quantized(L.down.fmt)) quantize_x(Hh, I, xqh);
        } else {
          n_act = active_of(L.down, Hh, s);
          if (t == 0) counts[l * NPROJ + PDOWN] += n_act;
        }
        if (run_proj(L.down, Hh, xqh, n_act, Y, part_res, w_res, &lo, &hi)) {
          pending = true;
          pending_bias = L.down.bias;
        } else {
          for (int64_t r = lo; r < hi; ++r) X[r] += Y[r];
        }
      } else {
        // CATS: a = Z(act(g), act); only rows of up and columns of down of a != 0 are read.
        ffn_middle(G, nullptr, i0, i1, L.act, M.act_fn, Hh, tr_act, nullptr);
#pragma omp barrier
        mark(T_ACT);
        int64_t n = 0;
        for (int64_t i = 0; i < I; ++i)
          if (Hh[i] != 0.0f) s.idx[n++] = static_cast<int32_t>(i);
        if (t == 0) counts[l * NPROJ + PUP] += n;
        int64_t k0, k1;
        split(n, 1, t, TT, &k0, &k1);
        gather_range(mat(L.up), s.xn.data(), xqa, s.idx.data(), k0, k1, HC);
        for (int64_t k = k0; k < k1; ++k) {
          const int32_t i = s.idx[k];
          float hv = Hh[i] * HC[k];
          if (tr_mid != nullptr) tr_mid[i] = hv;
          if (std::fabs(hv) < L.mid || (L.down.thr != nullptr && std::fabs(hv) < L.down.thr[i])) hv = 0.0f;
          HC[k] = hv;
        }
        if (tr_mid != nullptr)  // inactive neurons: act(g) was zeroed, so h = 0
          for (int64_t i = i0; i < i1; ++i)
            if (Hh[i] == 0.0f) tr_mid[i] = 0.0f;
#pragma omp barrier
        mark(T_GATE_UP);  // CATS: the up row gather counts as gate/up
        int64_t na = 0;
        for (int64_t k = 0; k < n; ++k)
          if (HC[k] != 0.0f) {
            s.idx[na] = s.idx[k];
            s.xv[na++] = HC[k];
          }
        if (t == 0) counts[l * NPROJ + PDOWN] += na;
        if (run_proj(L.down, nullptr, xqa, na, Y, part_res, w_res, &lo, &hi)) {
          pending = true;
          pending_bias = L.down.bias;
        } else {
          for (int64_t r = lo; r < hi; ++r) X[r] += Y[r];
        }
      }
#pragma omp barrier
      mark(T_DOWN);
    }
    // ---- final norm and LM head (rows layout, or cols over the surviving input channels; its columns are
    // vocab long, so threads always split the output blocks)
    rmsnorm(residual_in(), M.final_norm, D, M.eps, s.xn.data());
    if (M.head.layout == COLS) {
      const int64_t n_act = active_of(M.head, s.xn.data(), s);
      if (t == 0) counts[M.n_layers * NPROJ] += n_act;
      int64_t b0, b1;
      split(nblocks(M.vocab), 1, t, TT, &b0, &b1);
      cols_range(mat(M.head), s.idx.data(), s.xv.data(), n_act, b0, b1, logits);
    } else {
      const XQ xq = s.xq.view(D);
      if (quantized(M.head.fmt)) quantize_x(s.xn.data(), D, xq);
      int64_t lo, hi;
      split(M.vocab, 1, t, TT, &lo, &hi);
      rows_range(mat(M.head), s.xn.data(), xq, lo, hi, logits);
    }
#pragma omp barrier
    settle();  // the residual stream is not read again in this step; keep X consistent for tracing
    mark(T_HEAD);
  }
  e.steps += 1;
}

bool check_mat(const MatDesc& d, int64_t out, int64_t in) {
  return d.data != nullptr && d.out == out && d.in == in && valid_fmt(d.fmt) && (d.layout == ROWS || d.layout == COLS);
}

}  // namespace dstep

extern "C" {

// Returns a new engine, or null if the description is inconsistent (the Python side validates first
// and names the problem). kv: fp32 [n_slots][n_layers][2][n_kv_heads][max_seq][head_dim].
void* dormant_decode_create(const dstep::ModelDesc* m, float* kv, int64_t n_slots) {
  using namespace dstep;
  if (m == nullptr || kv == nullptr || m->n_heads % m->n_kv_heads != 0 || m->head_dim % 2 != 0) return nullptr;
  if (!check_mat(m->emb, m->vocab, m->dim) || m->emb.layout != ROWS) return nullptr;
  if (!check_mat(m->head, m->vocab, m->dim)) return nullptr;
  if (m->head.layout == COLS && m->vocab % QK != 0) return nullptr;  // cols write whole output blocks
  const int64_t D = m->dim, Hd = m->n_heads * m->head_dim, KVd = m->n_kv_heads * m->head_dim, I = m->inter;
  for (int64_t l = 0; l < m->n_layers; ++l) {
    const LayerDesc& L = m->layers[l];
    if (L.qkv.data != nullptr) {  // fused: whole blocks per part, cols layout
      if (!check_mat(L.qkv, Hd + 2 * KVd, D) || L.qkv.layout != COLS || Hd % QK != 0 || KVd % QK != 0) return nullptr;
    } else if (!check_mat(L.q, Hd, D) || !check_mat(L.k, KVd, D) || !check_mat(L.v, KVd, D)) {
      return nullptr;
    }
    if (L.gate_up.data != nullptr) {
      if (!check_mat(L.gate_up, 2 * I, D) || L.gate_up.layout != COLS || I % QK != 0 || L.act > 0.0f) return nullptr;
    } else if (!check_mat(L.gate, I, D) || !check_mat(L.up, I, D)) {
      return nullptr;
    }
    if (!check_mat(L.o, D, Hd) || !check_mat(L.down, D, I)) return nullptr;
    if (L.act > 0.0f && (L.up.layout != ROWS || L.down.layout != COLS)) return nullptr;
    if (L.mid > 0.0f && L.down.layout != COLS) return nullptr;
  }
  Engine* e = new Engine();
  e->m = *m;
  e->layers.assign(m->layers, m->layers + m->n_layers);
  e->m.layers = nullptr;
  e->kv = kv;
  e->n_slots = n_slots;
  e->x.assign(pad(D), 0.0f);
  e->q.assign(pad(Hd), 0.0f);
  e->k.assign(pad(KVd), 0.0f);
  e->v.assign(pad(KVd), 0.0f);
  e->att.assign(pad(Hd), 0.0f);
  e->ybuf.assign(pad(D), 0.0f);
  e->g.assign(pad(I), 0.0f);
  e->u.assign(pad(I), 0.0f);
  e->h.assign(pad(I), 0.0f);
  e->hc.assign(pad(I), 0.0f);
  e->qkv.assign(pad(Hd + 2 * KVd), 0.0f);
  e->gu.assign(pad(2 * I), 0.0f);
  e->x_alt.assign(pad(D), 0.0f);
  e->w_out = std::max(pad(Hd) + 2 * pad(KVd), 2 * pad(I));
  e->w_res = pad(D);
  e->counts.assign(m->n_layers * NPROJ + 1, 0);
  return e;
}

void dormant_decode_destroy(void* handle) { delete static_cast<dstep::Engine*>(handle); }

// logits[vocab] for token at position pos of KV slot `slot`. trace may be null. Returns 0, or -1
// (token / pos / slot out of range).
int32_t dormant_decode_step(void* handle, int64_t token, int64_t pos, int64_t slot, float* logits, int32_t n_threads,
                            const dstep::TraceDesc* trace) {
  using namespace dstep;
  Engine& e = *static_cast<Engine*>(handle);
  if (token < 0 || token >= e.m.vocab || pos < 0 || pos >= e.m.max_seq || slot < 0 || slot >= e.n_slots) return -1;
  const int T = n_threads > 0 ? n_threads : 1;
  if (static_cast<int>(e.scratch.size()) < T) {
    e.scratch.resize(T);
    const int64_t width = std::max(e.m.dim, std::max(e.m.n_heads * e.m.head_dim, e.m.inter));
    e.part_out.assign(static_cast<size_t>(T) * e.w_out, 0.0f);
    e.part_res.assign(static_cast<size_t>(T) * e.w_res, 0.0f);
    for (auto& s : e.scratch) {
      s.xr.assign(pad(e.m.dim), 0.0f);
      s.xn.assign(pad(width), 0.0f);
      s.idx.assign(pad(width), 0);
      s.xv.assign(pad(width), 0.0f);
      s.xq.view(width);
    }
  }
  run_step(e, token, pos, slot, logits, T, trace);
  return 0;
}

// n rows, row b: tokens[b] at positions[b] in slot slots[b] -> logits[b * vocab]. Each row is its own
// batch-1 step (its own active sets), so the weights are read once per row.
int32_t dormant_decode_step_batch(void* handle, const int64_t* tokens, const int64_t* positions, const int64_t* slots,
                                  int64_t n, float* logits, int32_t n_threads) {
  using namespace dstep;
  Engine& e = *static_cast<Engine*>(handle);
  for (int64_t b = 0; b < n; ++b) {
    const int32_t rc = dormant_decode_step(handle, tokens[b], positions[b], slots[b], logits + b * e.m.vocab, n_threads, nullptr);
    if (rc != 0) return rc;
  }
  return 0;
}

// Column split of cols projections across threads: 0 never, 1 always, 2 auto (see column_split).
void dormant_decode_set_split(void* handle, int32_t mode) { static_cast<dstep::Engine*>(handle)->split_mode = mode; }

// Phase times (ns, thread 0, summed over steps while profiling) into out[8]; enable turns profiling
// on (1) or off (0), reset zeroes the sums.
void dormant_decode_profile(void* handle, int64_t* out, int32_t enable, int32_t reset) {
  using namespace dstep;
  Engine& e = *static_cast<Engine*>(handle);
  std::memcpy(out, e.phase_ns, sizeof(e.phase_ns));
  e.profile = enable != 0;
  if (reset) std::fill(e.phase_ns, e.phase_ns + NPHASE, 0);
}

// counts[n_layers * 7 + 1]: channels (cols) / rows (CATS up gather) read per projection, then the LM
// head's channels, summed over steps; returns the number of steps. reset != 0 zeroes them.
int64_t dormant_decode_counts(void* handle, int64_t* out, int32_t reset) {
  using namespace dstep;
  Engine& e = *static_cast<Engine*>(handle);
  std::memcpy(out, e.counts.data(), e.counts.size() * sizeof(int64_t));
  const int64_t steps = e.steps;
  if (reset) {
    std::fill(e.counts.begin(), e.counts.end(), 0);
    e.steps = 0;
  }
  return steps;
}
}
