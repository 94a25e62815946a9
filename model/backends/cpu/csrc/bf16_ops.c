/* Fused bf16 passes for CPU inference (AVX2 + FMA + F16C x86): the vision RoPE and the
   attention of a decode step (attn_decode, at the end of this file).

   rope_half: out = bf16(x * cos + rotate_half(x) * sin), math in fp32 (the vision 2D RoPE).
   torch runs it as six passes (widen, multiply, negate, concatenate, multiply-add, narrow), each
   writing a fresh tensor; here it is one pass over x. The products and the sum are separate
   fp32 operations, as in torch, so the result is bit-identical (this file must be built without
   contraction into FMA, -ffp-contract=off).

   Measured and not kept: fused silu(g) * u and quick_gelu at 8 lanes were 1.5-2x slower than
   torch's own AVX-512 passes (the exp and the division are the cost, not the memory traffic).

   Rows are split over OpenMP threads; small inputs run on the calling thread. */

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16_common.h"

#define MIN_PARALLEL (1 << 16) /* fewer elements than this run on one thread */

static inline __m256 load_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Round to nearest even; NaN becomes the quiet NaN 0x7fc0 (torch's conversion). */
static inline __m128i round_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    __m256i packed = _mm256_packus_epi32(r, r); /* per 128-bit lane: [a0..a3 a0..a3 | a4..a7 a4..a7] */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

static inline void store_bf16(uint16_t *p, __m256 v) { _mm_storeu_si128((__m128i *)p, round_bf16(v)); }

/* --- rope_half: x (N, G, D) bf16 with strides (sN, sG, 1), cos/sin (N, D) fp32 contiguous,
   out (N, G, D) bf16 contiguous. rotate_half(x) = [-x[D/2:], x[:D/2]]; D even. ------------- */

static void rope_row(const uint16_t *x, int64_t sG, int64_t G, int64_t D, const float *c, const float *s,
                     uint16_t *o) {
    int64_t h = D / 2;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t g = 0; g < G; g++, x += sG, o += D) {
        int64_t d = 0;
        for (; d + 8 <= h; d += 8) {
            __m256 a = load_bf16(x + d), b = load_bf16(x + h + d);
            /* first half: a*cos - b*sin; second half: b*cos + a*sin (rotate_half's sign on -b) */
            __m256 first = _mm256_add_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + d)),
                                         _mm256_mul_ps(_mm256_xor_ps(b, sign), _mm256_loadu_ps(s + d)));
            __m256 second = _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + h + d)),
                                          _mm256_mul_ps(a, _mm256_loadu_ps(s + h + d)));
            store_bf16(o + d, first);
            store_bf16(o + h + d, second);
        }
        for (; d < h; d++) { /* scalar tail: the same separate fp32 operations */
            float a, b;
            uint32_t ua = (uint32_t)x[d] << 16, ub = (uint32_t)x[h + d] << 16;
            memcpy(&a, &ua, 4);
            memcpy(&b, &ub, 4);
            float first = a * c[d] + (-b) * s[d];
            float second = b * c[h + d] + a * s[h + d];
            __m256 v = _mm256_setr_ps(first, second, 0, 0, 0, 0, 0, 0);
            uint16_t r[8];
            store_bf16(r, v);
            o[d] = r[0];
            o[h + d] = r[1];
        }
    }
}

int bf16_rope_half(const uint16_t *x, int64_t N, int64_t G, int64_t D, int64_t sN, int64_t sG,
                   const float *cos, const float *sin, uint16_t *out, int nthreads) {
    if (N <= 0 || G <= 0 || D <= 0) return 0;
    if (D % 2) return 1;
    if (nthreads <= 1 || N * G * D < MIN_PARALLEL) {
        for (int64_t n = 0; n < N; n++) rope_row(x + n * sN, sG, G, D, cos + n * D, sin + n * D, out + n * G * D);
        return 0;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) rope_row(x + n * sN, sG, G, D, cos + n * D, sin + n * D, out + n * G * D);
    return 0;
}

/* --- attn_decode: attention of a few queries over the KV cache (decode steps) -----------------

   q (B, Hq, T, D), k and v (B, Hkv, S, D), all bf16 with unit stride along D and any other
   strides (element counts); Hq = G * Hkv, query head h reads kv head h / G. mask NULL: causal
   aligned to the end (query t sees slots 0 .. S - T + t); else (B|1, 1, T, S)
   bool as bytes, msB (0 when broadcast over the batch) and msT its strides; true = visible.
   out (B, T, Hq, D) bf16 contiguous: what the output projection reads.

   Per (batch, kv head) task, its G * T query rows go over the keys in blocks of KB: scores
   q.k * scale in fp32, an online softmax (running max and sum, rescaled once per block), and
   the fp32 sum of p * v; one division and one rounding to bf16 at the end. torch's flash kernel
   runs a decode step as one query block per head and costs ~2 us per key slot at Hq=20, Hkv=4,
   D=128 (9 ms per layer at 4000 slots); this reads each key and value once.
   A row that sees no key gets zeros. */

#include <math.h> /* INFINITY */

#define ATTN_KB 64
#define ATTN_MAX_ROWS 16
#define ATTN_MAX_D 256

static inline void widen_row(const uint16_t *src, int64_t D, float *dst) {
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(dst + d, load_bf16(src + d));
}

