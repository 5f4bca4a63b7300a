/* Sink + window (+ selected blocks) causal prefill on the CPU, fp32, one pass per block of ROWS query rows
 * (no N x N, no merge).
 *
 * Called from attention_kernels/native_cpu.py through ctypes. For query row i of a head with sink S and window W
 * (plans/span.py), key j is visible iff j <= i and (j < S or i - j < W or j lies in a selected block). A block
 * of rows [i0, i0 + m) gathers its keys as one index list: the sink [0, min(S, i0 + m)), the selected blocks'
 * keys between the sink and the window, then the window [max(sink end, i0 - W + 1), i0 + m); it scores them
 * against the block's queries (rows in the vector lanes: scores are stored key-major, sT[c][r]), masks the keys
 * some row does not see, takes an exact softmax over the whole list (it fits in cache: at most
 * S + W + ROWS - 1 keys plus the selected ones) and multiplies by V. Every block is independent; blocks are
 * spread over OpenMP threads.
 *
 * Layout: q / k / v / out are fp32 with unit stride over the head dimension d; item t (a (batch, query head)
 * pair) reads q + q_off[t] (row stride q_rs), k + k_off[t], v + v_off[t], writes out + o_off[t]; rows 0..n-1.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 16 /* query rows per block: one 512-bit vector of fp32 */
#define KEYS 4  /* keys scored together (independent accumulators) */

typedef float vrow __attribute__((vector_size(ROWS * sizeof(float)), aligned(64), may_alias)); /* one per row */
typedef int32_t vrowi __attribute__((vector_size(ROWS * sizeof(int32_t)), aligned(64)));
typedef float vrow_u __attribute__((vector_size(ROWS * sizeof(float)), aligned(4)));  /* unaligned access */

static inline vrow vselect(vrowi mask, vrow a, vrow b) { return (vrow)(((vrowi)a & mask) | ((vrowi)b & ~mask)); }

static inline vrow exp2_nonpos(vrow x) {
  /* 2^x lane by lane for x <= 0 (scores minus their row max, -inf for a masked key); 0 below -126.
   * 2^x = 2^n * 2^f with n = floor(x + 1/2), f in [-1/2, 1/2), 2^f by the degree-6 polynomial of Cephes'
   * exp2f (relative error 2e-9 on that interval, below fp32 rounding). */
  vrowi small = x < -126.0f;
  vrow xc = vselect(small, (vrow){0} - 126.0f, x) + 0.5f;
  vrowi ti = __builtin_convertvector(xc, vrowi); /* truncation toward zero */
  vrow tf = __builtin_convertvector(ti, vrow);
  ti = ti + (tf > xc);                           /* floor: -1 where truncation rounded up */
  vrow f = xc - 0.5f - __builtin_convertvector(ti, vrow);
  vrow p = 1.535336188319500e-4f + 0.0f * f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  vrowi bits = (ti + 127) << 23;
  vrow scale;
  memcpy(&scale, &bits, sizeof scale);
  vrow y = p * scale;
  return (vrow)((vrowi)y & ~small);
}


static void score_keys(const vrow *restrict qT, const float *restrict k, int64_t k_rs, int64_t d, int64_t c0,
                       const int32_t *restrict idx, int64_t n_keys, vrow *restrict sT) {
  /* sT[c0 + u] = (q_r . k_{key(c0 + u)})_r for u < KEYS (qT: d vectors of ROWS pre-scaled query values);
   * slots past n_keys score the last key again (sT has room; they are never read). */
  vrow acc[KEYS];
  const float *kp[KEYS];
  for (int u = 0; u < KEYS; u++) {
    int64_t cu = c0 + u < n_keys ? c0 + u : n_keys - 1;
    kp[u] = k + (int64_t)idx[cu] * k_rs;
    acc[u] = (vrow){0};
  }
  for (int64_t x = 0; x < d; x++) {
    vrow qx = qT[x];
#pragma GCC unroll 8
    for (int u = 0; u < KEYS; u++) acc[u] += kp[u][x] * qx;
  }
  for (int u = 0; u < KEYS; u++) sT[c0 + u] = acc[u];
}

