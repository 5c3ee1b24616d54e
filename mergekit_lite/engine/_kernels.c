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

#include "_rows.h"
#include <stdlib.h>

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
        /* no branch on `inside`: a band of a few percent makes it a coin flip per group of 8 (every store lands,
         * an empty mask stores lanes the next store overwrites) */
        if (gathered + 8 >= cap) { /* the 8-lane store needs room: finish this chunk the portable way */
            int64_t rest_above = 0, rest = band_portable(x + j, n - j, high, low, out + gathered,
                                                        cap - gathered, &rest_above);
            *above = count_above - __builtin_popcount(over) + rest_above;
            return rest < 0 ? -1 : gathered + rest;
        }
        __m256i order = _mm256_loadu_si256((const __m256i *)pack[inside]);
        _mm256_storeu_ps(out + gathered, _mm256_permutevar8x32_ps(v, order));
        gathered += __builtin_popcount(inside);
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
MKL_CLONES static void lowrank_portable(const float *restrict left, int64_t rows, int64_t rank,
                                        const float *restrict right, int64_t cols, float *restrict out) {
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

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* Register-blocked form of the rank sum, for x86-64 with AVX2 and FMA: a tile of R rows (R ≤ 6) × 16 columns
 * is held in twelve registers while k runs over the rank, so each step costs two loads of `right`, R broadcasts
 * of `left` and 2R vector operations, instead of a load and a store of a partial sum per element. Each output
 * still gets exactly the scalar loops' operations in their order: s = l₀·r₀, then per k either
 * s = fma(lₖ, rₖ, s) (`fused`, as lowrank_add) or s = s + lₖ·rₖ rounded twice (as mkl_lowrank), so the
 * bytes do not change (tests/test_kernels.py compares them with the scalar loops and with torch). */
#define TILE_COLS 16
#define TILE_ROWS 6
#define PANEL 256 /* columns per pass over the rows: rank × PANEL floats of `right` stay in L1/L2 */

static inline __attribute__((always_inline, target("avx2,fma"))) void product_tile(
    const float *restrict l, int64_t rank, const float *restrict right, int64_t cols, int64_t c, const int R,
    const int fused, float *restrict dst, int64_t ld) {
    __m256 a[TILE_ROWS][2];
    __m256 r0 = _mm256_loadu_ps(right + c), r1 = _mm256_loadu_ps(right + c + 8);
    for (int t = 0; t < R; t++) {
        const __m256 b = _mm256_set1_ps(l[t * rank]);
        a[t][0] = _mm256_mul_ps(b, r0);
        a[t][1] = _mm256_mul_ps(b, r1);
    }
    for (int64_t k = 1; k < rank; k++) {
        const float *rk = right + k * cols + c;
        r0 = _mm256_loadu_ps(rk);
        r1 = _mm256_loadu_ps(rk + 8);
        for (int t = 0; t < R; t++) {
            const __m256 b = _mm256_set1_ps(l[t * rank + k]);
            if (fused) {
                a[t][0] = _mm256_fmadd_ps(b, r0, a[t][0]);
                a[t][1] = _mm256_fmadd_ps(b, r1, a[t][1]);
            } else {
                a[t][0] = _mm256_add_ps(a[t][0], _mm256_mul_ps(b, r0));
                a[t][1] = _mm256_add_ps(a[t][1], _mm256_mul_ps(b, r1));
            }
        }
    }
    for (int t = 0; t < R; t++) {
        _mm256_storeu_ps(dst + t * ld, a[t][0]);
        _mm256_storeu_ps(dst + t * ld + 8, a[t][1]);
    }
}

/* The last cols % 16 columns, one row at a time, same operations (fmaf is one exactly rounded instruction). */
static inline __attribute__((always_inline, target("avx2,fma"))) void product_tail(
    const float *restrict l, int64_t rank, const float *restrict right, int64_t cols, int64_t c, int m,
    const int fused, float *restrict dst) {
    for (int j = 0; j < m; j++) dst[j] = l[0] * right[c + j];
    for (int64_t k = 1; k < rank; k++) {
        const float lk = l[k];
        const float *rk = right + k * cols + c;
        if (fused) {
            for (int j = 0; j < m; j++) dst[j] = fmaf(lk, rk[j], dst[j]);
        } else {
            for (int j = 0; j < m; j++) dst[j] = dst[j] + lk * rk[j];
        }
    }
}

__attribute__((target("avx2,fma"))) static void lowrank_tiled(const float *restrict left, int64_t rows, int64_t rank,
                                                              const float *restrict right, int64_t cols,
                                                              float *restrict out) {
    const int64_t wide = cols - cols % TILE_COLS;
    for (int64_t p = 0; p < wide; p += PANEL) {
        const int64_t p_end = p + PANEL < wide ? p + PANEL : wide;
        int64_t i = 0;
        for (; i + TILE_ROWS <= rows; i += TILE_ROWS)
            for (int64_t c = p; c < p_end; c += TILE_COLS)
                product_tile(left + i * rank, rank, right, cols, c, TILE_ROWS, 0, out + i * cols + c, cols);
        for (; i < rows; i++)
            for (int64_t c = p; c < p_end; c += TILE_COLS)
                product_tile(left + i * rank, rank, right, cols, c, 1, 0, out + i * cols + c, cols);
    }
    if (wide < cols)
        for (int64_t i = 0; i < rows; i++)
            product_tail(left + i * rank, rank, right, cols, wide, (int)(cols - wide), 0, out + i * cols + wide);
}
#endif

void mkl_lowrank(const float *restrict left, int64_t rows, int64_t rank, const float *restrict right, int64_t cols,
                 float *restrict out) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (rank >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        lowrank_tiled(left, rows, rank, right, cols, out);
        return;
    }
#endif
    lowrank_portable(left, rows, rank, right, cols, out);
}

