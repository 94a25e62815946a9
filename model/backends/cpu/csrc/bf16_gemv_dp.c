/* bf16 matrix times a few rows, for CPUs with AVX512-BF16 (vdpbf16ps).

   y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]),  m < M <= 16,  accumulated in fp32.

   The AVX2 kernel of bf16_gemv.c widens every weight to fp32 and is compute-bound beyond two
   rows of x. Here one vdpbf16ps multiplies 32 bf16 pairs of a row of W with the same 32 of a
   row of x and adds each pair's sum to one of 16 fp32 lanes, so each 64-byte load of W feeds M
   instructions. Measured on a 2-core AMX Xeon: 20-22 GB/s (memory speed) for 1-4 rows, then
   compute-bound (the instruction retires about once per 2 cycles there): 13 GB/s at 8 rows, 6 at
   16, where torch's AMX GEMM reads 15. x stays bf16 (it is read from L1);
   the K % 32 tail is a masked load (zeros past the end). The instruction treats denormal inputs
   as zero; otherwise the sums are fp32 sums of exact products, rounded to bf16 once.

   One row of x has a kernel of its own (block_m1, below), measured faster on an EPYC.

   Rows of W are `ldw` elements apart (W may be a view such as stacked[e]). Work is split over
   blocks of rows of W with OpenMP; with nthreads == 1 no parallel region is entered. */

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16_common.h"

#define MAX_ROWS 16
#define ROW_BLOCK 16           /* rows of W per OpenMP work item (a multiple of every R below) */
#define MIN_PARALLEL (1 << 18) /* weights below this many elements (512 KiB) use one thread */

/* R consecutive rows of W from n against all M rows of x; R * M accumulators (at most 16 of the
   32 zmm registers). Always inlined with constant M and R. */
static inline __attribute__((always_inline)) void rows_kernel(
    const uint16_t *x, int64_t K, const uint16_t *W, int64_t ldw, int64_t n, const uint16_t *bias,
    void *y, int y_f32, int64_t N, const int M, const int R) {
    __m512 acc[4][MAX_ROWS];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    int64_t K32 = K & ~(int64_t)31;
    for (int64_t k = 0; k < K32; k += 32) {
        __m512i w[4];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(W + (n + R + r) * ldw + k), _MM_HINT_T0);
            w[r] = _mm512_loadu_si512((const void *)(W + (n + r) * ldw + k));
        }
        for (int m = 0; m < M; m++) {
            __m512i xv = _mm512_loadu_si512((const void *)(x + m * K + k));
            for (int r = 0; r < R; r++)
                acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)xv, (__m512bh)w[r]);
        }
    }
    if (K32 < K) {
        __mmask32 mask = (__mmask32)((1ull << (K - K32)) - 1);
        __m512i w[4];
        for (int r = 0; r < R; r++) w[r] = _mm512_maskz_loadu_epi16(mask, W + (n + r) * ldw + K32);
        for (int m = 0; m < M; m++) {
            __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * K + K32);
            for (int r = 0; r < R; r++)
                acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)xv, (__m512bh)w[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        float b = bias ? bf16_to_f32(bias[n + r]) : 0.0f;
        for (int m = 0; m < M; m++) store(y, y_f32, m * N + n + r, _mm512_reduce_add_ps(acc[r][m]) + b);
    }
}

#define BLOCK_FN(M_, R_)                                                                        \
    static void block_m##M_(const uint16_t *x, int64_t K, const uint16_t *W, int64_t ldw,       \
                            int64_t n0, int64_t n1, const uint16_t *bias, void *y, int y_f32,    \
                            int64_t N) {                                                        \
        int64_t n = n0;                                                                         \
        for (; n + R_ <= n1; n += R_) rows_kernel(x, K, W, ldw, n, bias, y, y_f32, N, M_, R_);   \
        for (; n < n1; n++) rows_kernel(x, K, W, ldw, n, bias, y, y_f32, N, M_, 1);             \
    }

