/* Linear merge of saved full tensors (full fine-tunes) in one pass, straight from their stored rows
 * (mergekit_lite/engine/saved_kernels.py):
 *
 *     out[j] = W[j] + lam · Σᵢ (f32(savedᵢ[j]) − f32(W[j])) · cᵢ     (i = 0..n-1 in order, then rounded once)
 *
 * τᵢ is never stored: each model's rows (float32 or bfloat16, as read from its file) and W (as stored) are widened
 * exactly, subtracted in float32, scaled and summed in order, W added once and the result rounded to the output
 * type. These are the float32 operations of the two-step path it replaces (a mixed-dtype torch.sub per model into
 * a float32 buffer, then _kernels.c's mkl_consensus with kind SUM, below = -1, scale = cᵢ, λ = lam), in the same
 * order, so the bytes are the same (tests/test_saved_kernels.py): uᵢ = (|τᵢ| > -1 ? τᵢ : 0)·cᵢ as there, acc =
 * u₀ + u₁ + …, result = acc·lam, W + result, round to nearest even for bfloat16. -ffp-contract=off keeps every
 * product and sum rounded on its own (no FMA contraction); never -ffast-math.
 *
 * It also counts the non-finite entries of the saved rows (the check each read used to make in a pass of its own):
 * the caller names the model and rows only when that count is not 0.
 *
 * Called through ctypes (which releases the GIL). Built into the same library as _kernels.c (setup.py), whose
 * module init makes it a valid extension module.
 */
#include <math.h>
#include <stdint.h>

#include "_rows.h"
#include <string.h>

#define MAX_SAVED 64
#define BLOCK 128

static inline void widen(const void *rows, int type, int64_t at, float *dst, int m) {
    if (type == ROW_F32) {
        memcpy(dst, (const float *)rows + at, (size_t)m * sizeof(float));
    } else {
        const uint16_t *h = (const uint16_t *)rows + at;
        for (int j = 0; j < m; j++) dst[j] = bf16_to_f32(h[j]);
    }
}

/* Entries [at, at + m), one at a time in plain C (the portable path, and the tail of the AVX2 one). */
static void saved_sum_portable(int n_saved, const void *const *saved, const int *types, const float *scale, float lam,
                               const void *base, int base_type, void *out, int out_type, int64_t at, int64_t count,
                               int64_t *not_finite, int64_t *bad_inputs) {
    float w[BLOCK], x[BLOCK], acc[BLOCK];
    int64_t bad_out = 0, bad_in = 0;
    for (int64_t j0 = at; j0 < at + count; j0 += BLOCK) {
        const int m = at + count - j0 < BLOCK ? (int)(at + count - j0) : BLOCK;
        widen(base, base_type, j0, w, m);
        for (int i = 0; i < n_saved; i++) {
            widen(saved[i], types[i], j0, x, m);
            const float s = scale[i];
            for (int j = 0; j < m; j++) {
                union { float f; uint32_t u; } bits = {x[j]};
                bad_in += (bits.u & 0x7F800000u) == 0x7F800000u;
                const float tau = x[j] - w[j];
                const float u = (fabsf(tau) > -1.0f ? tau : 0.0f) * s;
                acc[j] = i == 0 ? u : acc[j] + u;
            }
        }
        for (int j = 0; j < m; j++) acc[j] = w[j] + acc[j] * lam;
        if (out_type == ROW_F32) {
            float *o = (float *)out + j0;
            for (int j = 0; j < m; j++) {
                o[j] = acc[j];
                bad_out += (acc[j] - acc[j]) != 0.0f; /* inf - inf and NaN - NaN are NaN */
            }
        } else {
            uint16_t *o = (uint16_t *)out + j0;
            for (int j = 0; j < m; j++) {
                const uint16_t h = f32_to_bf16(acc[j]);
                o[j] = h;
                bad_out += (h & 0x7F80u) == 0x7F80u;
            }
        }
    }
    *not_finite += bad_out;
    *bad_inputs += bad_in;
}

#if defined(__x86_64__) && defined(__GNUC__)
/* The same operations 16 entries at a time (two 8-lane halves for two independent dependency chains). The
 * base and output types are template-like constants so the compiler drops the branches from the inner loop. */