/* out[at + j] = W[at + j] + delta[j] for j < m, rounded to the output type; returns how many are not finite. */
static inline int add_and_store(const void *base, int base_type, void *out, int out_type, int64_t at, float *delta,
                                int m) {
    if (base_type == ROW_F32) {
        const float *w = (const float *)base + at;
        for (int j = 0; j < m; j++) delta[j] = w[j] + delta[j];
    } else {
        const uint16_t *w = (const uint16_t *)base + at;
        for (int j = 0; j < m; j++) delta[j] = bf16_to_f32(w[j]) + delta[j];
    }
    int bad = 0;
    if (out_type == ROW_F32) {
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
/* The consensus of n entries: τᵢ entries taus[i][0..n), W and out entries at [at, at + n). */
MKL_CLONES static int64_t consensus_span(int kind, int n_tau, const float *const *taus, const float *below,
                                         const float *scale, const float *absw, int sign_count, int normalize,
                                         float lam, const void *base, int base_type, void *out, int out_type,
                                         int64_t at, int64_t n) {
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
        not_finite += add_and_store(base, base_type, out, out_type, at + j0, result, m);
    }
    return not_finite;
}

static int valid_types(int n_tau, int base_type, int out_type) {
    return n_tau >= 1 && n_tau <= MAX_TAUS && base_type >= ROW_F32 && base_type <= ROW_BF16 && out_type >= ROW_F32 &&
           out_type <= ROW_BF16;
}

int64_t mkl_consensus(int kind, int n_tau, const float *const *taus, const float *below, const float *scale,
                      const float *absw, int sign_count, int normalize, float lam, const void *base, int base_type,
                      void *out, int out_type, int64_t n) {
    if (!valid_types(n_tau, base_type, out_type)) return -1;
    return consensus_span(kind, n_tau, taus, below, scale, absw, sign_count, normalize, lam, base, base_type, out,
                          out_type, 0, n);
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
/* add_and_store for one 16-column row segment, in AVX2: the same additions, the same round-to-nearest-even bit
 * arithmetic for bfloat16 (wrapping like the uint32 scalar), the same non-finite tests. */
static inline __attribute__((always_inline, target("avx2,fma"))) int add_store16(const void *base, int base_type,
                                                                                void *out, int out_type, int64_t at,
                                                                                const float *delta) {
    const __m256 x0 = _mm256_add_ps(load_row8(base, base_type, at), _mm256_loadu_ps(delta));
    const __m256 x1 = _mm256_add_ps(load_row8(base, base_type, at + 8), _mm256_loadu_ps(delta + 8));
    if (out_type == ROW_F32) {
        _mm256_storeu_ps((float *)out + at, x0);
        _mm256_storeu_ps((float *)out + at + 8, x1);
        const __m256 zero = _mm256_setzero_ps();
        return __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(x0, x0), zero, _CMP_NEQ_UQ))) +
               __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(x1, x1), zero, _CMP_NEQ_UQ)));
    }
    const __m256i h0 = to_bf16_bits(x0), h1 = to_bf16_bits(x1);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h0, h1), 0xD8);
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + at), packed);
    const __m256i exp = _mm256_set1_epi32(0x7F80);
    const __m256i bad0 = _mm256_cmpeq_epi32(_mm256_and_si256(h0, exp), exp);
    const __m256i bad1 = _mm256_cmpeq_epi32(_mm256_and_si256(h1, exp), exp);
    return __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(bad0))) +
           __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(bad1)));
}

