/* Fused CPU kernels of the merge engine: one pass where torch would make ~30 (mergekit_lite/engine/kernels.py).
 *
 * Every float operation is the one the torch path does, in the same order and in float32, so both paths
 * give the same bytes (tests/test_kernels.py). Build flags keep it that way: -ffp-contract=off (no FMA
 * contraction), never -ffast-math. Loops work on small blocks so the compiler vectorizes them; on x86-64
 * an AVX2 clone is picked at load time when the CPU has it.
 *
 * Called through ctypes (which releases the GIL, so chunks run side by side in the engine's threads). The
 * module init below only makes this a valid extension module; Python never calls into it.
 */
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 128
#define MAX_TAUS 64

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MKL_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MKL_CLONES
#endif

/* Selection band pass over one chunk: how many |x| exceed `high`, and every |x| in [low, high] copied to
 * `out` (flat order). Returns the number gathered, or -1 when `out` (cap entries) would overflow. */
static int64_t band_portable(const float *restrict x, int64_t n, float high, float low, float *restrict out,
                             int64_t cap, int64_t *restrict above) {
    int64_t count_above = 0, gathered = 0;
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
        int m = n - j0 < BLOCK ? (int)(n - j0) : BLOCK;
        const float *xb = x + j0;
        int over = 0, inside = 0;
        for (int j = 0; j < m; j++) {
            float v = fabsf(xb[j]);
            over += v > high;
            inside += (v >= low) & (v <= high);
        }
        count_above += over;
        if (!inside) continue;
        if (gathered + inside >= cap) { /* the branch-free copy below writes one slot past the last kept */
            *above = count_above;
            return -1;
        }
        for (int j = 0; j < m; j++) {
            float v = fabsf(xb[j]);
            out[gathered] = v;
            gathered += (v >= low) & (v <= high);
        }
    }
    *above = count_above;
    return gathered;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* For each 8-lane mask, the lanes it selects, moved to the front (filled once, when the library loads). */
static int32_t pack[256][8];

__attribute__((constructor)) static void fill_pack(void) {
    for (int mask = 0; mask < 256; mask++) {
        int at = 0;
        for (int lane = 0; lane < 8; lane++) if (mask >> lane & 1) pack[mask][at++] = lane;
        for (; at < 8; at++) pack[mask][at] = 0;
    }
}

/* The same with AVX2 "left-packing": each 8-lane mask picks a permutation that moves the in-band lanes to the
 * front, and a full 8-lane store lands at the write position (the next store overwrites the tail). */
__attribute__((target("avx2,popcnt"))) static int64_t band_avx2(const float *restrict x, int64_t n, float high,
                                                                  float low, float *restrict out, int64_t cap,
                                                                  int64_t *restrict above) {
    const __m256 sign = _mm256_set1_ps(-0.0f), hi = _mm256_set1_ps(high), lo = _mm256_set1_ps(low);
    int64_t count_above = 0, gathered = 0, j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j));
        int over = _mm256_movemask_ps(_mm256_cmp_ps(v, hi, _CMP_GT_OQ));
        int inside = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, lo, _CMP_GE_OQ), _mm256_cmp_ps(v, hi, _CMP_LE_OQ)));
        count_above += __builtin_popcount(over);
        if (inside) {
            int kept = __builtin_popcount(inside);
            if (gathered + 8 >= cap) { /* the 8-lane store needs room: finish this chunk the portable way */
                int64_t rest_above = 0, rest = band_portable(x + j, n - j, high, low, out + gathered,
                                                            cap - gathered, &rest_above);
                *above = count_above - __builtin_popcount(over) + rest_above;
                return rest < 0 ? -1 : gathered + rest;
            }
            __m256i order = _mm256_loadu_si256((const __m256i *)pack[inside]);
            _mm256_storeu_ps(out + gathered, _mm256_permutevar8x32_ps(v, order));
            gathered += kept;
        }
    }
    int64_t tail_above = 0, tail = band_portable(x + j, n - j, high, low, out + gathered, cap - gathered, &tail_above);
    *above = count_above + tail_above;
    return tail < 0 ? -1 : gathered + tail;
}
#endif

int64_t mkl_band(const float *restrict x, int64_t n, float high, float low, float *restrict out, int64_t cap,
                 int64_t *restrict above) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) return band_avx2(x, n, high, low, out, cap, above);
#endif
    return band_portable(x, n, high, low, out, cap, above);
}