/* e^x for 8 fp32 lanes, the method and constants of bf16_common.h; -inf lanes give exactly 0. */
static inline __m256 exp8(__m256 x) {
    __m256 neg_inf = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_MIN)), _mm256_set1_ps(EXP_MAX));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x); /* ln 2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    __m256 y = _mm256_set1_ps(EXP_P0);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(EXP_P1));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(EXP_P2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(EXP_P3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(EXP_P4));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(EXP_P5));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(neg_inf, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void attn_task(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask,
                      int64_t G, int64_t T, int64_t S, int64_t D, int64_t qsH, int64_t qsT, int64_t ksS,
                      int64_t vsS, int64_t msT, float scale, uint16_t *out, int64_t osT, int64_t h0) {
    const int64_t R = G * T; /* row r: query head h0 + r / T, query t = r % T */
    float qf[ATTN_MAX_ROWS][ATTN_MAX_D], acc[ATTN_MAX_ROWS][ATTN_MAX_D], p[ATTN_MAX_ROWS][ATTN_KB];
    float m[ATTN_MAX_ROWS], l[ATTN_MAX_ROWS], kvf[ATTN_MAX_D];
    for (int64_t r = 0; r < R; r++) {
        widen_row(q + (r / T) * qsH + (r % T) * qsT, D, qf[r]);
        memset(acc[r], 0, sizeof(float) * D);
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    for (int64_t s0 = 0; s0 < S; s0 += ATTN_KB) {
        int64_t nb = S - s0 < ATTN_KB ? S - s0 : ATTN_KB;
        for (int64_t j = 0; j < nb; j++) {
            widen_row(k + (s0 + j) * ksS, D, kvf);
            for (int64_t r = 0; r < R; r++) {
                int visible = mask ? mask[(r % T) * msT + s0 + j] : s0 + j <= S - T + r % T;
                if (!visible) {
                    p[r][j] = -INFINITY;
                    continue;
                }
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                int64_t d = 0;
                for (; d + 16 <= D; d += 16) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qf[r] + d), _mm256_loadu_ps(kvf + d), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qf[r] + d + 8), _mm256_loadu_ps(kvf + d + 8), a1);
                }
                if (d < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qf[r] + d), _mm256_loadu_ps(kvf + d), a0);
                p[r][j] = hsum8(_mm256_add_ps(a0, a1)) * scale;
            }
        }
        for (int64_t r = 0; r < R; r++) { /* online softmax: new running max, rescale, exponentiate */
            float bmax = -INFINITY;
            for (int64_t j = 0; j < nb; j++) bmax = p[r][j] > bmax ? p[r][j] : bmax;
            for (int64_t j = nb; j < ATTN_KB; j++) p[r][j] = -INFINITY; /* a short last block */
            if (bmax == -INFINITY) { /* nothing visible in this block */
                memset(p[r], 0, sizeof(p[r]));
                continue;
            }
            float mnew = bmax > m[r] ? bmax : m[r];
            if (mnew > m[r] && l[r] > 0.0f) {
                float alpha = _mm256_cvtss_f32(exp8(_mm256_set1_ps(m[r] - mnew)));
                l[r] *= alpha;
                __m256 va = _mm256_set1_ps(alpha);
                for (int64_t d = 0; d < D; d += 8)
                    _mm256_storeu_ps(acc[r] + d, _mm256_mul_ps(_mm256_loadu_ps(acc[r] + d), va));
            }
            m[r] = mnew;
            __m256 vm = _mm256_set1_ps(mnew), sum = _mm256_setzero_ps();
            for (int64_t j = 0; j < ATTN_KB; j += 8) { /* -inf - mnew stays -inf: exp8 gives 0 */
                __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p[r] + j), vm));
                _mm256_storeu_ps(p[r] + j, e);
                sum = _mm256_add_ps(sum, e);
            }
            l[r] += hsum8(sum);
        }
        for (int64_t j = 0; j < nb; j++) {
            widen_row(v + (s0 + j) * vsS, D, kvf);
            for (int64_t r = 0; r < R; r++) {
                if (p[r][j] == 0.0f) continue;
                __m256 pv = _mm256_set1_ps(p[r][j]);
                for (int64_t d = 0; d < D; d += 8)
                    _mm256_storeu_ps(acc[r] + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(kvf + d), _mm256_loadu_ps(acc[r] + d)));
            }
        }
    }
    for (int64_t r = 0; r < R; r++) {
        __m256 inv = _mm256_set1_ps(l[r] > 0.0f ? 1.0f / l[r] : 0.0f);
        uint16_t *o = out + (r % T) * osT + (h0 + r / T) * D;
        for (int64_t d = 0; d < D; d += 8) store_bf16(o + d, _mm256_mul_ps(_mm256_loadu_ps(acc[r] + d), inv));
    }
}

int bf16_attn_decode(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask,
                     int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S, int64_t D,
                     int64_t qsB, int64_t qsH, int64_t qsT, int64_t ksB, int64_t ksH, int64_t ksS,
                     int64_t vsB, int64_t vsH, int64_t vsS, int64_t msB, int64_t msT, float scale,
                     uint16_t *out, int nthreads) {
    if (B <= 0 || T <= 0) return 0;
    if (Hkv <= 0 || Hq % Hkv || D <= 0 || D % 8 || D > ATTN_MAX_D || (Hq / Hkv) * T > ATTN_MAX_ROWS || S < 0)
        return 1;
    const int64_t G = Hq / Hkv, tasks = B * Hkv, osT = Hq * D;
    int parallel = nthreads > 1 && tasks > 1 && S * G * T * D >= MIN_PARALLEL;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (parallel)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t b = task / Hkv, hk = task % Hkv;
        attn_task(q + b * qsB + hk * G * qsH, k + b * ksB + hk * ksH, v + b * vsB + hk * vsH, mask ? mask + b * msB : 0,
                  G, T, S, D, qsH, qsT, ksS, vsS, msT, scale, out + b * T * osT, osT, hk * G);
    }
    return 0;
}
