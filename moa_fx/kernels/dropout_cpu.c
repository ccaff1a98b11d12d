/* The sparse dropout correction of moa_fx::dropout_lora on CPU: one loop over the gap streams of the
 * (token, expert) pairs that fire.
 *
 * The streams are the ones of dropout_mask.py (its docstring is the definition): one per (expert e,
 * token t), of key kappa = mix32(key_e ^ mix32(golden*(t + 1))); gap j draws h = mix32(mix32(j ^ kappa) ^ kappa),
 * u = (h + 1/2) / 2^32, G = floor(log u / log(1 - p_e)) in double, and the drops are at the features
 * k_i = sum_{j <= i} (G_j + 1) - 1 below d_in. Only the tokens where expert e fires (fires[t*E + e] != 0)
 * draw their streams.
 *
 * For every counted drop (t, k) of expert e and every rank column i of e (cols[e] <= i < cols[e + 1]):
 *   c[t, i]  += x[t, k] * a[k, i]                    (forward: c is subtracted from x @ A_cat.T)
 *   dx[t, k] -= sum_i u[t, i] * a[k, i]              (backward, u = dZ_drop / (1 - p))
 *   da[k, i] -= u[t, i] * x[t, k]
 * tables holds E gap tables of 2^TABLE_BITS entries (moa_gap_table of each expert's rate).
 * Any of c, dx, da may be NULL (not wanted); u is read only when dx or da is wanted. Every array is
 * contiguous fp32 (a = A_cat.T and da = dA_cat.T: (d_in, R), rows of one k adjacent; c and u: (T, R); x and dx: (T, d_in)). Returns the number of
 * counted drops. Built and loaded by native.py; no dependency beyond libm.
 */
#include <math.h>
#include <stdint.h>

#define TABLE_BITS 12
#define TABLE_SHIFT (32 - TABLE_BITS)
#define GOLDEN 0x9E3779B9u

static inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x68E31DA5u;
    return h ^ (h >> 16);
}

/* G of one draw h, exactly as dropout_mask._gaps computes it. */
static inline int64_t gap(uint32_t h, double log_keep) {
    const double u = ((double)h + 0.5) * (1.0 / 4294967296.0);
    return (int64_t)floor(log(u) / log_keep);
}

/* The gap table of one rate: table[b] = G for every h of bucket b (h >> TABLE_SHIFT == b) when G is the
 * same at both ends of the bucket, else -1 (then the draw computes its log). G is non-increasing in h,
 * so equal ends mean one G for the whole bucket: the table changes the cost, never the gaps. */
void moa_gap_table(double log_keep, int32_t *table) {
    for (uint32_t b = 0; b < (1u << TABLE_BITS); ++b) {
        const int64_t hi = gap(b << TABLE_SHIFT, log_keep);
        const int64_t lo = gap((b << TABLE_SHIFT) | ((1u << TABLE_SHIFT) - 1u), log_keep);
        table[b] = (hi == lo && hi < INT32_MAX) ? (int32_t)hi : -1;
    }
}

int64_t moa_dropout_correct(int64_t num_tokens, int64_t d_in, int64_t num_experts, const int64_t *cols,
                            const int64_t *keys, const double *log_keep, const int32_t *tables,
                            const uint8_t *fires, const float *x, const float *a, const float *u,
                            int64_t rank_total, float *c, float *dx, float *da) {
    int64_t counted = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
        if (!(log_keep[e] < 0.0)) continue; /* p = 0: no drops */
        const uint32_t key = (uint32_t)keys[e];
        const int64_t lo = cols[e], hi = cols[e + 1];
        const int32_t *table = tables + (e << TABLE_BITS);
        for (int64_t t = 0; t < num_tokens; ++t) {
            if (!fires[t * num_experts + e]) continue; /* no mask where the expert does not fire */
            const uint32_t row_key = mix32(key ^ mix32((uint32_t)(t + 1) * GOLDEN));
            const float *ut = u ? u + t * rank_total : 0;
            float *ct = c ? c + t * rank_total : 0;
            int64_t k = -1;
            for (uint32_t j = 0;; ++j) {
                const uint32_t h = mix32(mix32(j ^ row_key) ^ row_key);
                const int32_t g = table[h >> TABLE_SHIFT];
                k += (g >= 0 ? (int64_t)g : gap(h, log_keep[e])) + 1;
                if (k >= d_in) break;
                ++counted;
                const int64_t q = t * d_in + k;
                const float xv = x[q];
                const float *ak = a + k * rank_total;
                if (ct)
                    for (int64_t i = lo; i < hi; ++i) ct[i] += xv * ak[i];
                if (ut) {
                    float *dak = da ? da + k * rank_total : 0;
                    float acc = 0.0f;
                    for (int64_t i = lo; i < hi; ++i) {
                        acc += ut[i] * ak[i];
                        if (dak) dak[i] -= ut[i] * xv;
                    }
                    if (dx) dx[q] -= acc;
                }
            }
        }
    }
    return counted;
}
