/* Attention of many queries (prefill, the vision tower) for CPUs with AVX512-BF16 (vdpbf16ps).

   out = softmax(q k^T * scale + mask) v per head, q (B, Hq, T, D), k and v (B, Hkv, S, D) bf16
   with unit stride along D; query head h reads kv head h / (Hq / Hkv). Mask: none, or causal
   with key j visible to query i when j <= i + offset. out (B, T, Hq, D) bf16 contiguous.

   Keys and values of each kv head are first repacked into the pair layout vdpbf16ps reads
   (two consecutive elements of the summed-over dimension in each 32-bit lane): keys in blocks of
   16 keys x 2 dims (scores of 16 keys per instruction), values in blocks of 2 keys x 16 dims.
   Then blocks of 8 queries go over the keys KB at a time: fp32 scores, an online softmax
   (running max and sum, one rescale per block), the probabilities rounded to bf16 for the
   product with v (as torch's flash kernel does for bf16), fp32 accumulation, one division and
   one rounding at the end. torch's kernel runs these shapes at 100-160 GFLOP/s on a 2-core
   EPYC (head dims 80 and 128), where its matmuls reach ~400. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_common.h"

#define QR 8     /* query rows per block */
#define KB 64    /* keys per online-softmax step */
#define MAX_D 256

static inline __m512 exp16(__m512 x) { /* e^x as in bf16_common.h; -inf gives 0 */
    __mmask16 neg_inf = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_MIN)), _mm512_set1_ps(EXP_MAX));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 y = _mm512_set1_ps(EXP_P0);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(EXP_P1));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(EXP_P2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(EXP_P3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(EXP_P4));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(EXP_P5));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps((__mmask16)~neg_inf, _mm512_scalef_ps(y, n));
}

static inline __m256i round16(__m512 v) { /* 16 fp32 -> 16 nearest-even bf16 */
    return (__m256i)_mm512_cvtneps_pbh(v);
}

/* Keys of one kv head -> kp[blk][D/2][16][2]; values -> vp[S/2][D][2]; zeros past S. */
static void pack_kv(const uint16_t *k, const uint16_t *v, int64_t S, int64_t Sp, int64_t D, int64_t ksS,
                    int64_t vsS, uint16_t *kp, uint16_t *vp) {
    memset(kp, 0, sizeof(uint16_t) * Sp * D);
    memset(vp, 0, sizeof(uint16_t) * Sp * D);
    for (int64_t s = 0; s < S; s++) {
        const uint16_t *ks = k + s * ksS, *vs = v + s * vsS;
        int64_t blk = s / 16, j = s % 16;
        uint16_t *kb = kp + blk * 16 * D;
        for (int64_t d = 0; d < D; d++) kb[((d / 2) * 16 + j) * 2 + (d & 1)] = ks[d];
        uint16_t *vb = vp + (s / 2) * D * 2 + (s & 1);
        for (int64_t d = 0; d < D; d++) vb[d * 2] = vs[d];
    }
}

/* scores of QR query rows (q32: pairs of bf16 as int32, row stride D/2) against 32 keys starting
   at packed block kb (two blocks of 16): s[r][0..31] = q_r . k * scale */
static inline void scores32(const int32_t *q32, int64_t D, const uint16_t *kb, float scale, float *s, int64_t ss) {
    __m512 acc[QR][2];
    for (int r = 0; r < QR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const int64_t P = D / 2;
    const uint16_t *k0 = kb, *k1 = kb + 16 * D;
    for (int64_t p = 0; p < P; p++) {
        __m512bh a = (__m512bh)_mm512_loadu_si512(k0 + p * 32), b = (__m512bh)_mm512_loadu_si512(k1 + p * 32);
        for (int r = 0; r < QR; r++) {
            __m512bh qb = (__m512bh)_mm512_set1_epi32(q32[r * P + p]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qb, a);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qb, b);
        }
    }
    __m512 sc = _mm512_set1_ps(scale);
    for (int r = 0; r < QR; r++) {
        _mm512_storeu_ps(s + r * ss, _mm512_mul_ps(acc[r][0], sc));
        _mm512_storeu_ps(s + r * ss + 16, _mm512_mul_ps(acc[r][1], sc));
    }
}

/* o[r][dv*16 .. +16*ND] += sum over nkp key pairs of p32[r][kp] * v pairs, QR rows */
static inline __attribute__((always_inline)) void pv_rows(const int32_t *p32, int64_t nkp, const uint16_t *vp,
                                                          int64_t D, int64_t dv, float *o, const int ND) {
    __m512 acc[QR][2];
    for (int r = 0; r < QR; r++)
        for (int c = 0; c < ND; c++) acc[r][c] = _mm512_loadu_ps(o + r * D + (dv + c) * 16);
    for (int64_t kp = 0; kp < nkp; kp++) {
        __m512bh w[2];
        for (int c = 0; c < ND; c++) w[c] = (__m512bh)_mm512_loadu_si512(vp + (kp * D + (dv + c) * 16) * 2);
        for (int r = 0; r < QR; r++) {
            __m512bh pb = (__m512bh)_mm512_set1_epi32(p32[r * (KB / 2) + kp]);
            for (int c = 0; c < ND; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, w[c]);
        }
    }
    for (int r = 0; r < QR; r++)
        for (int c = 0; c < ND; c++) _mm512_storeu_ps(o + r * D + (dv + c) * 16, acc[r][c]);
}