static inline void transpose16(vrow *restrict t) {
  /* t[0..15] (a 16 x 16 tile, rows as vectors) becomes its transpose in place: four perfect shuffles, each
   * rotating the 8-bit (row, column) index left by one bit. */
  const vrowi lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  const vrowi hi = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  vrow u[ROWS];
  for (int stage = 0; stage < 4; stage++) {
    for (int i = 0; i < ROWS / 2; i++) {
      u[2 * i] = __builtin_shuffle(t[i], t[i + ROWS / 2], lo);
      u[2 * i + 1] = __builtin_shuffle(t[i], t[i + ROWS / 2], hi);
    }
    memcpy(t, u, sizeof u);
  }
}

static void block(const float *restrict q, int64_t q_rs, const float *restrict k, int64_t k_rs,
                  const float *restrict v, int64_t v_rs, float *restrict o, int64_t o_rs, int64_t i0, int64_t m,
                  int64_t sink, int64_t window, const uint8_t *restrict sel, int64_t sel_block, int64_t d,
                  float scale_log2e, vrow *restrict qT, vrow *restrict sT, int32_t *restrict idx) {
  /* the block's key list idx[0, n_keys): the sink, the selected blocks between the sink and the window (sel: one
   * byte per block of sel_block keys, nonzero = selected; NULL: none), then the window */
  int64_t last = i0 + m - 1;
  int64_t s_end = sink < last + 1 ? sink : last + 1;
  int64_t w_beg = i0 - window + 1;
  if (w_beg < s_end) w_beg = s_end;
  int64_t n_keys = 0, c, x0;
  for (int64_t j = 0; j < s_end; j++) idx[n_keys++] = (int32_t)j;
  if (sel)
    for (int64_t bk = s_end / sel_block; bk * sel_block < w_beg; bk++) {
      if (!sel[bk]) continue;
      int64_t j0 = bk * sel_block > s_end ? bk * sel_block : s_end;
      int64_t j1 = (bk + 1) * sel_block < w_beg ? (bk + 1) * sel_block : w_beg;
      for (int64_t j = j0; j < j1; j++) idx[n_keys++] = (int32_t)j;
    }
  for (int64_t j = w_beg; j <= last; j++) idx[n_keys++] = (int32_t)j;
  vrow tile[ROWS];

  /* qT[x][r] = q[i0 + r][x] * scale * log2(e): 16 x 16 tiles transposed in registers */
  float *qf = (float *)qT;
  for (x0 = 0; x0 + ROWS <= d; x0 += ROWS) {
    for (int r = 0; r < ROWS; r++)
      if (r < m)
        tile[r] = (vrow)(*(const vrow_u *)(q + (i0 + r) * q_rs + x0)) * scale_log2e;
      else
        tile[r] = (vrow){0};
    transpose16(tile);
    memcpy(qT + x0, tile, sizeof tile);
  }
  if (x0 < d) {
    memset(qf + x0 * ROWS, 0, (size_t)(d - x0) * ROWS * sizeof(float));
    for (int64_t r = 0; r < m; r++)
      for (int64_t x = x0; x < d; x++) qf[x * ROWS + r] = q[(i0 + r) * q_rs + x] * scale_log2e;
  }

  for (c = 0; c < n_keys; c += KEYS) score_keys(qT, k, k_rs, d, c, idx, n_keys, sT);

  /* mask: key j is seen by row i iff j <= i and (j < sink or i - j < window or j is selected); only keys some
   * row misses */
  const vrowi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const vrowi iv = (int32_t)i0 + lane;
  const vrow neg_inf = (vrow){0} - INFINITY;
  for (c = 0; c < n_keys; c++) {
    int64_t j = idx[c];
    int in_sel = sel != NULL && sel[j / sel_block] != 0;
    if (j <= i0 && (j < sink || last - j < window || in_sel)) continue;
    vrowi in_sink = (vrowi){0} - (int32_t)(j < sink || in_sel);
    vrowi seen = (iv >= (int32_t)j) & (in_sink | (iv - (int32_t)j < (int32_t)window));
    sT[c] = vselect(seen, sT[c], neg_inf);
  }

  vrow mx = sT[0], den = {0};
  for (c = 1; c < n_keys; c++) mx = vselect(sT[c] > mx, sT[c], mx);
  for (int r = 0; r < ROWS; r++) mx[r] = r < m ? mx[r] : 0.0f; /* padded rows: no -inf - -inf */
  for (c = 0; c < n_keys; c++) {
    vrow p = exp2_nonpos(sT[c] - mx);
    sT[c] = p;
    den += p;
  }
  vrow inv = 1.0f / den;

  /* outT[x][r] = sum_c v[key c][x] p[c][r] / den[r], 16 values of x at a time, then transposed to rows */
  for (x0 = 0; x0 < d; x0 += ROWS) {
    int64_t dx = d - x0 < ROWS ? d - x0 : ROWS;
    vrow acc[ROWS];
    for (int y = 0; y < ROWS; y++) acc[y] = (vrow){0};
    if (dx == ROWS) {
      for (c = 0; c < n_keys; c++) {
        const float *vp = v + (int64_t)idx[c] * v_rs + x0;
        vrow p = sT[c];
#pragma GCC unroll 16
        for (int y = 0; y < ROWS; y++) acc[y] += vp[y] * p;
      }
    } else {
      for (c = 0; c < n_keys; c++) {
        const float *vp = v + (int64_t)idx[c] * v_rs + x0;
        vrow p = sT[c];
        for (int y = 0; y < dx; y++) acc[y] += vp[y] * p;
      }
    }
    for (int y = 0; y < ROWS; y++) acc[y] *= inv;
    transpose16(acc); /* acc[r][y] = out[i0 + r][x0 + y] */
    for (int64_t r = 0; r < m; r++) {
      float *op = o + (i0 + r) * o_rs + x0;
      if (dx == ROWS)
        *(vrow_u *)op = acc[r];
      else
        for (int y = 0; y < dx; y++) op[y] = acc[r][y];
    }
  }
}

