/* Token sampler. Order of operations on the logits (each step optional):
 *   1. repetition penalty over the last repeat_last_n history tokens (each distinct token once; llama.cpp's
 *      rule: logit > 0 ? logit / p : logit * p)
 *   2. temperature <= 0: greedy — argmax, lowest id on ties; done
 *   3. top-k: keep the k largest logits (ties at the k-th broken by lower id)
 *   4. temperature: logit / T
 *   5. softmax over the kept candidates (in double)
 *   6. top-p: keep the smallest prefix (by descending probability) whose mass reaches p (at least one)
 *   7. min-p: drop candidates with probability < min_p · p_max
 *   8. draw from the renormalised kept probabilities with the seeded RNG (xorshift64*)
 * Same seed and same logits sequence give the same tokens. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

typedef struct cand {
    float l;
    int32_t id;
} cand;

struct pbs2p_sampler {
    pbs2p_sampler_params p;
    uint64_t rng;
    int32_t cap;             /* capacity of the candidate arrays */
    cand *c;
    double *probs;
    uint8_t *seen;           /* per-token flag for the penalty, n_vocab bytes */
    int32_t seen_cap;
};

pbs2p_sampler_params pbs2p_sampler_default_params(void) {
    return (pbs2p_sampler_params){.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f,
                                  .repeat_penalty = 1.0f, .repeat_last_n = 64, .seed = 0x5eed};
}

pbs2p_status pbs2p_sampler_init(const pbs2p_sampler_params *params, pbs2p_sampler **out) {
    if (!out) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "out is NULL");
    *out = NULL;
    pbs2p_sampler_params p = params ? *params : pbs2p_sampler_default_params();
    if (isnan(p.temperature) || isnan(p.top_p) || isnan(p.min_p))
        return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "temperature, top_p and min_p must not be NaN");
    if (!(p.repeat_penalty > 0.0f) || !isfinite(p.repeat_penalty))
        return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "repeat_penalty = %g must be > 0", (double)p.repeat_penalty);
    if (p.repeat_last_n < 0)
        return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "repeat_last_n = %d is negative", p.repeat_last_n);
    pbs2p_sampler *s = calloc(1, sizeof *s);
    if (!s) return PBS2P_FAIL(PBS2P_ERR_NOMEM, "cannot allocate the sampler");
    s->p = p;
    /* splitmix64 of the seed: a nonzero xorshift state for every seed, 0 included */
    uint64_t z = p.seed + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    s->rng = (z ^ (z >> 31)) | 1;
    *out = s;
    return PBS2P_OK;
}

void pbs2p_sampler_free(pbs2p_sampler *s) {
    if (!s) return;
    free(s->c);
    free(s->probs);
    free(s->seen);
    free(s);
}

/* xorshift64*: uniform double in [0, 1) from the top 53 bits. */
static double rng_uniform(uint64_t *state) {
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return (double)((x * 0x2545f4914f6cdd1dull) >> 11) * (1.0 / 9007199254740992.0);
}

static int32_t argmax(const float *logits, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

/* Descending logit, ascending id on ties. */
static int cmp_desc(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->l != y->l) return x->l > y->l ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* Move the k best candidates (cmp_desc order) to c[0..k), in order. For k <= 64 one insertion pass over all
 * candidates beats a full sort; otherwise qsort everything. */
static void select_top(cand *c, int32_t n, int32_t k) {
    if (k >= n || k > 64) {
        qsort(c, (size_t)n, sizeof *c, cmp_desc);
        return;
    }
    int32_t m = 0; /* c[0..m) sorted best so far; candidates arrive in ascending id, so ties keep the earlier */
    for (int32_t i = 0; i < n; i++) {
        const cand x = c[i];
        if (m == k && !(x.l > c[k - 1].l)) continue;
        int32_t pos = m < k ? m : k - 1;
        while (pos > 0 && x.l > c[pos - 1].l) {
            c[pos] = c[pos - 1];
            pos--;
        }
        c[pos] = x;
        if (m < k) m++;
    }
}

int32_t pbs2p_sample(pbs2p_sampler *s, float *logits, int32_t n_vocab, const int32_t *history, int32_t n_history) {
    if (!s || !logits || n_vocab < 1) {
        PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "sampler or logits is NULL, or n_vocab = %d < 1", n_vocab);
        return -1;
    }
    const pbs2p_sampler_params *p = &s->p;
    if (p->repeat_penalty != 1.0f && history && n_history > 0 && p->repeat_last_n > 0) {
        if (s->seen_cap < n_vocab) {
            uint8_t *seen = realloc(s->seen, (size_t)n_vocab);
            if (!seen) {
                PBS2P_FAIL(PBS2P_ERR_NOMEM, "cannot allocate %d penalty flags", n_vocab);
                return -1;
            }
            s->seen = seen;
            s->seen_cap = n_vocab;
        }
        memset(s->seen, 0, (size_t)n_vocab);
        const int32_t h0 = n_history > p->repeat_last_n ? n_history - p->repeat_last_n : 0;
        for (int32_t i = h0; i < n_history; i++) {
            const int32_t t = history[i];
            if (t < 0 || t >= n_vocab || s->seen[t]) continue;
            s->seen[t] = 1;
            logits[t] = logits[t] > 0.0f ? logits[t] / p->repeat_penalty : logits[t] * p->repeat_penalty;
        }
    }
    if (!(p->temperature > 0.0f)) return argmax(logits, n_vocab);

    if (s->cap < n_vocab) {
        cand *c = realloc(s->c, (size_t)n_vocab * sizeof *c);
        if (c) s->c = c;
        double *pr = realloc(s->probs, (size_t)n_vocab * sizeof *pr);
        if (pr) s->probs = pr;
        if (!c || !pr) {
            PBS2P_FAIL(PBS2P_ERR_NOMEM, "cannot allocate %d candidates", n_vocab);
            return -1;
        }
        s->cap = n_vocab;
    }
    int32_t n = n_vocab;
    for (int32_t i = 0; i < n; i++) s->c[i] = (cand){logits[i], i};
    const int32_t k = p->top_k > 0 && p->top_k < n ? p->top_k : n;
    select_top(s->c, n, k);
    n = k;

    const double inv_t = 1.0 / (double)p->temperature;
    const double mx = (double)s->c[0].l * inv_t;
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        s->probs[i] = exp((double)s->c[i].l * inv_t - mx);
        sum += s->probs[i];
    }
    for (int32_t i = 0; i < n; i++) s->probs[i] /= sum;

    if (p->top_p < 1.0f) {
        double cum = 0.0;
        int32_t keep = n;
        for (int32_t i = 0; i < n; i++) {
            cum += s->probs[i];
            if (cum >= (double)p->top_p) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
    }
    if (p->min_p > 0.0f) {
        const double thr = (double)p->min_p * s->probs[0];
        int32_t keep = 1;
        while (keep < n && s->probs[keep] >= thr) keep++;
        n = keep;
    }
    double mass = 0.0;
    for (int32_t i = 0; i < n; i++) mass += s->probs[i];
    const double r = rng_uniform(&s->rng) * mass;
    double cum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        cum += s->probs[i];
        if (r < cum) return s->c[i].id;
    }
    return s->c[n - 1].id;
}
