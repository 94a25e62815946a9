/* Scalar helpers shared by the C kernels (each is built as one translation unit). */

#ifndef ERNIE_BF16_COMMON_H
#define ERNIE_BF16_COMMON_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, NaN stays a quiet NaN: torch's float -> bfloat16 conversion. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Output element idx of y, either fp32 (the sum as it is) or bf16 (rounded). */
static inline void store(void *y, int y_f32, int64_t idx, float v) {
    if (y_f32)
        ((float *)y)[idx] = v;
    else
        ((uint16_t *)y)[idx] = f32_to_bf16(v);
}

/* e^x as the vector kernels compute it (exp8 in bf16_ops.c, exp16 in bf16_flash.c): x clamped to
   [EXP_MIN, EXP_MAX], n = round(x * log2(e)), r = x - n * ln 2 (ln 2 in two parts, so r is
   exact), e^r = 1 + r + r^2 * (EXP_P5 + r * (EXP_P4 + ... r * EXP_P0)), then 2^n * e^r;
   relative error ~2e-7. */
#define EXP_MIN (-87.3f)
#define EXP_MAX 88.7f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO (-2.12194440e-4f)
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

#endif