int sink_window_prefill(int64_t n_items, const int64_t *q_off, const int64_t *k_off, const int64_t *v_off,
                        const int64_t *o_off, const int64_t *sink, const int64_t *window, const uint8_t *sel,
                        const int64_t *sel_off, int64_t sel_block, const float *q, const float *k, const float *v,
                        float *o, int64_t q_rs, int64_t k_rs, int64_t v_rs, int64_t o_rs, int64_t n, int64_t d,
                        float scale, int n_threads) {
  /* Returns 0, or 1 when scratch memory could not be allocated. sel (NULL: no selected blocks): item t reads
   * sel + sel_off[t], one byte per block of sel_block keys (ceil(n / sel_block) bytes), nonzero = selected. */
  if (n <= 0 || d <= 0 || n_items <= 0) return 0;
  int64_t blocks = (n + ROWS - 1) / ROWS;
  int64_t n_sel_blocks = sel ? (n + sel_block - 1) / sel_block : 0;
  int64_t max_keys = 0;
  for (int64_t t = 0; t < n_items; t++) {
    int64_t keys = (sink[t] < n ? sink[t] : n) + (window[t] < n ? window[t] : n) + ROWS + KEYS;
    for (int64_t bk = 0; bk < n_sel_blocks; bk++) keys += sel[sel_off[t] + bk] ? sel_block : 0;
    if (keys > max_keys) max_keys = keys;
  }
  float scale_log2e = scale * 1.4426950408889634f;
  int failed = 0;
#pragma omp parallel num_threads(n_threads)
  {
    vrow *qT = aligned_alloc(64, (size_t)d * sizeof(vrow));
    vrow *sT = aligned_alloc(64, (size_t)max_keys * sizeof(vrow));
    int32_t *idx = malloc((size_t)max_keys * sizeof(int32_t));
    if (!qT || !sT || !idx) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    int bad;
#pragma omp atomic read
    bad = failed;
    if (!bad) { /* every thread takes the same branch, so the worksharing loop is met by all or none */
#pragma omp for schedule(dynamic, 8)
      for (int64_t w = 0; w < n_items * blocks; w++) {
        int64_t t = w / blocks, b = w % blocks;
        int64_t i0 = b * ROWS;
        int64_t m = n - i0 < ROWS ? n - i0 : ROWS;
        block(q + q_off[t], q_rs, k + k_off[t], k_rs, v + v_off[t], v_rs, o + o_off[t], o_rs, i0, m, sink[t],
              window[t], sel ? sel + sel_off[t] : NULL, sel_block, d, scale_log2e, qT, sT, idx);
      }
    }
    free(qT);
    free(sT);
    free(idx);
  }
  return failed;
}
