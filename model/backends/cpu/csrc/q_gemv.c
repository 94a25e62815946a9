/* Weight-only int8 / int4 matrix-vector product (decode) and dequantization (prefill) on x86.

   y[m, n] = sum_g ( s[n, g] * sum_{k in g} x[m, k] * q[n, k]  +  z[n, g] * sum_{k in g} x[m, k] )
             (+ bias[n]),   m < M <= 8,   fp32 sums, one rounding to bf16.

   Weights (model/quantize.py writes them):
   - int8: q[n, k] a signed byte, W row n = K bytes; the weight is s * q (z absent: symmetric);
   - int4: q[n, k] in 0..15, two per byte; in each block of 32 columns, byte j holds column j in
     its low nibble and column 16 + j in its high nibble; W row n = K / 2 bytes; the weight is
     s * q + z (z: the group's offset, the "min" of llama.cpp's Q4_1).
   s and z are fp16, (N, K / G) for a group size G that is a multiple of 16 (K a multiple of 32
   for int4). The z term is one product per group with the group sums of x, computed once per call.

   Decode is bound by the bytes of W: each weight row is read once for all M rows of x, widened
   to fp32 in registers 16 columns at a time, multiplied with x (converted to fp32 once per call)
   into a per-group accumulator, which is scaled into the row's accumulator at the group's end.
   The same source builds for AVX2 + FMA + F16C (two 8-lane halves per 16 columns) and for
   AVX-512 (one 16-lane register), chosen by the compiler flags. Rows of W are split over
   OpenMP threads in blocks; with nthreads == 1 no parallel region is entered. On AVX-512 one row
   of x (batch-1 decode) has kernels of its own that read W as one sequential stream per thread
   (stream_rows). q_moe1 runs one token through K experts of a bank in one call. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_common.h"

#define MAX_ROWS 8
#define ROW_BLOCK 16
#define MIN_PARALLEL (1 << 18) /* weights below this many elements use one thread */

static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

#ifdef __AVX512F__
typedef __m512 vec16;
static inline vec16 v_zero(void) { return _mm512_setzero_ps(); }
static inline vec16 v_set1(float a) { return _mm512_set1_ps(a); }
static inline vec16 v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v_store(float *p, vec16 v) { _mm512_storeu_ps(p, v); }
static inline vec16 v_fma(vec16 a, vec16 b, vec16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline float v_sum(vec16 v) { return _mm512_reduce_add_ps(v); }
/* 16 signed bytes -> 16 fp32 */
static inline vec16 w_int8(const int8_t *w) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
}
/* the low (hi = 0) or high nibbles of 16 bytes -> 16 fp32 */
static inline vec16 w_int4(const uint8_t *block, int hi) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)block));
    b = hi ? _mm512_srli_epi32(b, 4) : _mm512_and_si512(b, _mm512_set1_epi32(15));
    return _mm512_cvtepi32_ps(b);
}
#else
typedef struct { __m256 a, b; } vec16;
static inline vec16 v_zero(void) { vec16 v = {_mm256_setzero_ps(), _mm256_setzero_ps()}; return v; }
static inline vec16 v_set1(float a) { vec16 v = {_mm256_set1_ps(a), _mm256_set1_ps(a)}; return v; }
static inline vec16 v_load(const float *p) { vec16 v = {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; return v; }
static inline void v_store(float *p, vec16 v) { _mm256_storeu_ps(p, v.a); _mm256_storeu_ps(p + 8, v.b); }
static inline vec16 v_fma(vec16 a, vec16 b, vec16 c) {
    vec16 v = {_mm256_fmadd_ps(a.a, b.a, c.a), _mm256_fmadd_ps(a.b, b.b, c.b)};
    return v;
}
static inline float v_sum(vec16 v) {
    __m256 t = _mm256_add_ps(v.a, v.b);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
static inline vec16 w_int8(const int8_t *w) {
    __m128i b = _mm_loadu_si128((const __m128i *)w);
    vec16 v = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
               _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)))};
    return v;
}
static inline vec16 w_int4(const uint8_t *block, int hi) {
    __m128i b = _mm_loadu_si128((const __m128i *)block);
    __m256i lo8 = _mm256_cvtepu8_epi32(b), hi8 = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(b, b));
    if (hi) {
        lo8 = _mm256_srli_epi32(lo8, 4);
        hi8 = _mm256_srli_epi32(hi8, 4);
    } else {
        const __m256i mask = _mm256_set1_epi32(15);
        lo8 = _mm256_and_si256(lo8, mask);
        hi8 = _mm256_and_si256(hi8, mask);
    }
    vec16 v = {_mm256_cvtepi32_ps(lo8), _mm256_cvtepi32_ps(hi8)};
    return v;
}
#endif

/* 16 weights of a row from column k (a multiple of 16) as fp32 */
static inline __attribute__((always_inline)) vec16 w_load(const uint8_t *row, int64_t k, const int BITS) {
    if (BITS == 8) return w_int8((const int8_t *)row + k);
    return w_int4(row + (k >> 5) * 16, (int)((k >> 4) & 1));
}