/* One row of x: each row of W is read start to end before the next one, a single sequential
   stream per thread, with four accumulators along k (the sum's rounding differs from one
   accumulator only in fp32's last bits). The R-row kernel above reads 4 rows side by side and
   prefetches the next 4; on a 2-core AVX512-BF16 EPYC that streamed 20-27 GB/s where this
   streams 26-33 (a plain read of memory there: 31). */
static void block_m1(const uint16_t *x, int64_t K, const uint16_t *W, int64_t ldw, int64_t n0,
                     int64_t n1, const uint16_t *bias, void *y, int y_f32, int64_t N) {
    (void)N;
    int64_t K128 = K & ~(int64_t)127;
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *w = W + n * ldw;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k < K128; k += 128) {
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(w + k));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + k + 32),
                                  (__m512bh)_mm512_loadu_si512(w + k + 32));
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(x + k + 64),
                                  (__m512bh)_mm512_loadu_si512(w + k + 64));
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(x + k + 96),
                                  (__m512bh)_mm512_loadu_si512(w + k + 96));
        }
        for (; k < K; k += 32) { /* the K % 128 tail, 32 at a time, the last one masked */
            __mmask32 mask = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + k),
                                  (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k));
        }
        float b = bias ? bf16_to_f32(bias[n]) : 0.0f;
        __m512 sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
        store(y, y_f32, n, _mm512_reduce_add_ps(sum) + b);
    }
}

BLOCK_FN(2, 4)
BLOCK_FN(3, 4)
BLOCK_FN(4, 2)
BLOCK_FN(5, 2)
BLOCK_FN(6, 2)
BLOCK_FN(7, 2)
BLOCK_FN(8, 2)
BLOCK_FN(9, 1)
BLOCK_FN(10, 1)
BLOCK_FN(11, 1)
BLOCK_FN(12, 1)
BLOCK_FN(13, 1)
BLOCK_FN(14, 1)
BLOCK_FN(15, 1)
BLOCK_FN(16, 1)

typedef void (*block_fn)(const uint16_t *, int64_t, const uint16_t *, int64_t, int64_t, int64_t,
                         const uint16_t *, void *, int, int64_t);

static const block_fn BLOCKS[MAX_ROWS + 1] = {
    0,          block_m1,  block_m2,  block_m3,  block_m4,  block_m5,  block_m6,  block_m7,  block_m8,
    block_m9,   block_m10, block_m11, block_m12, block_m13, block_m14, block_m15, block_m16,
};

/* Returns 0 on success, 1 for an unsupported M. x (M, K) contiguous. */
static int gemv(const uint16_t *x, int64_t M, int64_t K, const uint16_t *W, int64_t N, int64_t ldw,
                const uint16_t *bias, void *y, int y_f32, int nthreads) {
    if (M < 1 || M > MAX_ROWS) return 1;
    if (N <= 0) return 0;
    block_fn fn = BLOCKS[M];
    int64_t nblocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
    if (nthreads <= 1 || nblocks < 2 || N * K < MIN_PARALLEL) {
        fn(x, K, W, ldw, 0, N, bias, y, y_f32, N);
        return 0;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        int64_t n0 = blk * ROW_BLOCK;
        int64_t n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        fn(x, K, W, ldw, n0, n1, bias, y, y_f32, N);
    }
    return 0;
}

/* Same signatures as bf16_gemv / bf16_gemv_f32 of bf16_gemv.c. */
int bf16_gemv(const uint16_t *x, int64_t M, int64_t K, const uint16_t *W, int64_t N, int64_t ldw,
              const uint16_t *bias, uint16_t *y, int nthreads) {
    return gemv(x, M, K, W, N, ldw, bias, y, 0, nthreads);
}

int bf16_gemv_f32(const uint16_t *x, int64_t M, int64_t K, const uint16_t *W, int64_t N,
                  int64_t ldw, const uint16_t *bias, float *y, int nthreads) {
    return gemv(x, M, K, W, N, ldw, bias, y, 1, nthreads);
}
