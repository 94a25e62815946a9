/* Streaming bf16 matrix-vector product for CPUs with AVX2 + FMA but no native bf16.

   y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]),  m < M <= 8,  accumulated in fp32.

   Decode at batch 1 is bound by the bytes of W, so each row of W is read once for all M rows
   of x. A bf16 is the top half of an fp32, so a 256-bit load of 16 bf16 weights holds, in each
   32-bit lane i, w[2i] in the low half and w[2i+1] in the high half: a shift left by 16 gives
   the 8 even weights as fp32 and a mask of the high half gives the 8 odd ones (two cheap
   integer ops per 16 weights, no cross-lane widening). x is converted to fp32 once per call in
   the matching order: per 16-wide chunk, its 8 even elements then its 8 odd ones; the K % 16
   tail stays in natural order and is summed in scalar code.

   Rows of W are `ldw` elements apart, so W may be a view such as stacked[e] of an (E, N, K)
   tensor. Work is split over blocks of rows of W with OpenMP; with nthreads == 1 no parallel
   region is entered. Each group of rows prefetches the next group's rows as it goes. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_common.h"

#define MAX_ROWS 8
#define ROW_BLOCK 16 /* rows of W per OpenMP work item (a multiple of every R below) */
#define MIN_PARALLEL (1 << 18) /* weights below this many elements (512 KiB) use one thread */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* x (M, K) bf16 -> xf (M, K) fp32, each 16-wide chunk as [8 even | 8 odd], tail in order. */
static void convert_x(const uint16_t *x, int64_t M, int64_t K, float *xf) {
    int64_t K16 = K & ~(int64_t)15;
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xr = x + m * K;
        float *out = xf + m * K;
        for (int64_t k = 0; k < K16; k += 16) {
            for (int i = 0; i < 8; i++) {
                out[k + i] = bf16_to_f32(xr[k + 2 * i]);
                out[k + 8 + i] = bf16_to_f32(xr[k + 2 * i + 1]);
            }
        }
        for (int64_t k = K16; k < K; k++) out[k] = bf16_to_f32(xr[k]);
    }
}

/* R consecutive rows of W starting at n, against all M rows of x. S = 2 keeps separate
   accumulators for even and odd weights (more independent FMA chains when R * M is small).
   Always inlined with constant M, R, S so the accumulators live in registers. */
static inline __attribute__((always_inline)) void rows_kernel(
    const float *xf, int64_t K, const uint16_t *W, int64_t ldw, int64_t n, const uint16_t *bias,
    void *y, int y_f32, int64_t N, const int M, const int R, const int S) {
    const __m256i hi_mask = _mm256_set1_epi32((int)0xffff0000u);
    int64_t K16 = K & ~(int64_t)15;
    __m256 acc[4][MAX_ROWS][2];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++)
            for (int s = 0; s < S; s++) acc[r][m][s] = _mm256_setzero_ps();

    for (int64_t k = 0; k < K16; k += 16) {
        __m256 we[4], wo[4];
        for (int r = 0; r < R; r++) {
            /* the same columns of the next R rows: ~20-30% more bandwidth on one core (AVX2
               EPYC), the hardware prefetcher alone restarts at each new group of rows. A
               prefetch past the end of W is harmless (it never faults). */
            _mm_prefetch((const char *)(W + (n + R + r) * ldw + k), _MM_HINT_T0);
            __m256i w = _mm256_loadu_si256((const __m256i *)(W + (n + r) * ldw + k));
            we[r] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
            wo[r] = _mm256_castsi256_ps(_mm256_and_si256(w, hi_mask));
        }
        for (int m = 0; m < M; m++) {
            __m256 xe = _mm256_loadu_ps(xf + m * K + k);
            __m256 xo = _mm256_loadu_ps(xf + m * K + k + 8);
            for (int r = 0; r < R; r++) {
                acc[r][m][0] = _mm256_fmadd_ps(we[r], xe, acc[r][m][0]);
                acc[r][m][S - 1] = _mm256_fmadd_ps(wo[r], xo, acc[r][m][S - 1]);
            }
        }
    }

    for (int r = 0; r < R; r++) {
        const uint16_t *wr = W + (n + r) * ldw;
        float b = bias ? bf16_to_f32(bias[n + r]) : 0.0f;
        for (int m = 0; m < M; m++) {
            __m256 a = S == 2 ? _mm256_add_ps(acc[r][m][0], acc[r][m][1]) : acc[r][m][0];
            float sum = hsum(a);
            const float *xr = xf + m * K;
            for (int64_t k = K16; k < K; k++) sum += xr[k] * bf16_to_f32(wr[k]);
            store(y, y_f32, m * N + n + r, sum + b);
        }
    }
}