/* lowrank_add through the register-blocked tiles (same operations per output, see product_tile), W added and
 * the result rounded per 16-column row segment. */
__attribute__((target("avx2,fma"))) static int64_t lowrank_add_tiled(const float *restrict left, int64_t rows,
                                                                     int64_t rank, const float *restrict right,
                                                                     int64_t cols, const void *base, int base_type,
                                                                     void *out, int out_type) {
    float tile[TILE_ROWS * TILE_COLS];
    int64_t not_finite = 0;
    const int64_t wide = cols - cols % TILE_COLS;
    for (int64_t p = 0; p < wide; p += PANEL) {
        const int64_t p_end = p + PANEL < wide ? p + PANEL : wide;
        int64_t i = 0;
        for (; i + TILE_ROWS <= rows; i += TILE_ROWS)
            for (int64_t c = p; c < p_end; c += TILE_COLS) {
                product_tile(left + i * rank, rank, right, cols, c, TILE_ROWS, 1, tile, TILE_COLS);
                for (int t = 0; t < TILE_ROWS; t++)
                    not_finite += add_store16(base, base_type, out, out_type, (i + t) * cols + c, tile + t * TILE_COLS);
            }
        for (; i < rows; i++)
            for (int64_t c = p; c < p_end; c += TILE_COLS) {
                product_tile(left + i * rank, rank, right, cols, c, 1, 1, tile, TILE_COLS);
                not_finite += add_store16(base, base_type, out, out_type, i * cols + c, tile);
            }
    }
    if (wide < cols)
        for (int64_t i = 0; i < rows; i++) {
            product_tail(left + i * rank, rank, right, cols, wide, (int)(cols - wide), 1, tile);
            not_finite += add_and_store(base, base_type, out, out_type, i * cols + wide, tile, (int)(cols - wide));
        }
    return not_finite;
}
#endif

int64_t mkl_lowrank_add(const float *restrict left, int64_t rows, int64_t rank, const float *restrict right,
                        int64_t cols, const void *base, int base_type, void *out, int out_type) {
    if (rank < 1 || base_type < ROW_F32 || base_type > ROW_BF16 || out_type < ROW_F32 || out_type > ROW_BF16)
        return -1;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return lowrank_add_tiled(left, rows, rank, right, cols, base, base_type, out, out_type);
#endif
    return lowrank_add(left, rows, rank, right, cols, base, base_type, out, out_type);
}

/* τ built per tile (#27): the selection band, the consensus and the sample of a τ = left·right computed from the
 * factors block by block, τ never written whole to memory. Each entry gets exactly mkl_lowrank's operations
 * (s = l₀·r₀, then s = s + lₖ·rₖ, each rounded), so the band, the kept set and the merged bytes are those of
 * the path that materialises τ chunk by chunk (tests/test_kernels.py compares them). */
