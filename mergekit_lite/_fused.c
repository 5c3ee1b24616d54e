/* Fused CPU kernels of the merge engine: one pass where torch would make ~30 (mergekit_lite/fused.py).
 *
 * Every float operation is the one the torch path does, in the same order and in float32, so both paths
 * give the same bytes (tests/test_fused.py). Build flags keep it that way: -ffp-contract=off (no FMA
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
MKL_CLONES int64_t mkl_band(const float *restrict x, int64_t n, float high, float low, float *restrict out,
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

/* base[j] += consensus over i of uᵢ[j], uᵢ = (|τᵢ[j]| > belowᵢ ? τᵢ[j] : 0) · scaleᵢ  (SEMANTICS §3).
 *   kind 0 (sum):  λ · Σ uᵢ
 *   kind 1 (ties): γ = sign(Σ ballotᵢ) (+1 on 0), ballot = uᵢ or sign(uᵢ) (sign_count);
 *                  λ · γ · Σ relu(uᵢγ) / max(Σ [uᵢγ > 0]·|wᵢ|, FLT_MIN)  (the division only when normalize)
 * A negative belowᵢ keeps every entry. Mirrors methods/_common.py op for op (relu keeps -0.0 as torch does).
 * Returns 0, or -1 when n_tau is out of range. */
MKL_CLONES int mkl_consensus(int kind, int n_tau, const float *const *taus, const float *below,
                             const float *scale, const float *absw, int sign_count, int normalize, float lam,
                             float *restrict base, int64_t n) {
    if (n_tau < 1 || n_tau > MAX_TAUS) return -1;
    float u[MAX_TAUS][BLOCK];
    float acc[BLOCK], gamma[BLOCK], merged[BLOCK], divisor[BLOCK];
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
        float *b = base + j0;
        if (kind == 0) {
            for (int j = 0; j < m; j++) b[j] = b[j] + acc[j] * lam;
            continue;
        }
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
                b[j] = b[j] + ((merged[j] * gamma[j]) / d) * lam;
            }
        } else {
            for (int j = 0; j < m; j++) b[j] = b[j] + (merged[j] * gamma[j]) * lam;
        }
    }
    return 0;
}

static struct PyModuleDef fused_module = {PyModuleDef_HEAD_INIT, "_fused", "Fused CPU merge kernels (ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&fused_module); }