#define BLOCK_FN(M_, R_, S_)                                                                    \
    static void block_m##M_(const float *xf, int64_t K, const uint16_t *W, int64_t ldw,         \
                            int64_t n0, int64_t n1, const uint16_t *bias, void *y, int y_f32,    \
                            int64_t N) {                                                        \
        int64_t n = n0;                                                                         \
        for (; n + R_ <= n1; n += R_) rows_kernel(xf, K, W, ldw, n, bias, y, y_f32, N, M_, R_, S_); \
        for (; n < n1; n++) rows_kernel(xf, K, W, ldw, n, bias, y, y_f32, N, M_, 1, 2);         \
    }

/* R * M * S accumulators stay at or under 8 of the 16 ymm registers. */
BLOCK_FN(1, 4, 2)
BLOCK_FN(2, 4, 1)
BLOCK_FN(3, 2, 1)
BLOCK_FN(4, 2, 1)
BLOCK_FN(5, 1, 1)
BLOCK_FN(6, 1, 1)
BLOCK_FN(7, 1, 1)
BLOCK_FN(8, 1, 1)

typedef void (*block_fn)(const float *, int64_t, const uint16_t *, int64_t, int64_t, int64_t,
                         const uint16_t *, void *, int, int64_t);

static const block_fn BLOCKS[MAX_ROWS + 1] = {
    0, block_m1, block_m2, block_m3, block_m4, block_m5, block_m6, block_m7, block_m8,
};

/* Returns 0 on success, 1 for an unsupported M, 2 when the scratch allocation fails. */
static int gemv(const uint16_t *x, int64_t M, int64_t K, const uint16_t *W, int64_t N,
                int64_t ldw, const uint16_t *bias, void *y, int y_f32, int nthreads) {
    if (M < 1 || M > MAX_ROWS) return 1;
    if (N <= 0) return 0;
    float *xf = (float *)malloc((size_t)(M * K > 0 ? M * K : 1) * sizeof(float));
    if (!xf) return 2;
    convert_x(x, M, K, xf);
    block_fn fn = BLOCKS[M];
    int64_t nblocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
    if (nthreads <= 1 || nblocks < 2 || N * K < MIN_PARALLEL) {
        fn(xf, K, W, ldw, 0, N, bias, y, y_f32, N);
    } else {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            int64_t n0 = blk * ROW_BLOCK;
            int64_t n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
            fn(xf, K, W, ldw, n0, n1, bias, y, y_f32, N);
        }
    }
    free(xf);
    return 0;
}

/* y (M, N) bf16, rounded to nearest even. */
int bf16_gemv(const uint16_t *x, int64_t M, int64_t K, const uint16_t *W, int64_t N, int64_t ldw,
              const uint16_t *bias, uint16_t *y, int nthreads) {
    return gemv(x, M, K, W, N, ldw, bias, y, 0, nthreads);
}

/* y (M, N) fp32, the sums before rounding. */
int bf16_gemv_f32(const uint16_t *x, int64_t M, int64_t K, const uint16_t *W, int64_t N,
                  int64_t ldw, const uint16_t *bias, float *y, int nthreads) {
    return gemv(x, M, K, W, N, ldw, bias, y, 1, nthreads);
}