#define TAU_PANEL 256 /* columns per block: rank × TAU_PANEL floats of `right` stay in L1/L2 across the rows */
#define TAU_ROWS 6    /* rows per block (TILE_ROWS of the AVX2 tiles) */

typedef void (*tau_block_fn)(const float *, int64_t, const float *, int64_t, int64_t, int, int64_t, int, float *);

/* τ[i0 .. i0 + R, c0 .. c0 + w) into buf (R rows of w floats), the portable loops. */
MKL_CLONES static void tau_block_portable(const float *restrict left, int64_t rank, const float *restrict right,
                                          int64_t cols, int64_t i0, int R, int64_t c0, int w, float *restrict buf) {
    for (int t = 0; t < R; t++) {
        const float *l = left + (i0 + t) * rank;
        float *o = buf + (int64_t)t * w;
        const float first = l[0];
        for (int j = 0; j < w; j++) o[j] = first * right[c0 + j];
        for (int64_t k = 1; k < rank; k++) {
            const float lk = l[k];
            const float *rk = right + k * cols + c0;
            for (int j = 0; j < w; j++) o[j] = o[j] + lk * rk[j];
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
/* The same block through the register tiles of mkl_lowrank (6 × 16, then one row at a time, then the tail). */
__attribute__((target("avx2,fma"))) static void tau_block_avx2(const float *restrict left, int64_t rank,
                                                               const float *restrict right, int64_t cols, int64_t i0,
                                                               int R, int64_t c0, int w, float *restrict buf) {
    const int wide = w - w % TILE_COLS;
    if (R == TILE_ROWS) {
        for (int c = 0; c < wide; c += TILE_COLS)
            product_tile(left + i0 * rank, rank, right, cols, c0 + c, TILE_ROWS, 0, buf + c, w);
    } else {
        for (int t = 0; t < R; t++)
            for (int c = 0; c < wide; c += TILE_COLS)
                product_tile(left + (i0 + t) * rank, rank, right, cols, c0 + c, 1, 0, buf + (int64_t)t * w + c, w);
    }
    if (wide < w)
        for (int t = 0; t < R; t++)
            product_tail(left + (i0 + t) * rank, rank, right, cols, c0 + wide, w - wide, 0, buf + (int64_t)t * w + wide);
}
#endif

static tau_block_fn tau_block(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return tau_block_avx2;
#endif
    return tau_block_portable;
}

/* mkl_band over τ = left·right (rows × cols): the same count above `high` and the same band values, gathered
 * block by block (callers use the band's values, never their positions). Returns as mkl_band, or -2 for a rank < 1. */
int64_t mkl_lowrank_band(const float *restrict left, int64_t rows, int64_t rank, const float *restrict right,
                         int64_t cols, float high, float low, float *restrict out, int64_t cap, int64_t *restrict above) {
    if (rank < 1) return -2;
    const tau_block_fn block = tau_block();
    float buf[TAU_ROWS * TAU_PANEL];
    int64_t count_above = 0, gathered = 0;
    for (int64_t c = 0; c < cols; c += TAU_PANEL) {
        const int w = cols - c < TAU_PANEL ? (int)(cols - c) : TAU_PANEL;
        for (int64_t i = 0; i < rows; i += TAU_ROWS) {
            const int R = rows - i < TAU_ROWS ? (int)(rows - i) : TAU_ROWS;
            block(left, rank, right, cols, i, R, c, w, buf);
            int64_t part_above = 0;
            const int64_t part = mkl_band(buf, (int64_t)R * w, high, low, out + gathered, cap - gathered, &part_above);
            count_above += part_above;
            if (part < 0) {
                *above = count_above;
                return -1;
            }
            gathered += part;
        }
    }
    *above = count_above;
    return gathered;
}

/* mkl_consensus with each τᵢ = leftᵢ·rightᵢ (rows × cols, rank ranks[i]) built block by block from its factors:
 * the same operations on the same values, so the same bytes, with τ never in memory. Returns as mkl_consensus
 * (-1 also for a rank < 1 or a failed allocation). */
int64_t mkl_lowrank_consensus(int kind, int n_tau, const float *const *lefts, const int64_t *ranks,
                              const float *const *rights, int64_t rows, int64_t cols, const float *below,
                              const float *scale, const float *absw, int sign_count, int normalize, float lam,
                              const void *base, int base_type, void *out, int out_type) {
    if (!valid_types(n_tau, base_type, out_type)) return -1;
    for (int a = 0; a < n_tau; a++)
        if (ranks[a] < 1) return -1;
    const tau_block_fn block = tau_block();
    const int64_t stride = (int64_t)TAU_ROWS * TAU_PANEL;
    float *bufs = (float *)malloc(sizeof(float) * (size_t)(n_tau * stride));
    if (bufs == NULL) return -1;
    const float *row_taus[MAX_TAUS];
    int64_t not_finite = 0;
    for (int64_t c = 0; c < cols; c += TAU_PANEL) {
        const int w = cols - c < TAU_PANEL ? (int)(cols - c) : TAU_PANEL;
        for (int64_t i = 0; i < rows; i += TAU_ROWS) {
            const int R = rows - i < TAU_ROWS ? (int)(rows - i) : TAU_ROWS;
            for (int a = 0; a < n_tau; a++) block(lefts[a], ranks[a], rights[a], cols, i, R, c, w, bufs + a * stride);
            for (int t = 0; t < R; t++) {
                for (int a = 0; a < n_tau; a++) row_taus[a] = bufs + a * stride + (int64_t)t * w;
                not_finite += consensus_span(kind, n_tau, row_taus, below, scale, absw, sign_count, normalize, lam,
                                             base, base_type, out, out_type, (i + t) * cols + c, w);
            }
        }
    }
    free(bufs);
    return not_finite;
}

/* out[j] = τ[first + j·stride] for j < n, flat indices into τ = left·right (… × cols), from `right_t` = rightᵀ
 * (cols × rank, so each entry's rank-long sum reads one contiguous row): a strided sample of τ (the selection's
 * bracket) for the cost of n rank-long sums instead of the whole product. */
void mkl_lowrank_sample(const float *restrict left, int64_t rank, const float *restrict right_t, int64_t cols,
                        int64_t first, int64_t stride, int64_t n, float *restrict out) {
    int64_t row = first / cols, col = first % cols;
    const int64_t step_rows = stride / cols, step_cols = stride % cols;
    for (int64_t j = 0; j < n; j++) {
        const float *l = left + row * rank, *r = right_t + col * rank;
        float s = l[0] * r[0];
        for (int64_t k = 1; k < rank; k++) s = s + l[k] * r[k];
        out[j] = s;
        row += step_rows;
        col += step_cols;
        if (col >= cols) {
            col -= cols;
            row += 1;
        }
    }
}

/* DARE's keep-masks in one pass (mergekit_lite/randomness.py, through engine/kernels.dare_keep):
 * τ[j] ← τ[j] · keep(j) for flat indices start..start+count-1,
 * keep(j) = 1 where u(j) < density else 0, u(j) the uniform torch.rand gives entry j: the flat index space is cut
 * into blocks of 2¹⁶; block b's uniforms are torch's CPU generator (MT19937, seeded as at::mt19937 seeds it)
 * seeded with seeds[b − start/2¹⁶], each u = (r & (2²⁴−1)) · 2⁻²⁴ from one 32-bit draw r, as at::uniform_real_
 * distribution<float> makes it. The torch path computes sign(density − u) clamped at 0 and multiplies: the same
 * 1 or +0 factor, since a difference of two distinct floats is never rounded to 0. A block cut by the range is
 * drawn from its start (MT19937 is sequential); tests/test_kernels.py compares with torch.rand. About 1 ns per
 * entry with AVX2, against ~13 for torch.rand plus the mask arithmetic. */
#define MT_N 624
#define MT_M 397
#define DARE_BLOCK 65536

/* MT19937 seeded as at::mt19937(seed) seeds it: the low 32 bits, Knuth's multiplier. */
static void mt_seed(uint32_t *s, uint64_t seed) {
    s[0] = (uint32_t)(seed & 0xffffffffu);
    for (int j = 1; j < MT_N; j++) s[j] = 1812433253u * (s[j - 1] ^ (s[j - 1] >> 30)) + (uint32_t)j;
}

/* The next 624 words of state (the generator's refill, done before each run of 624 draws). */
static void mt_refill(uint32_t *s) {
    int k = 0;
    for (; k < MT_N - MT_M; k++) {
        const uint32_t y = (s[k] & 0x80000000u) | (s[k + 1] & 0x7fffffffu);
        s[k] = s[k + MT_M] ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908b0dfu);
    }
    for (; k < MT_N - 1; k++) {
        const uint32_t y = (s[k] & 0x80000000u) | (s[k + 1] & 0x7fffffffu);
        s[k] = s[k + MT_M - MT_N] ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908b0dfu);
    }
    const uint32_t y = (s[MT_N - 1] & 0x80000000u) | (s[0] & 0x7fffffffu);
    s[MT_N - 1] = s[MT_M - 1] ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908b0dfu);
}

