/* The row types the fused kernels read and write, and their conversions as torch does them: shared by the two
 * sources of the kernel library (_kernels.c, _saved_kernels.c). */
#ifndef MERGEKIT_LITE_ROWS_H
#define MERGEKIT_LITE_ROWS_H

#include <stdint.h>

/* Element types of the rows read and written (kernels.ROW_TYPES on the Python side). */
enum { ROW_F32 = 0, ROW_BF16 = 1 };

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

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* 8 entries of a row at `at`, widened to float32 (exactly, as bf16_to_f32). */
static inline __attribute__((always_inline, target("avx2"))) __m256 load_row8(const void *rows, int type, int64_t at) {
    if (type == ROW_F32) return _mm256_loadu_ps((const float *)rows + at);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)rows + at));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* f32_to_bf16 of 8 lanes, each result in the low half of its 32-bit lane (wrapping like the uint32 scalar). */
static inline __attribute__((always_inline, target("avx2"))) __m256i to_bf16_bits(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
}
#endif

#endif
