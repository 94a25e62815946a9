/* Fused bf16 elementwise passes for CPU inference (AVX2 + F16C x86).

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