/* out = left · right for a row-form low-rank product (rows × r times r × cols), with a fixed order: for each
 * output, the r products in order k = 0..r-1, each rounded, summed left to right. A BLAS GEMM picks its own
 * order by thread count, CPU and even pointer alignment, so the same τ could round differently from run to
 * run; this order does not move, and the torch fallback (engine/deltas.py) repeats it. */
MKL_CLONES void mkl_lowrank(const float *restrict left, int64_t rows, int64_t rank, const float *restrict right,
                            int64_t cols, float *restrict out) {
    for (int64_t i = 0; i < rows; i++) {
        const float *l = left + i * rank;
        float *o = out + i * cols;
        const float first = l[0];
        for (int64_t j = 0; j < cols; j++) o[j] = first * right[j];
        for (int64_t k = 1; k < rank; k++) {
            const float lk = l[k];
            const float *rk = right + k * cols;
            for (int64_t j = 0; j < cols; j++) o[j] = o[j] + lk * rk[j];
        }
    }
}

/* Element types of the base rows and the output (safetensors dtypes the kernel reads and writes itself). */
enum { MKL_F32 = 0, MKL_BF16 = 1 };

/* bfloat16 -> float32 is exact: the high half of the bits. */
static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

/* float32 -> bfloat16, round to nearest even: c10::BFloat16's rule, so the bytes match torch's .to(bfloat16).
 * (Non-finite values only feed the finite count: the engine refuses them.) */
static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

/* out[at + j] = W[at + j] + delta[j] for j < m, rounded to the output type; returns how many are not finite. */
static inline int add_and_store(const void *base, int base_type, void *out, int out_type, int64_t at, float *delta,
                                int m) {
    if (base_type == MKL_F32) {
        const float *w = (const float *)base + at;
        for (int j = 0; j < m; j++) delta[j] = w[j] + delta[j];
    } else {
        const uint16_t *w = (const uint16_t *)base + at;
        for (int j = 0; j < m; j++) delta[j] = bf16_to_f32(w[j]) + delta[j];
    }
    int bad = 0;
    if (out_type == MKL_F32) {
        float *o = (float *)out + at;
        for (int j = 0; j < m; j++) {
            o[j] = delta[j];
            bad += (delta[j] - delta[j]) != 0.0f; /* inf - inf and NaN - NaN are NaN */
        }
    } else {
        uint16_t *o = (uint16_t *)out + at;
        for (int j = 0; j < m; j++) {
            uint16_t h = f32_to_bf16(delta[j]);
            o[j] = h;
            bad += (h & 0x7F80u) == 0x7F80u;
        }
    }
    return bad;
}

/* out[j] = W[j] + consensus over i of uᵢ[j], uᵢ = (|τᵢ[j]| > belowᵢ ? τᵢ[j] : 0) · scaleᵢ  (SEMANTICS §3).
 *   kind 0 (sum):  λ · Σ uᵢ
 *   kind 1 (ties): γ = sign(Σ ballotᵢ) (+1 on 0), ballot = uᵢ or sign(uᵢ) (sign_count);
 *                  λ · γ · Σ relu(uᵢγ) / max(Σ [uᵢγ > 0]·|wᵢ|, FLT_MIN)  (the division only when normalize)
 * A negative belowᵢ keeps every entry. Mirrors methods/_common.py op for op (relu keeps -0.0 as torch does),
 * then the cast to the output type. W is `base` (f32 or bf16); `out` (f32 or bf16) may be `base` itself.
 * Returns how many outputs are not finite, or -1 when an argument is out of range. */