static inline __attribute__((always_inline, target("avx2"))) void saved_sum_avx2_typed(
    int n_saved, const void *const *saved, const int *types, const float *scale, float lam, const void *base,
    const int base_type, void *out, const int out_type, int64_t n, int64_t *not_finite, int64_t *bad_inputs) {
    const __m256 sign = _mm256_set1_ps(-0.0f), minus_one = _mm256_set1_ps(-1.0f), lam8 = _mm256_set1_ps(lam);
    const __m256i exponent = _mm256_set1_epi32(0x7F800000);
    __m256i bad_in = _mm256_setzero_si256(), bad_out = _mm256_setzero_si256();
    const int64_t wide = n - n % 16;
    for (int64_t j = 0; j < wide; j += 16) {
        const __m256 w0 = load_row8(base, base_type, j), w1 = load_row8(base, base_type, j + 8);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int i = 0; i < n_saved; i++) {
            const __m256 x0 = load_row8(saved[i], types[i], j), x1 = load_row8(saved[i], types[i], j + 8);
            bad_in = _mm256_sub_epi32(bad_in, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x0), exponent),
                                                                 exponent));
            bad_in = _mm256_sub_epi32(bad_in, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x1), exponent),
                                                                 exponent));
            const __m256 s = _mm256_set1_ps(scale[i]);
            __m256 t0 = _mm256_sub_ps(x0, w0), t1 = _mm256_sub_ps(x1, w1);
            /* (|τ| > -1 ? τ : 0): false only for NaN, as in mkl_consensus */
            t0 = _mm256_and_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, t0), minus_one, _CMP_GT_OQ), t0);
            t1 = _mm256_and_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, t1), minus_one, _CMP_GT_OQ), t1);
            const __m256 u0 = _mm256_mul_ps(t0, s), u1 = _mm256_mul_ps(t1, s);
            if (i == 0) {
                acc0 = u0;
                acc1 = u1;
            } else {
                acc0 = _mm256_add_ps(acc0, u0);
                acc1 = _mm256_add_ps(acc1, u1);
            }
        }
        const __m256 y0 = _mm256_add_ps(w0, _mm256_mul_ps(acc0, lam8));
        const __m256 y1 = _mm256_add_ps(w1, _mm256_mul_ps(acc1, lam8));
        if (out_type == ROW_F32) {
            _mm256_storeu_ps((float *)out + j, y0);
            _mm256_storeu_ps((float *)out + j + 8, y1);
            bad_out = _mm256_sub_epi32(bad_out, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(y0), exponent),
                                                                   exponent));
            bad_out = _mm256_sub_epi32(bad_out, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(y1), exponent),
                                                                   exponent));
        } else {
            const __m256i h0 = to_bf16_bits(y0), h1 = to_bf16_bits(y1);
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + j),
                                _mm256_permute4x64_epi64(_mm256_packus_epi32(h0, h1), 0xD8));
            const __m256i e = _mm256_set1_epi32(0x7F80);
            bad_out = _mm256_sub_epi32(bad_out, _mm256_cmpeq_epi32(_mm256_and_si256(h0, e), e));
            bad_out = _mm256_sub_epi32(bad_out, _mm256_cmpeq_epi32(_mm256_and_si256(h1, e), e));
        }
    }
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, bad_in);
    for (int k = 0; k < 8; k++) *bad_inputs += lanes[k];
    _mm256_storeu_si256((__m256i *)lanes, bad_out);
    for (int k = 0; k < 8; k++) *not_finite += lanes[k];
    if (wide < n)
        saved_sum_portable(n_saved, saved, types, scale, lam, base, base_type, out, out_type, wide, n - wide,
                           not_finite, bad_inputs);
}

__attribute__((target("avx2"))) static void saved_sum_avx2(int n_saved, const void *const *saved, const int *types,
                                                           const float *scale, float lam, const void *base,
                                                           int base_type, void *out, int out_type, int64_t n,
                                                           int64_t *not_finite, int64_t *bad_inputs) {
    /* one instance per (W type, output type): the loop keeps no type test inside */
    if (base_type == ROW_BF16 && out_type == ROW_BF16)
        saved_sum_avx2_typed(n_saved, saved, types, scale, lam, base, ROW_BF16, out, ROW_BF16, n, not_finite, bad_inputs);
    else if (base_type == ROW_BF16)
        saved_sum_avx2_typed(n_saved, saved, types, scale, lam, base, ROW_BF16, out, ROW_F32, n, not_finite, bad_inputs);
    else if (out_type == ROW_BF16)
        saved_sum_avx2_typed(n_saved, saved, types, scale, lam, base, ROW_F32, out, ROW_BF16, n, not_finite, bad_inputs);
    else
        saved_sum_avx2_typed(n_saved, saved, types, scale, lam, base, ROW_F32, out, ROW_F32, n, not_finite, bad_inputs);
}
#endif

/* out = W + lam · Σᵢ (savedᵢ − W)·scaleᵢ over n entries (see the top of the file). `saved` holds n_saved row
 * pointers of types[i] (ROW_F32 or ROW_BF16); W is `base` (base_type), `out` (out_type) may be `base` itself
 * (each entry of W is read before its output is written). Returns how many outputs are not finite and sets
 * *bad_inputs to how many saved entries are not finite, or returns -1 when an argument is out of range.
 * `portable` takes the plain C loop whatever the CPU (for tests comparing it with the AVX2 one). */