/* --- the product: activations quantized to int8 per block of 32, integer dot products ---------

   Per call, each row of x is quantized in blocks of 32 columns: sx = max|x| / 127, xq = round(x / sx)
   (llama.cpp's Q8_0 for activations). A block's dot product with a weight row is then a sum of
   byte products in int32 (AVX-512 VNNI's vpdpbusd, or AVX2's vpmaddubsw + vpmaddwd), scaled once
   by sx * s: about four times fewer instructions per weight than widening every weight to fp32,
   which is what lets int4 decode run at memory speed. The zero point's term z * sum(x) uses the
   sums of the quantized x. Products of 32-column blocks: K is a multiple of 32, groups hold whole blocks. */

#define BLOCK 32

/* the byte order of one block of xq: AVX-512 pairs blocks into 64-byte chunks laid out as the
   unpacked int4 weights come (see w4_chunk); the AVX2 code reads blocks in column order */
#ifdef __AVX512F__
/* AVX-512 reads 128 columns (4 blocks) per step. int4: the 64 bytes of the 4 blocks give, masked,
   the low nibbles (columns 0..15 of each block) and, shifted, the high ones (16..31), so xq's
   chunk holds [b0 c0..15 | b1 c0..15 | b2 c0..15 | b3 c0..15 | the same for c16..31]; 32-bit lane
   l of either half covers block l / 4. int8: columns in order, two 64-byte halves, lane l of half
   h covers block 2h + l / 8. sx holds, per row of x and chunk, each half's lane scales (32). */
#define CHUNK 128
#define SX_PER_ROW(K, Kp) ((Kp) / 4)
static inline int lane_block(int half, int lane, int bits) { return bits == 4 ? lane / 4 : 2 * half + lane / 8; }
static inline void set_block_scale(float *sx, int64_t m, int64_t b, int64_t K, int64_t Kp, int bits, float scale) {
    (void)K;
    float *lanes = sx + m * SX_PER_ROW(K, Kp) + (b / 4) * 32;
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 16; l++)
            if (lane_block(h, l, bits) == (int)(b & 3)) lanes[h * 16 + l] = scale;
}
static inline int64_t xq_index(int64_t k, int bits) {
    if (bits == 8) return k;
    int64_t c = k / 128, b = (k / 32) & 3, j = k & 31;
    return c * 128 + (j >= 16) * 64 + b * 16 + (j & 15);
}
#else
#define CHUNK 32
#define SX_PER_ROW(K, Kp) ((K) / BLOCK)
static inline void set_block_scale(float *sx, int64_t m, int64_t b, int64_t K, int64_t Kp, int bits, float scale) {
    (void)Kp, (void)bits;
    sx[m * (K / BLOCK) + b] = scale;
}
static inline int64_t xq_index(int64_t k, int bits) { (void)bits; return k; }
#endif

/* x (M, K) -> xq (M, Kp) int8 in the order above (Kp = K rounded up to CHUNK, zero padded), the
   block scales sx, and when xs is set, xs (M, K / G): each group's sum of the quantized x (the
   zero point's term then uses the same x as the codes' term: with exact sums, the error of x's
   rounding would meet the codes' q * s, several times the weight, instead of the weight). */
#ifdef __AVX512F__
/* 16 activations from element idx, bf16 or fp32, as fp32 */
static inline __m512 x_load16(const void *x, int x_f32, int64_t idx) {
    if (x_f32) return _mm512_loadu_ps((const float *)x + idx);
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + idx)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

/* The same numbers as the scalar code below (the same products, rounded by the same MXCSR mode),
   a block of 32 at a time. */
static void quantize_x(const void *x, int x_f32, int64_t M, int64_t K, int64_t Kp, int64_t G, int bits,
                       int8_t *xq, float *sx, float *xs) {
    for (int64_t m = 0; m < M; m++) {
        int8_t *row = xq + m * Kp;
        float *lanes = sx + m * SX_PER_ROW(K, Kp);
        memset(row, 0, (size_t)Kp);
        memset(lanes, 0, (size_t)SX_PER_ROW(K, Kp) * sizeof(float));
        if (xs) memset(xs + m * (K / G), 0, (size_t)(K / G) * sizeof(float));
        for (int64_t b = 0; b < K / BLOCK; b++) {
            __m512 a = x_load16(x, x_f32, m * K + b * BLOCK), c = x_load16(x, x_f32, m * K + b * BLOCK + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
            float scale = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
            float *l = lanes + (b / 4) * 32;
            if (bits == 4) { /* lanes 4 (b % 4) .. + 3 of both halves (see set_block_scale) */
                _mm_storeu_ps(l + 4 * (b & 3), _mm_set1_ps(scale));
                _mm_storeu_ps(l + 16 + 4 * (b & 3), _mm_set1_ps(scale));
            } else { /* half (b % 4) / 2, lanes 8 (b % 2) .. + 7 */
                _mm256_storeu_ps(l + 16 * ((b & 3) >> 1) + 8 * (b & 1), _mm256_set1_ps(scale));
            }
            __m512 vinv = _mm512_set1_ps(inv);
            __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, vinv)), qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, vinv));
            int64_t first = bits == 8 ? b * BLOCK : (b / 4) * 128 + (b & 3) * 16, second = bits == 8 ? first + 16 : first + 64;
            _mm_storeu_si128((__m128i *)(row + first), _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(row + second), _mm512_cvtepi32_epi8(qc));
            if (xs) xs[m * (K / G) + b * BLOCK / G] += scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
        }
    }
}
#else
static void quantize_x(const void *x, int x_f32, int64_t M, int64_t K, int64_t Kp, int64_t G, int bits,
                       int8_t *xq, float *sx, float *xs) {
    for (int64_t m = 0; m < M; m++) {
        float row[BLOCK];
        memset(xq + m * Kp, 0, (size_t)Kp);
        memset(sx + m * SX_PER_ROW(K, Kp), 0, (size_t)SX_PER_ROW(K, Kp) * sizeof(float));
        if (xs) memset(xs + m * (K / G), 0, (size_t)(K / G) * sizeof(float));
        for (int64_t b = 0; b < K / BLOCK; b++) {
            float amax = 0.0f;
            for (int j = 0; j < BLOCK; j++) {
                int64_t k = b * BLOCK + j;
                row[j] = x_f32 ? ((const float *)x)[m * K + k] : bf16_to_f32(((const uint16_t *)x)[m * K + k]);
                float a = row[j] < 0 ? -row[j] : row[j];
                amax = a > amax ? a : amax;
            }
            float scale = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
            set_block_scale(sx, m, b, K, Kp, bits, scale);
            int qsum = 0;
            for (int j = 0; j < BLOCK; j++) {
                int q = _mm_cvt_ss2si(_mm_set_ss(row[j] * inv));
                xq[m * Kp + xq_index(b * BLOCK + j, bits)] = (int8_t)q;
                qsum += q;
            }
            if (xs) xs[m * (K / G) + b * BLOCK / G] += scale * (float)qsum;
        }
    }
}
#endif

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* sum_g h[g] v[g] for fp16 h and fp32 v (a row's zero points times the group sums of x) */
static inline float half_dot(const uint16_t *h, const float *v, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= n; g += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + g))), _mm256_loadu_ps(v + g), acc);
    float sum = sum8(acc);
    for (; g < n; g++) sum += f16_to_f32(h[g]) * v[g];
    return sum;
}

