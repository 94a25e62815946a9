/* bf16 products of tens of rows on AMX tiles: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]).

   Meant for the expert segments of a prefill (tens to a few hundred rows of x against one
   expert's weight), where oneDNN's general GEMM reaches a fraction of the tile unit's speed.

   Roles: a tile product C[16][16] += A[16][32] . B[32][16] wants A row-major and B in pairs of
   k ("VNNI"). W (N, K) row-major is already A's layout (16 rows of W, 32 consecutive k each,
   `ldw` elements apart: loaded in place, no repacking of the weight), so the product is taken
   transposed, C = W_block . x^T, with x packed once per call into pairs of k for up to 6 groups
   of 16 rows (96 rows per pass; tiles 0-5 accumulate, tile 6 holds W, tile 7 x). Rows of x past
   M and k past K are zeros in the packed copy; a block of W that runs past N or K is copied
   into a zero-padded buffer first (a garbage NaN times a padded zero would poison the sum).

   Sums are fp32 (the tile unit treats denormal inputs as zero), bias added in fp32, rounded to
   bf16 once: F.linear's numbers up to summation order. Blocks of 16 rows of W are split over
   OpenMP threads; each thread configures its own tiles. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bf16_common.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define GROUPS 6            /* groups of 16 rows of x per pass */
#define PASS_ROWS (16 * GROUPS) /* rows of x per pass over a block of W */

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Ask the kernel for the tile state (once per process; harmless when granted already). */
int bf16_amx_init(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : 1; }

static void configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* x rows [m0, m0 + rows) -> xp[g][p][j][2] = x[m0 + 16 g + j][2 p + t], zero-padded; Kp pairs.
   A pair of bf16 is one 32-bit word, so this is a transpose of words (K odd: the last word of a
   row holds its last element and a zero). */
static void pack_x(const uint16_t *x, int64_t K, int64_t m0, int64_t rows, int64_t Kp, uint16_t *xp) {
    int groups = (int)((rows + 15) / 16);
    memset(xp, 0, (size_t)groups * Kp * 32 * sizeof(uint16_t));
    int64_t pairs = K / 2;
    uint32_t *xw = (uint32_t *)xp;
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *xr = x + (m0 + i) * K;
        uint32_t *dst = xw + (i / 16) * Kp * 16 + (i % 16);
        for (int64_t q = 0; q < pairs; q++) {
            uint32_t w;
            memcpy(&w, xr + 2 * q, sizeof w);
            dst[q * 16] = w;
        }
        if (K & 1) dst[pairs * 16] = xr[K - 1];
    }
}

#define TILE_STEP(G)                                                                 \
    if (groups > G) {                                                                \
        _tile_loadd(7, xp + (int64_t)(G) * Kp * 32 + (k / 2) * 32, 64);              \
        _tile_dpbf16ps(G, 6, 7);                                                     \
    }
#define TILE_ZERO(G) if (groups > G) _tile_zero(G);
#define TILE_STORE(G) if (groups > G) _tile_stored(G, cbuf + (G) * 256, 64);