/* QR query rows i0.. (n_real of them real) of one head over all visible keys. */
static void query_block(const uint16_t *q, int64_t qsT, int64_t n_real, int64_t i0, int64_t S,
                        int64_t D, const uint16_t *kp, const uint16_t *vp, int causal, int64_t offset,
                        float scale, uint16_t *out, int64_t osT) {
    const int64_t P = D / 2;
    int32_t q32[QR * MAX_D / 2], p32[QR * KB / 2];
    float s[QR][KB], m[QR], l[QR], o[QR * MAX_D];
    for (int r = 0; r < QR; r++) {
        if (r < n_real) memcpy(q32 + r * P, q + r * qsT, sizeof(uint16_t) * D);
        else memset(q32 + r * P, 0, sizeof(uint16_t) * D);
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(o, 0, sizeof(float) * QR * D);
    int64_t end = S; /* keys past the last row's horizon are never visible */
    if (causal) {
        int64_t last = i0 + n_real - 1 + offset + 1;
        end = last < S ? last : S;
        if (end < 0) end = 0;
    }
    for (int64_t s0 = 0; s0 < end; s0 += KB) {
        int64_t nb = end - s0 < KB ? end - s0 : KB;
        for (int64_t j = 0; j < nb; j += 32) scores32(q32, D, kp + ((s0 + j) / 16) * 16 * D, scale, &s[0][j], KB);
        int64_t nb32 = (nb + 31) & ~(int64_t)31;
        for (int r = 0; r < QR; r++) {
            int64_t horizon = causal ? i0 + r + offset + 1 - s0 : nb; /* keys [0, horizon) of the block */
            if (horizon > nb) horizon = nb;
            if (horizon < 0) horizon = 0;
            for (int64_t j = horizon; j < nb32; j++) s[r][j] = -INFINITY;
            for (int64_t j = nb32; j < KB; j++) s[r][j] = -INFINITY;
            if (horizon == 0) {
                memset(p32 + r * (KB / 2), 0, sizeof(int32_t) * KB / 2);
                continue;
            }
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int j = 0; j < KB; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(&s[r][j]));
            float bmax = _mm512_reduce_max_ps(mx);
            float mnew = bmax > m[r] ? bmax : m[r];
            if (mnew > m[r] && l[r] > 0.0f) {
                float alpha = _mm512_cvtss_f32(exp16(_mm512_set1_ps(m[r] - mnew)));
                l[r] *= alpha;
                __m512 va = _mm512_set1_ps(alpha);
                for (int64_t d = 0; d < D; d += 16)
                    _mm512_storeu_ps(o + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + d), va));
            }
            m[r] = mnew;
            __m512 vm = _mm512_set1_ps(mnew), sum = _mm512_setzero_ps();
            uint16_t *pb = (uint16_t *)(p32 + r * (KB / 2));
            for (int j = 0; j < KB; j += 16) {
                __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(&s[r][j]), vm));
                __m256i eb = round16(e);
                _mm256_storeu_si256((__m256i *)(pb + j), eb);
                /* the sum is of the probabilities as rounded for the product with v */
                sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(eb), 16)));
            }
            l[r] += _mm512_reduce_add_ps(sum);
        }
        int64_t nkp = (nb + 1) / 2;
        const uint16_t *vb = vp + (s0 / 2) * D * 2;
        int64_t dv = 0, ndv = D / 16;
        for (; dv + 2 <= ndv; dv += 2) pv_rows(p32, nkp, vb, D, dv, o, 2);
        if (dv < ndv) pv_rows(p32, nkp, vb, D, dv, o, 1);
    }
    for (int64_t r = 0; r < n_real; r++) {
        float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        __m512 vi = _mm512_set1_ps(inv);
        for (int64_t d = 0; d < D; d += 16)
            _mm256_storeu_si256((__m256i *)(out + r * osT + d), round16(_mm512_mul_ps(_mm512_loadu_ps(o + r * D + d), vi)));
    }
}

/* Returns 0, 1 for unsupported sizes, 2 when out of memory. */
int bf16_flash_attn(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t B, int64_t Hq, int64_t Hkv,
                    int64_t T, int64_t S, int64_t D, int64_t qsB, int64_t qsH, int64_t qsT, int64_t ksB,
                    int64_t ksH, int64_t ksS, int64_t vsB, int64_t vsH, int64_t vsS, int causal, int64_t offset,
                    float scale, uint16_t *out, int nthreads) {
    if (B <= 0 || T <= 0) return 0;
    if (Hkv <= 0 || Hq % Hkv || D <= 0 || D % 16 || D > MAX_D || S < 0) return 1;
    const int64_t G = Hq / Hkv, Sp = (S + KB - 1) / KB * KB, heads = B * Hkv;
    uint16_t *packed = malloc(sizeof(uint16_t) * (size_t)(2 * heads * Sp * D + 1));
    if (!packed) return 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < heads; t++) {
        int64_t b = t / Hkv, h = t % Hkv;
        pack_kv(k + b * ksB + h * ksH, v + b * vsB + h * vsH, S, Sp, D, ksS, vsS, packed + 2 * t * Sp * D,
                packed + (2 * t + 1) * Sp * D);
    }
    const int64_t qblocks = (T + QR - 1) / QR, tasks = B * Hq * qblocks, osT = Hq * D;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t qb = task % qblocks, bh = task / qblocks, b = bh / Hq, h = bh % Hq;
        int64_t i0 = qb * QR, n = T - i0 < QR ? T - i0 : QR;
        int64_t kvh = b * Hkv + h / G;
        query_block(q + b * qsB + h * qsH + i0 * qsT, qsT, n, i0, S, D, packed + 2 * kvh * Sp * D,
                    packed + (2 * kvh + 1) * Sp * D, causal, offset, scale, out + (b * T + i0) * osT + h * D, osT);
    }
    free(packed);
    return 0;
}