/* sum_g a[g] b[g] in fp32 */
static inline float float_dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= n; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + g), _mm256_loadu_ps(b + g), acc);
    float sum = sum8(acc);
    for (; g < n; g++) sum += a[g] * b[g];
    return sum;
}

typedef struct {
    const int8_t *xq;
    const float *sx, *xs;
    int64_t K, Kp, G, N, ldw; /* ldw: bytes from one row of W to the next */
    const uint8_t *W;
    const uint16_t *S, *Z; /* Z may be NULL */
    const void *bias;      /* NULL, or bf16 (fp32 when y_f32) */
    void *y;
    int y_f32;
    int group_shift; /* G = 32 << group_shift */
    int64_t NG;      /* K / G: scales per row (a division kept out of the loops) */
} job;

/* log2(G / 32): G = 32 << group_shift_of(G) for the group sizes bad_shape admits */
static inline int group_shift_of(int64_t G) {
    int shift = 0;
    while ((BLOCK << shift) < G) shift++;
    return shift;
}

/* zero-point terms, bias, and the store of R rows' results */
static inline __attribute__((always_inline)) void finish_rows(const job *j, int64_t n, const int M, const int R,
                                                              float sums[4][MAX_ROWS]) {
    const int64_t NG = j->K / j->G;
    for (int r = 0; r < R; r++) {
        float zacc[MAX_ROWS] = {0};
        if (j->Z)
            for (int m = 0; m < M; m++) zacc[m] = half_dot(j->Z + (n + r) * NG, j->xs + m * NG, NG);
        float b = !j->bias ? 0.0f
                  : j->y_f32 ? ((const float *)j->bias)[n + r]
                             : bf16_to_f32(((const uint16_t *)j->bias)[n + r]);
        for (int m = 0; m < M; m++) store(j->y, j->y_f32, m * j->N + n + r, sums[r][m] + zacc[m] + b);
    }
}

#ifdef __AVX512F__
typedef __m512 facc;
static inline facc f_zero(void) { return _mm512_setzero_ps(); }
static inline float f_sum(facc v) { return _mm512_reduce_add_ps(v); }

/* mask of the bytes of chunk c that hold weights: all 64, or those of its first blocks at the end of a row */
static inline __mmask64 chunk_bytes(int64_t c, int64_t nblocks, int bits) {
    int64_t left = (nblocks - 4 * c) * (bits == 4 ? 16 : 32);
    return left >= 64 ? ~0ull : (1ull << left) - 1;
}

/* the weight scale of each lane's block, for the two halves of chunk c of one row, from the row's
   scales as fp32 (fs, padded with zeros past the row's last group): blocks 4c..4c+3 take groups
   (4c..4c+3) * 32 / G. One or two broadcasts for G >= 64; a permutation for G = 32. */
static inline __attribute__((always_inline)) void chunk_wscales(const float *fs, int64_t c, int gs, int bits,
                                                                __m512 sw[2]) {
    if (gs >= 2) { /* one group covers the chunk */
        sw[0] = sw[1] = _mm512_set1_ps(fs[(4 * c) >> gs]);
    } else if (gs == 1) { /* G = 64: blocks 4c, 4c + 1 -> group 2c; 4c + 2, 4c + 3 -> group 2c + 1 */
        __m512 a = _mm512_set1_ps(fs[2 * c]), b = _mm512_set1_ps(fs[2 * c + 1]);
        if (bits == 4) {
            sw[0] = sw[1] = _mm512_mask_blend_ps(0xFF00, a, b); /* lane l covers block l / 4 */
        } else {
            sw[0] = a; /* half h, lane l covers block 2h + l / 8 */
            sw[1] = b;
        }
    } else { /* G = 32: one group per block */
        __m512 four = _mm512_castps128_ps512(_mm_loadu_ps(fs + 4 * c));
        if (bits == 4) {
            sw[0] = sw[1] = _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), four);
        } else {
            sw[0] = _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0), four);
            sw[1] = _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2), four);
        }
    }
}