int64_t mks_saved_sum(int n_saved, const void *const *saved, const int *types, const float *scale, float lam,
                      const void *base, int base_type, void *out, int out_type, int64_t n, int64_t *bad_inputs,
                      int portable) {
    if (n_saved < 1 || n_saved > MAX_SAVED || base_type < ROW_F32 || base_type > ROW_BF16 || out_type < ROW_F32 ||
        out_type > ROW_BF16 || n < 0)
        return -1;
    for (int i = 0; i < n_saved; i++)
        if (types[i] < ROW_F32 || types[i] > ROW_BF16) return -1;
    int64_t not_finite = 0;
    *bad_inputs = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if (!portable && __builtin_cpu_supports("avx2")) {
        saved_sum_avx2(n_saved, saved, types, scale, lam, base, base_type, out, out_type, n, &not_finite, bad_inputs);
        return not_finite;
    }
#endif
    saved_sum_portable(n_saved, saved, types, scale, lam, base, base_type, out, out_type, 0, n, &not_finite,
                       bad_inputs);
    return not_finite;
}

/* τ = f32(saved) − f32(W) over n entries into `tau` (float32), for the methods that keep τᵢ for passes of their own
 * (TIES over full fine-tunes): the subtraction torch.sub(saved, W) makes, and the non-finite saved entries counted
 * in the same pass (returned; -1 when a type is out of range). */
static void saved_tau_portable(const void *saved, int saved_type, const void *base, int base_type, float *tau,
                               int64_t at, int64_t count, int64_t *bad_inputs) {
    float w[BLOCK], x[BLOCK];
    int64_t bad = 0;
    for (int64_t j0 = at; j0 < at + count; j0 += BLOCK) {
        const int m = at + count - j0 < BLOCK ? (int)(at + count - j0) : BLOCK;
        widen(base, base_type, j0, w, m);
        widen(saved, saved_type, j0, x, m);
        for (int j = 0; j < m; j++) {
            union { float f; uint32_t u; } bits = {x[j]};
            bad += (bits.u & 0x7F800000u) == 0x7F800000u;
            tau[j0 + j] = x[j] - w[j];
        }
    }
    *bad_inputs += bad;
}

#if defined(__x86_64__) && defined(__GNUC__)
static inline __attribute__((always_inline, target("avx2"))) void saved_tau_avx2_typed(
    const void *saved, const int saved_type, const void *base, const int base_type, float *tau, int64_t n,
    int64_t *bad_inputs) {
    const __m256i exponent = _mm256_set1_epi32(0x7F800000);
    __m256i bad = _mm256_setzero_si256();
    const int64_t wide = n - n % 16;
    for (int64_t j = 0; j < wide; j += 16) {
        const __m256 x0 = load_row8(saved, saved_type, j), x1 = load_row8(saved, saved_type, j + 8);
        bad = _mm256_sub_epi32(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x0), exponent), exponent));
        bad = _mm256_sub_epi32(bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x1), exponent), exponent));
        _mm256_storeu_ps(tau + j, _mm256_sub_ps(x0, load_row8(base, base_type, j)));
        _mm256_storeu_ps(tau + j + 8, _mm256_sub_ps(x1, load_row8(base, base_type, j + 8)));
    }
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, bad);
    for (int k = 0; k < 8; k++) *bad_inputs += lanes[k];
    if (wide < n) saved_tau_portable(saved, saved_type, base, base_type, tau, wide, n - wide, bad_inputs);
}

__attribute__((target("avx2"))) static void saved_tau_avx2(const void *saved, int saved_type, const void *base,
                                                           int base_type, float *tau, int64_t n, int64_t *bad_inputs) {
    if (saved_type == ROW_BF16 && base_type == ROW_F32)
        saved_tau_avx2_typed(saved, ROW_BF16, base, ROW_F32, tau, n, bad_inputs);
    else if (saved_type == ROW_BF16)
        saved_tau_avx2_typed(saved, ROW_BF16, base, ROW_BF16, tau, n, bad_inputs);
    else if (base_type == ROW_F32)
        saved_tau_avx2_typed(saved, ROW_F32, base, ROW_F32, tau, n, bad_inputs);
    else
        saved_tau_avx2_typed(saved, ROW_F32, base, ROW_BF16, tau, n, bad_inputs);
}
#endif

int64_t mks_saved_tau(const void *saved, int saved_type, const void *base, int base_type, float *tau, int64_t n,
                      int portable) {
    if (saved_type < ROW_F32 || saved_type > ROW_BF16 || base_type < ROW_F32 || base_type > ROW_BF16 || n < 0)
        return -1;
    int64_t bad = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if (!portable && __builtin_cpu_supports("avx2")) {
        saved_tau_avx2(saved, saved_type, base, base_type, tau, n, &bad);
        return bad;
    }
#endif
    saved_tau_portable(saved, saved_type, base, base_type, tau, 0, n, &bad);
    return bad;
}
