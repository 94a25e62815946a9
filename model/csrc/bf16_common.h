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

#endif