/* R rows of W from n against all M rows of x; inlined with constant M, R, BITS. Per chunk of 128
   columns and half: the int32 dot products of 4-column lanes, times the lanes' x scale and
   weight scale, into the row's accumulator. */
static inline __attribute__((always_inline)) void rows_kernel(const job *j, int64_t n, const int M, const int R,
                                                              const int BITS) {
    const int64_t K = j->K, nblocks = K / BLOCK, nchunks = j->Kp / CHUNK;
    const __m512i low4 = _mm512_set1_epi8(15);
    /* the R rows' weight scales as fp32, zero padded by 4 groups (a partial last chunk reads past the row) */
    const int64_t NG = j->NG, NGp = NG + 4;
    float fs[R * NGp];
    for (int r = 0; r < R; r++) {
        const uint16_t *S = j->S + (n + r) * NG;
        int64_t g = 0;
        for (; g + 16 <= NG; g += 16)
            _mm512_storeu_ps(fs + r * NGp + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(S + g))));
        for (; g < NG; g++) fs[r * NGp + g] = f16_to_f32(S[g]);
        for (; g < NGp; g++) fs[r * NGp + g] = 0.0f;
    }
    facc acc[4][MAX_ROWS];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = f_zero();
    for (int64_t c = 0; c < nchunks; c++) {
        const __mmask64 live = chunk_bytes(c, nblocks, BITS);
        for (int r = 0; r < R; r++) {
            const uint8_t *row = j->W + (n + r) * j->ldw;
            __m512i u[2];
            __mmask64 neg[2] = {0, 0};
            /* the same columns of the next R rows: the hardware prefetcher restarts at each row group
               (as in bf16_gemv.c); a prefetch past the end of W never faults */
            _mm_prefetch((const char *)(row + R * j->ldw + c * (BITS == 4 ? 64 : 128)), _MM_HINT_T0);
            if (BITS == 8) _mm_prefetch((const char *)(row + R * j->ldw + c * 128 + 64), _MM_HINT_T0);
            if (BITS == 4) {
                __m512i w = live == ~0ull ? _mm512_loadu_si512(row + c * 64) : _mm512_maskz_loadu_epi8(live, row + c * 64);
                u[0] = _mm512_and_si512(w, low4);
                u[1] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
            } else {
                for (int h = 0; h < 2; h++) {
                    int64_t left = (nblocks - 4 * c - 2 * h) * 32;
                    __mmask64 mask = left >= 64 ? ~0ull : left <= 0 ? 0 : (1ull << left) - 1;
                    __m512i w = mask == ~0ull ? _mm512_loadu_si512(row + c * 128 + h * 64)
                                              : _mm512_maskz_loadu_epi8(mask, row + c * 128 + h * 64);
                    neg[h] = _mm512_movepi8_mask(w);
                    u[h] = _mm512_abs_epi8(w);
                }
            }
            __m512 sw[2];
            chunk_wscales(fs + r * NGp, c, j->group_shift, BITS, sw);
            for (int m = 0; m < M; m++) {
                const int8_t *xq = j->xq + m * j->Kp + c * 128;
                const float *sx = j->sx + (m * nchunks + c) * 32;
                if (BITS == 4) {
                    /* both halves' lanes cover the same 4 blocks: one int32 sum, one scaling */
                    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[0], _mm512_loadu_si512(xq));
                    dot = _mm512_dpbusd_epi32(dot, u[1], _mm512_loadu_si512(xq + 64));
                    __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(sx), sw[0]);
                    acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r][m]);
                    continue;
                }
                for (int h = 0; h < 2; h++) {
                    __m512i xv = _mm512_loadu_si512(xq + h * 64);
                    xv = _mm512_mask_sub_epi8(xv, neg[h], _mm512_setzero_si512(), xv);
                    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[h], xv);
                    __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(sx + h * 16), sw[h]);
                    acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r][m]);
                }
            }
        }
    }
    float sums[4][MAX_ROWS];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) sums[r][m] = f_sum(acc[r][m]);
    finish_rows(j, n, M, R, sums);
}
#define R_ONE8 4
#define R_ONE4 4
#else
typedef __m256 facc;
static inline facc f_zero(void) { return _mm256_setzero_ps(); }
static inline float f_sum(facc v) { return sum8(v); }

/* R rows of W from n against all M rows of x; inlined with constant M, R, BITS. Per block of 32
   columns: the int32 dot product, times the x block scale, into a group accumulator; at the
   group's end times the weight scale. */