/* τ[j] ·= keep(j) for n draws of one 624-word run (state words s[0..n)): temper, u = (y & (2²⁴−1))·2⁻²⁴,
 * factor 1 where u < density else +0, without branches (a coin flip would mispredict every other entry). */
static inline uint32_t mt_temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

static void keep_run(float *restrict t, const uint32_t *restrict s, int64_t n, float density) {
    for (int64_t j = 0; j < n; j++) {
        const float u = (float)(mt_temper(s[j]) & 0xffffffu) * (1.0f / 16777216.0f);
        t[j] = t[j] * (float)(u < density);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) static void keep_run_avx2(float *restrict t, const uint32_t *restrict s, int64_t n,
                                                          float density) {
    const __m256i m1 = _mm256_set1_epi32((int)0x9d2c5680u), m2 = _mm256_set1_epi32((int)0xefc60000u);
    const __m256i low24 = _mm256_set1_epi32(0xffffff);
    const __m256 scale = _mm256_set1_ps(1.0f / 16777216.0f), d = _mm256_set1_ps(density), one = _mm256_set1_ps(1.0f);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256i y = _mm256_loadu_si256((const __m256i *)(s + j));
        y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 11));
        y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 7), m1));
        y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 15), m2));
        y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 18));
        const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(y, low24)), scale);
        const __m256 keep = _mm256_and_ps(_mm256_cmp_ps(u, d, _CMP_LT_OQ), one);
        _mm256_storeu_ps(t + j, _mm256_mul_ps(_mm256_loadu_ps(t + j), keep));
    }
    keep_run(t + j, s + j, n - j, density);
}
#endif

void mkl_dare_keep(float *restrict tau, int64_t start, int64_t count, const uint64_t *restrict seeds, float density) {
    void (*run_keep)(float *restrict, const uint32_t *restrict, int64_t, float) = keep_run;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2")) run_keep = keep_run_avx2;
#endif
    const int64_t first = start / DARE_BLOCK;
    uint32_t state[MT_N];
    int64_t done = 0;
    while (done < count) {
        const int64_t at = start + done, block = at / DARE_BLOCK, skip = at - block * DARE_BLOCK;
        const int64_t n = count - done < DARE_BLOCK - skip ? count - done : DARE_BLOCK - skip;
        mt_seed(state, seeds[block - first]);
        for (int64_t run = 0; run < skip + n; run += MT_N) { /* draws [run, run + 624) */
            mt_refill(state);
            const int64_t lo = run > skip ? run : skip, hi = run + MT_N < skip + n ? run + MT_N : skip + n;
            if (hi > lo) run_keep(tau + done + (lo - skip), state + (lo - run), hi - lo, density);
        }
        done += n;
    }
}

static struct PyModuleDef fused_module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused CPU merge kernels (ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&fused_module); }
