/* bfloat16 <-> float32 as torch does them, shared by the fused kernels (_kernels.c, _saved_kernels.c). */
#ifndef MERGEKIT_LITE_BFLOAT16_H
#define MERGEKIT_LITE_BFLOAT16_H

#include <stdint.h>

/* bfloat16 -> float32 is exact: the high half of the bits. */
static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

/* float32 -> bfloat16, round to nearest even: c10::BFloat16's rule, so the bytes match torch's .to(bfloat16).
 * (Non-finite values only feed the finite counts: the engine refuses them.) */
static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

#endif