static inline __attribute__((always_inline)) void rows_kernel(const job *j, int64_t n, const int M, const int R,
                                                              const int BITS) {
    const int64_t K = j->K, G = j->G, NG = K / G, per_group = G / BLOCK;
    const __m256i ones = _mm256_set1_epi16(1);
    const __m128i low4 = _mm_set1_epi8(15);
    facc acc[4][MAX_ROWS];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = f_zero();
    for (int64_t g = 0; g < NG; g++) {
        facc gacc[4][MAX_ROWS];
        for (int r = 0; r < R; r++)
            for (int m = 0; m < M; m++) gacc[r][m] = f_zero();
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
            for (int r = 0; r < R; r++) {
                const uint8_t *row = j->W + (n + r) * j->ldw;
                __m256i u, w = _mm256_setzero_si256();
                if ((b & 3) == 0) /* the next R rows, a cache line ahead of where they will be read */
                    _mm_prefetch((const char *)(row + R * j->ldw + b * (BITS == 4 ? 16 : 32)), _MM_HINT_T0);
                if (BITS == 8 && (b & 1) == 0)
                    _mm_prefetch((const char *)(row + R * j->ldw + b * 32 + 64), _MM_HINT_T0);
                if (BITS == 4) {
                    __m128i p = _mm_loadu_si128((const __m128i *)(row + b * 16));
                    u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), low4), _mm_and_si128(p, low4));
                } else {
                    w = _mm256_loadu_si256((const __m256i *)(row + b * 32));
                    u = _mm256_sign_epi8(w, w); /* |w| */
                }
                for (int m = 0; m < M; m++) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(j->xq + m * j->Kp + b * 32));
                    if (BITS == 8) xv = _mm256_sign_epi8(xv, w);
                    __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), ones);
                    gacc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                                                 _mm256_broadcast_ss(j->sx + m * (K / BLOCK) + b), gacc[r][m]);
                }
            }
        }
        for (int r = 0; r < R; r++) {
            __m256 sw = _mm256_set1_ps(f16_to_f32(j->S[(n + r) * NG + g]));
            for (int m = 0; m < M; m++) acc[r][m] = _mm256_fmadd_ps(gacc[r][m], sw, acc[r][m]);
        }
    }
    float sums[4][MAX_ROWS];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) sums[r][m] = f_sum(acc[r][m]);
    finish_rows(j, n, M, R, sums);
}
/* one row of x: int8 reads one row of W at a time (21 Gweights/s per core against 12 with two rows
   side by side, on an EPYC); int4 two rows (the same or slightly faster) */
#define R_ONE8 1
#define R_ONE4 2
#endif

#define BLOCK_FN(BITS_, M_, R_)                                                                  \
    static void block_b##BITS_##_m##M_(const job *j, int64_t n0, int64_t n1) {                  \
        int64_t n = n0;                                                                          \
        for (; n + R_ <= n1; n += R_) rows_kernel(j, n, M_, R_, BITS_);                          \
        for (; n < n1; n++) rows_kernel(j, n, M_, 1, BITS_);                                     \
    }

#define BLOCKS_FOR(BITS_)                                                                        \
    BLOCK_FN(BITS_, 1, R_ONE##BITS_)                                                             \
    BLOCK_FN(BITS_, 2, 2)                                                                        \
    BLOCK_FN(BITS_, 3, 1)                                                                        \
    BLOCK_FN(BITS_, 4, 1)                                                                        \
    BLOCK_FN(BITS_, 5, 1)                                                                        \
    BLOCK_FN(BITS_, 6, 1)                                                                        \
    BLOCK_FN(BITS_, 7, 1)                                                                        \
    BLOCK_FN(BITS_, 8, 1)

BLOCKS_FOR(8)
BLOCKS_FOR(4)

#ifdef __AVX512F__
/* One row of x (decode at batch 1): each row of W is read start to end before the next, one
   sequential stream per thread (as block_m1 of bf16_gemv_dp.c), four chunks per step into four
   accumulators, the row's scales converted to fp32 once. int8 weights enter vpdpbusd as q + 128
   (one xor), and 128 times the scaled group sums of x (as the zero points' term of int4) come off
   at the row's end, instead of the sign transfer of the R-row kernel (three instructions per 64
   bytes).
   Measured on a 2-core AVX512-VNNI EPYC (Zen 4), int4 group 64, one thread: 27-29 Gweights/s
   against 16-18 for the R-row kernel, which reads 4 rows side by side (two rows side by side
   here ran at half speed); two threads 28-30 GB/s of codes, the machine's copy speed. */
static inline __attribute__((always_inline)) void stream_chunk(const job *j, const uint8_t *row, const float *fs,
                                                               int64_t c, int64_t nblocks, const int BITS, const int TAIL,
                                                               __m512 *acc) {
    const __m512i low4 = _mm512_set1_epi8(15), top = _mm512_set1_epi8((char)0x80);
    const int8_t *xq = j->xq + c * 128;
    const float *sx = j->sx + c * 32;
    __m512 sw[2];
    chunk_wscales(fs, c, j->group_shift, BITS, sw);
    if (BITS == 4) {
        __m512i w = TAIL ? _mm512_maskz_loadu_epi8(chunk_bytes(c, nblocks, 4), row + c * 64) : _mm512_loadu_si512(row + c * 64);
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w, low4), _mm512_loadu_si512(xq));
        dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(w, 4), low4), _mm512_loadu_si512(xq + 64));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_loadu_ps(sx), sw[0]), *acc);
        return;
    }
    for (int h = 0; h < 2; h++) {
        __m512i w;
        if (TAIL) {
            int64_t left = (nblocks - 4 * c - 2 * h) * 32;
            __mmask64 mask = left >= 64 ? ~0ull : left <= 0 ? 0 : (1ull << left) - 1;
            w = _mm512_maskz_loadu_epi8(mask, row + c * 128 + h * 64);
        } else {
            w = _mm512_loadu_si512(row + c * 128 + h * 64);
        }
        /* the codes enter as q + 128 (unsigned); stream_rows takes 128 sum(x) back out per group */
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(w, top), _mm512_loadu_si512(xq + h * 64));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_loadu_ps(sx + h * 16), sw[h]), *acc);
    }
}