/* 16 rows of W from n0 (fewer at the end) against the packed groups; writes y rows m0... */
static void block(const uint16_t *W, int64_t N, int64_t K, int64_t ldw, int64_t n0, const uint16_t *xp,
                  int64_t Kp, int groups, int64_t m0, int64_t rows, const uint16_t *bias, void *y, int y_f32) {
    float cbuf[GROUPS * 256] __attribute__((aligned(64)));
    uint16_t pad[16 * 32] __attribute__((aligned(64)));
    int64_t nr = N - n0 < 16 ? N - n0 : 16;
    TILE_ZERO(0) TILE_ZERO(1) TILE_ZERO(2) TILE_ZERO(3) TILE_ZERO(4) TILE_ZERO(5)
    for (int64_t k = 0; k < K; k += 32) {
        if (nr == 16 && k + 32 <= K) {
            _tile_loadd(6, W + n0 * ldw + k, ldw * 2);
        } else {
            int64_t kc = K - k < 32 ? K - k : 32;
            memset(pad, 0, sizeof pad);
            for (int64_t r = 0; r < nr; r++) memcpy(pad + r * 32, W + (n0 + r) * ldw + k, (size_t)kc * 2);
            _tile_loadd(6, pad, 64);
        }
        TILE_STEP(0) TILE_STEP(1) TILE_STEP(2) TILE_STEP(3) TILE_STEP(4) TILE_STEP(5)
    }
    TILE_STORE(0) TILE_STORE(1) TILE_STORE(2) TILE_STORE(3) TILE_STORE(4) TILE_STORE(5)
    /* cbuf[g][n][j]: row n of W, row 16 g + j of x; y row m gathers its 16 outputs (stride 16) */
    const __m512i stride = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    __m512 bv = _mm512_setzero_ps();
    if (bias && nr == 16)
        bv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(bias + n0))), 16));
    for (int64_t i = 0; i < rows; i++) {
        const float *c = cbuf + (i / 16) * 256 + (i % 16);
        if (nr == 16 && !y_f32) {
            __m512 v = _mm512_add_ps(_mm512_i32gather_ps(stride, c, 4), bv);
            __m256i packed = (__m256i)_mm512_cvtneps_pbh(v);
            _mm256_storeu_si256((__m256i *)((uint16_t *)y + (m0 + i) * N + n0), packed);
            continue;
        }
        for (int64_t r = 0; r < nr; r++) {
            float b = bias ? bf16_to_f32(bias[n0 + r]) : 0.0f;
            store(y, y_f32, (m0 + i) * N + n0 + r, c[r * 16] + b);
        }
    }
}

/* Returns 0 on success, 2 when the scratch allocation fails. x (M, K) contiguous, y (M, N).
   All of x is packed first. Up to two passes, each block of 16 rows of W meets both while it is
   in cache; beyond, a pass of x (6 groups, ~0.5 MB at K = 2560) stays in cache while W streams by
   once per pass. */
static int amx_linear(const uint16_t *x, int64_t M, int64_t K, const uint16_t *W, int64_t N, int64_t ldw,
                      const uint16_t *bias, void *y, int y_f32, int nthreads) {
    if (M <= 0 || N <= 0) return 0;
    int64_t Kp = ((K + 31) / 32) * 16; /* pairs of k, padded to whole steps of 32 */
    int64_t groups = (M + 15) / 16;
    uint16_t *xp = (uint16_t *)aligned_alloc(64, (size_t)groups * Kp * 32 * sizeof(uint16_t));
    if (!xp) return 2;
    pack_x(x, K, 0, M, Kp, xp);
    int64_t nblocks = (N + 15) / 16;
    int team = nthreads > 1 && nblocks > 1 ? nthreads : 1;
    if (M <= 2 * PASS_ROWS) {
        /* few passes: each block of W meets them all while in cache, W streamed once */
#pragma omp parallel num_threads(team)
        {
            configure();
#pragma omp for schedule(static)
            for (int64_t b = 0; b < nblocks; b++)
                for (int64_t m0 = 0; m0 < M; m0 += PASS_ROWS) {
                    int64_t rows = M - m0 < PASS_ROWS ? M - m0 : PASS_ROWS;
                    block(W, N, K, ldw, b * 16, xp + (m0 / 16) * Kp * 32, Kp, (int)((rows + 15) / 16), m0,
                          rows, bias, y, y_f32);
                }
            _tile_release();
        }
    } else {
        /* many: one pass of x at a time stays in cache while all of W streams by */
#pragma omp parallel num_threads(team)
        {
            configure();
            for (int64_t m0 = 0; m0 < M; m0 += PASS_ROWS) {
                int64_t rows = M - m0 < PASS_ROWS ? M - m0 : PASS_ROWS;
#pragma omp for schedule(static)
                for (int64_t b = 0; b < nblocks; b++)
                    block(W, N, K, ldw, b * 16, xp + (m0 / 16) * Kp * 32, Kp, (int)((rows + 15) / 16), m0,
                          rows, bias, y, y_f32);
            }
            _tile_release();
        }
    }
    free(xp);
    return 0;
}

int bf16_amx_linear(const uint16_t *x, int64_t M, int64_t K, const uint16_t *W, int64_t N, int64_t ldw,
                    const uint16_t *bias, uint16_t *y, int nthreads) {
    return amx_linear(x, M, K, W, N, ldw, bias, y, 0, nthreads);
}