MKL_CLONES int64_t mkl_consensus(int kind, int n_tau, const float *const *taus, const float *below,
                                 const float *scale, const float *absw, int sign_count, int normalize, float lam,
                                 const void *base, int base_type, void *out, int out_type, int64_t n) {
    if (n_tau < 1 || n_tau > MAX_TAUS || base_type < MKL_F32 || base_type > MKL_BF16 || out_type < MKL_F32 ||
        out_type > MKL_BF16)
        return -1;
    float u[MAX_TAUS][BLOCK];
    float acc[BLOCK], gamma[BLOCK], merged[BLOCK], divisor[BLOCK], result[BLOCK];
    int64_t not_finite = 0;
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
        int m = n - j0 < BLOCK ? (int)(n - j0) : BLOCK;
        for (int i = 0; i < n_tau; i++) {
            const float *t = taus[i] + j0;
            const float keep_above = below[i], s = scale[i];
            float *ui = u[i];
            for (int j = 0; j < m; j++) {
                float x = t[j];
                ui[j] = (fabsf(x) > keep_above ? x : 0.0f) * s;
            }
            if (kind == 1 && sign_count) {
                for (int j = 0; j < m; j++) {
                    float ballot = (float)((ui[j] > 0.0f) - (ui[j] < 0.0f));
                    acc[j] = i == 0 ? ballot : acc[j] + ballot;
                }
            } else if (i == 0) {
                for (int j = 0; j < m; j++) acc[j] = ui[j];
            } else {
                for (int j = 0; j < m; j++) acc[j] = acc[j] + ui[j];
            }
        }
        if (kind == 0) {
            for (int j = 0; j < m; j++) result[j] = acc[j] * lam;
        } else {
            for (int j = 0; j < m; j++) gamma[j] = acc[j] < 0.0f ? -1.0f : 1.0f;
            for (int i = 0; i < n_tau; i++) {
                const float *ui = u[i];
                const float w = absw[i];
                for (int j = 0; j < m; j++) {
                    float aligned = ui[j] * gamma[j];
                    aligned = aligned < 0.0f ? 0.0f : aligned;
                    float share = aligned > 0.0f ? w : 0.0f;
                    merged[j] = i == 0 ? aligned : merged[j] + aligned;
                    divisor[j] = i == 0 ? share : divisor[j] + share;
                }
            }
            if (normalize) {
                for (int j = 0; j < m; j++) {
                    float d = divisor[j] < FLT_MIN ? FLT_MIN : divisor[j];
                    result[j] = ((merged[j] * gamma[j]) / d) * lam;
                }
            } else {
                for (int j = 0; j < m; j++) result[j] = (merged[j] * gamma[j]) * lam;
            }
        }
        not_finite += add_and_store(base, base_type, out, out_type, j0, result, m);
    }
    return not_finite;
}

/* out[i, :] = W[i, :] + Σₖ left[i, k] · right[k, :], the task-arithmetic step: the rank sum in a fixed order
 * with one fused multiply-add per k (s = l₀·r₀, then s = fma(lₖ, rₖ, s) for k = 1..r-1, each exactly rounded
 * once), then W added once; W and out as in mkl_consensus. The result does not depend on chunking, threads
 * or alignment. Columns go in blocks so the block of `right` stays in cache across rows. Returns the
 * non-finite count, or -1. */
static inline __attribute__((always_inline)) int64_t lowrank_add(const float *restrict left, int64_t rows,
                                                                 int64_t rank, const float *restrict right,
                                                                 int64_t cols, const void *base, int base_type,
                                                                 void *out, int out_type) {
    float sum[BLOCK];
    int64_t not_finite = 0;
    for (int64_t c0 = 0; c0 < cols; c0 += BLOCK) {
        int m = cols - c0 < BLOCK ? (int)(cols - c0) : BLOCK;
        for (int64_t i = 0; i < rows; i++) {
            const float *l = left + i * rank;
            const float first = l[0];
            const float *r0 = right + c0;
            for (int j = 0; j < m; j++) sum[j] = first * r0[j];
            for (int64_t k = 1; k < rank; k++) {
                const float lk = l[k];
                const float *rk = right + k * cols + c0;
                for (int j = 0; j < m; j++) sum[j] = fmaf(lk, rk[j], sum[j]);
            }
            not_finite += add_and_store(base, base_type, out, out_type, i * cols + c0, sum, m);
        }
    }
    return not_finite;
}

#if defined(__x86_64__) && defined(__GNUC__)
/* fmaf is one instruction here; elsewhere libm's fmaf gives the same (exactly rounded) results, slower */
__attribute__((target("avx2,fma"))) static int64_t lowrank_add_fma(const float *restrict left, int64_t rows,
                                                                   int64_t rank, const float *restrict right,
                                                                   int64_t cols, const void *base, int base_type,
                                                                   void *out, int out_type) {
    return lowrank_add(left, rows, rank, right, cols, base, base_type, out, out_type);
}
#endif

int64_t mkl_lowrank_add(const float *restrict left, int64_t rows, int64_t rank, const float *restrict right,
                        int64_t cols, const void *base, int base_type, void *out, int out_type) {
    if (rank < 1 || base_type < MKL_F32 || base_type > MKL_BF16 || out_type < MKL_F32 || out_type > MKL_BF16)
        return -1;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return lowrank_add_fma(left, rows, rank, right, cols, base, base_type, out, out_type);
#endif
    return lowrank_add(left, rows, rank, right, cols, base, base_type, out, out_type);
}

static struct PyModuleDef fused_module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused CPU merge kernels (ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&fused_module); }