static inline __attribute__((always_inline)) void stream_rows(const job *j, int64_t n0, int64_t n1, const int BITS) {
    const int64_t K = j->K, nblocks = K / BLOCK, nchunks = j->Kp / CHUNK, full = nblocks / 4, NG = j->NG;
    float fs[NG + 16];
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = j->W + n * j->ldw;
        const uint16_t *S = j->S + n * NG;
        int64_t g = 0;
        for (; g + 16 <= NG; g += 16) _mm512_storeu_ps(fs + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(S + g))));
        /* the last groups, then zeros past them (a partial last chunk reads up to 4 groups on) */
        __mmask16 tail = (__mmask16)((1u << (NG - g)) - 1);
        _mm512_storeu_ps(fs + g, _mm512_maskz_cvtph_ps(tail, _mm256_maskz_loadu_epi16(tail, S + g)));
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = acc0, acc3 = acc0;
        int64_t c = 0;
        for (; c + 4 <= full; c += 4) {
            stream_chunk(j, row, fs, c, nblocks, BITS, 0, &acc0);
            stream_chunk(j, row, fs, c + 1, nblocks, BITS, 0, &acc1);
            stream_chunk(j, row, fs, c + 2, nblocks, BITS, 0, &acc2);
            stream_chunk(j, row, fs, c + 3, nblocks, BITS, 0, &acc3);
        }
        for (; c < full; c++) stream_chunk(j, row, fs, c, nblocks, BITS, 0, &acc0);
        for (; c < nchunks; c++) stream_chunk(j, row, fs, c, nblocks, BITS, 1, &acc1);
        float sums[4][MAX_ROWS];
        sums[0][0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
        if (BITS == 8) { /* sum_g s_g sum_k (q + 128) x = the product + 128 sum_g s_g xs_g */
            sums[0][0] -= 128.0f * float_dot(fs, j->xs, NG);
        }
        finish_rows(j, n, 1, 1, sums);
    }
}

static void stream_b4(const job *j, int64_t n0, int64_t n1) { stream_rows(j, n0, n1, 4); }
static void stream_b8(const job *j, int64_t n0, int64_t n1) { stream_rows(j, n0, n1, 8); }
#define M1_B8 stream_b8
#define M1_B4 stream_b4
#else
#define M1_B8 block_b8_m1
#define M1_B4 block_b4_m1
#endif

typedef void (*block_fn)(const job *, int64_t, int64_t);

static const block_fn BLOCKS8[MAX_ROWS + 1] = {0, M1_B8, block_b8_m2, block_b8_m3, block_b8_m4,
                                               block_b8_m5, block_b8_m6, block_b8_m7, block_b8_m8};
static const block_fn BLOCKS4[MAX_ROWS + 1] = {0, M1_B4, block_b4_m2, block_b4_m3, block_b4_m4,
                                               block_b4_m5, block_b4_m6, block_b4_m7, block_b4_m8};

/* 0 when the shapes are ones the kernels take: whole 32-column blocks in whole groups. */
static int bad_shape(int64_t K, int64_t G, int bits) {
    if (bits != 4 && bits != 8) return 1;
    return G < BLOCK || (G & (G - 1)) || K % G; /* G a power of two */
}

/* Returns 0 on success, 1 for an unsupported shape or M, 2 when a scratch allocation fails. */
static int gemv(const void *x, int x_f32, int64_t M, int64_t K, const uint8_t *W, const uint16_t *S,
                const uint16_t *Z, int64_t N, int64_t G, int bits, const void *bias, void *y, int y_f32,
                int nthreads) {
    if (M < 1 || M > MAX_ROWS || bad_shape(K, G, bits)) return 1;
    if (N <= 0) return 0;
    int64_t Kp = (K + CHUNK - 1) / CHUNK * CHUNK;
    int8_t *xq = (int8_t *)malloc((size_t)(M * Kp));
    float *sx = (float *)malloc((size_t)(M * SX_PER_ROW(K, Kp)) * sizeof(float));
    /* group sums of the quantized x: the zero points' term (int4), and on AVX-512 the offset of
       the q + 128 codes of one row of x (int8, stream_rows) */
    float *xs = Z || (bits == 8 && M == 1) ? (float *)malloc((size_t)(M * (K / G)) * sizeof(float)) : NULL;
    if (!xq || !sx || ((Z || (bits == 8 && M == 1)) && !xs)) {
        free(xq);
        free(sx);
        free(xs);
        return 2;
    }
    quantize_x(x, x_f32, M, K, Kp, G, bits, xq, sx, xs);
    job j = {xq, sx, xs, K, Kp, G, N, bits == 8 ? K : K / 2, W, S, Z, bias, y, y_f32, group_shift_of(G), K / G};
    block_fn fn = (bits == 8 ? BLOCKS8 : BLOCKS4)[M];
    int64_t nblocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
    if (nthreads <= 1 || nblocks < 2 || N * K < MIN_PARALLEL) {
        fn(&j, 0, N);
    } else {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            int64_t n0 = blk * ROW_BLOCK;
            fn(&j, n0, n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N);
        }
    }
    free(xq);
    free(sx);
    free(xs);
    return 0;
}

/* x (M, K) and y (M, N) bf16, or both fp32 when f32 (bias then fp32 too): y = x W^T + bias. */
int q_gemv(const void *x, int64_t M, int64_t K, const uint8_t *W, const uint16_t *S, const uint16_t *Z,
           int64_t N, int64_t G, int bits, const void *bias, void *y, int f32, int nthreads) {
    return gemv(x, f32, M, K, W, S, Z, N, G, bits, bias, y, f32, nthreads);
}

/* The weight as fp32: out (N, K) = s * q (+ z). Prefill multiplies many rows of x by it. */
int q_dequant(const uint8_t *W, const uint16_t *S, const uint16_t *Z, int64_t N, int64_t K, int64_t G, int bits,
              float *out, int nthreads) {
    if (bad_shape(K, G, bits)) return 1;
    const int64_t NG = K / G, ldw = bits == 8 ? K : K / 2;
    int threads = N * K < MIN_PARALLEL ? 1 : nthreads;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = W + n * ldw;
        for (int64_t g = 0; g < NG; g++) {
            vec16 s = v_set1(f16_to_f32(S[n * NG + g]));
            vec16 z = v_set1(Z ? f16_to_f32(Z[n * NG + g]) : 0.0f);
            for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
                vec16 w = bits == 8 ? w_load(row, k, 8) : w_load(row, k, 4);
                v_store(out + n * K + k, v_fma(w, s, z));
            }
        }
    }
    return 0;
}

/* --- quantization (what model/backends/qformat.py's quantize_tensor computes, bit for bit) ------

   W (N, K) bf16 (w_f32 = 0) or fp32 (w_f32 = 1), rows ldw elements apart -> codes (int8 (N, K), or
   int4 (N, K / 2) in the nibble layout above), scales S and zeros Z (fp16 (N, K / G); Z only for
   int4). Per group, in fp32 as torch does it: int8 s = fp16(min(max|w| / 127, 65504)),
   q = round(w / s) clamped to [-127, 127]; int4 s = fp16(min((max - min) / 15, 65504)),
   z = fp16(clamp(min)), q = round((w - z) / s) clamped to [0, 15]; q = 0 where s = 0. */

static inline uint16_t f32_to_f16(float f) { return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
static inline float round_even(float v) { return _mm_cvtss_f32(_mm_round_ss(_mm_setzero_ps(), _mm_set_ss(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }

int q_quantize(const void *W, int w_f32, int64_t N, int64_t K, int64_t ldw, int64_t G, int bits, uint8_t *codes,
               uint16_t *S, uint16_t *Z, int nthreads) {
    if ((bits != 4 && bits != 8) || G < 1 || K % G || (bits == 4 && (K % 32 || G % 2))) return 1;
    const int64_t NG = K / G;
    int threads = N * K < MIN_PARALLEL ? 1 : nthreads;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *w = (float *)malloc((size_t)G * sizeof(float));
        uint8_t *q4 = bits == 4 ? (uint8_t *)malloc((size_t)K) : NULL;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            for (int64_t g = 0; g < NG; g++) {
                float lo = 0.0f, hi = 0.0f, amax = 0.0f;
                for (int64_t j = 0; j < G; j++) {
                    int64_t k = n * ldw + g * G + j;
                    float v = w_f32 ? ((const float *)W)[k] : bf16_to_f32(((const uint16_t *)W)[k]);
                    w[j] = v;
                    if (j == 0 || v < lo) lo = v;
                    if (j == 0 || v > hi) hi = v;
                    float a = v < 0 ? -v : v;
                    amax = a > amax ? a : amax;
                }
                if (bits == 8) {
                    float s32 = amax / 127.0f;
                    uint16_t sh = f32_to_f16(s32 > 65504.0f ? 65504.0f : s32);
                    float s = f16_to_f32(sh);
                    S[n * NG + g] = sh;
                    int8_t *row = (int8_t *)codes + n * K + g * G;
                    for (int64_t j = 0; j < G; j++) {
                        float v = s > 0 ? round_even(w[j] / (s < 1e-30f ? 1e-30f : s)) : 0.0f;
                        row[j] = (int8_t)(v < -127.0f ? -127 : v > 127.0f ? 127 : (int)v);
                    }
                } else {
                    float s32 = (hi - lo) / 15.0f;
                    uint16_t sh = f32_to_f16(s32 > 65504.0f ? 65504.0f : s32);
                    float l = lo < -65504.0f ? -65504.0f : lo > 65504.0f ? 65504.0f : lo;
                    uint16_t zh = f32_to_f16(l);
                    float s = f16_to_f32(sh), z = f16_to_f32(zh);
                    S[n * NG + g] = sh;
                    Z[n * NG + g] = zh;
                    for (int64_t j = 0; j < G; j++) {
                        float v = s > 0 ? round_even((w[j] - z) / (s < 1e-30f ? 1e-30f : s)) : 0.0f;
                        q4[g * G + j] = (uint8_t)(v < 0.0f ? 0 : v > 15.0f ? 15 : (int)v);
                    }
                }
            }
            if (bits == 4) {
                uint8_t *row = codes + n * (K / 2);
                for (int64_t b = 0; b < K / 32; b++)
                    for (int j = 0; j < 16; j++) row[b * 16 + j] = (uint8_t)(q4[b * 32 + j] | (q4[b * 32 + 16 + j] << 4));
            }
        }
        free(w);
        free(q4);
    }
    return 0;
}

/* --- one token through a quantized expert bank (decode at batch 1) ---------------------------------

   y = sum_k weights[k] * down_e(silu(gate_e(x)) * up_e(x)),  e = experts[k],  for one row x (H):
   the products of q_gemv with one parallel region for the whole layer instead of 2 K calls, x
   quantized once for all gate/up products, the SwiGLU and the weighted sum in fp32 with one
   rounding of y to bf16 (the separate products round each expert's output to bf16 first).
   Bank layout (model/quantize.py's QuantExpertBank): per expert e, gate_up rows 0..I-1 the gate
   and I..2I-1 the up projection, (2I, H) codes; down (H, I) codes; codes, scales and zeros of
   expert e at e times the given strides (bytes for codes, elements for scales and zeros). */

#define MOE_MAX_K 16

int q_moe1(const void *x, int64_t H, int64_t I, int64_t nk, const int64_t *experts, const float *weights,
           const uint8_t *Wgu, int64_t wgu_stride, const uint16_t *Sgu, const uint16_t *Zgu, int64_t sgu_stride, int64_t Ggu,
           const uint8_t *Wd, int64_t wd_stride, const uint16_t *Sd, const uint16_t *Zd, int64_t sd_stride, int64_t Gd,
           int bits, void *y, int nthreads) {
    if (nk < 1 || nk > MOE_MAX_K || bad_shape(H, Ggu, bits) || bad_shape(I, Gd, bits)) return 1;
    const int64_t Hp = (H + CHUNK - 1) / CHUNK * CHUNK, Ip = (I + CHUNK - 1) / CHUNK * CHUNK;
    const int64_t sxh = SX_PER_ROW(H, Hp), sxi = SX_PER_ROW(I, Ip);
    /* scratch: x quantized; gate/up outputs (nk, 2I) fp32; the activations quantized per expert;
       down outputs (nk, H) fp32 */
    int8_t *xq = (int8_t *)malloc((size_t)(Hp + nk * Ip));
    float *fbuf = (float *)malloc((size_t)(sxh + H / Ggu + nk * (2 * I + sxi + I / Gd + H)) * sizeof(float));
    if (!xq || !fbuf) {
        free(xq);
        free(fbuf);
        return 2;
    }
    int8_t *aq = xq + Hp;
    float *sx = fbuf, *xs = sx + sxh, *h = xs + H / Ggu, *sa = h + nk * 2 * I, *as = sa + nk * sxi, *d = as + nk * (I / Gd);
    quantize_x(x, 0, 1, H, Hp, Ggu, bits, xq, sx, xs);
    const int group_shift_gu = group_shift_of(Ggu), group_shift_d = group_shift_of(Gd);
    job gu[MOE_MAX_K], dn[MOE_MAX_K];
    for (int64_t k = 0; k < nk; k++) {
        int64_t e = experts[k];
        job a = {xq, sx, xs, H, Hp, Ggu, 2 * I, bits == 8 ? H : H / 2,
                 Wgu + e * wgu_stride, Sgu + e * sgu_stride, Zgu ? Zgu + e * sgu_stride : NULL, NULL,
                 h + k * 2 * I, 1, group_shift_gu, H / Ggu};
        job b = {aq + k * Ip, sa + k * sxi, as + k * (I / Gd), I, Ip, Gd, H,
                 bits == 8 ? I : I / 2, Wd + e * wd_stride, Sd + e * sd_stride, Zd ? Zd + e * sd_stride : NULL, NULL,
                 d + k * H, 1, group_shift_d, I / Gd};
        gu[k] = a;
        dn[k] = b;
    }
    block_fn fn = (bits == 8 ? BLOCKS8 : BLOCKS4)[1];
    const int64_t gu_blocks = (2 * I + ROW_BLOCK - 1) / ROW_BLOCK, d_blocks = (H + ROW_BLOCK - 1) / ROW_BLOCK;
    int threads = nthreads > 1 && nk * 2 * I * H >= MIN_PARALLEL ? nthreads : 1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < nk * gu_blocks; item++) {
            int64_t k = item / gu_blocks, n0 = (item % gu_blocks) * ROW_BLOCK;
            fn(&gu[k], n0, n0 + ROW_BLOCK < 2 * I ? n0 + ROW_BLOCK : 2 * I);
        }
#pragma omp for schedule(static)
        for (int64_t k = 0; k < nk; k++) { /* SwiGLU, then the activations quantized for the down product */
            float *g = h + k * 2 * I;
            for (int64_t i = 0; i < I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * g[I + i];
            quantize_x(g, 1, 1, I, Ip, Gd, bits, aq + k * Ip, sa + k * sxi, as + k * (I / Gd));
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < nk * d_blocks; item++) {
            int64_t k = item / d_blocks, n0 = (item % d_blocks) * ROW_BLOCK;
            fn(&dn[k], n0, n0 + ROW_BLOCK < H ? n0 + ROW_BLOCK : H);
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < H; n++) {
            float s = 0.0f;
            for (int64_t k = 0; k < nk; k++) s += weights[k] * d[k * H + n];
            ((uint16_t *)y)[n] = f32_to_bf16(s);
        }
    }
    free(xq);
    free(fbuf);
    return 0;
}
