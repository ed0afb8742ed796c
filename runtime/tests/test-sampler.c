/* Sampler: greedy ties, top-k = 1 equals greedy, seeded reproducibility, the sampled distribution of a fixed
 * logit vector against its softmax (with top-k / top-p / min-p cuts), and llama.cpp's repetition penalty. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "pbs2p.h"

#include "test-util.h"

static pbs2p_sampler *make(float temp, int32_t top_k, float top_p, float min_p, float pen, uint64_t seed) {
    pbs2p_sampler_params p = pbs2p_sampler_default_params();
    p.temperature = temp, p.top_k = top_k, p.top_p = top_p, p.min_p = min_p, p.repeat_penalty = pen, p.seed = seed;
    pbs2p_sampler *s = NULL;
    pbs2p_status st = pbs2p_sampler_init(&p, &s);
    CHECK(st == PBS2P_OK && s, "sampler_init: %s", pbs2p_last_error());
    return s;
}

static int32_t sample_copy(pbs2p_sampler *s, const float *logits, int32_t n, const int32_t *hist, int32_t nh) {
    float buf[64];
    memcpy(buf, logits, (size_t)n * sizeof(float));
    return pbs2p_sample(s, buf, n, hist, nh);
}

#define NDRAW 40000

/* Draw NDRAW tokens and compare the counts with the expected probabilities: |freq - p| <= 0.01 for each
 * (binomial sd at p = 0.5 is 0.0025, so this is 4 sd), and zero draws where p == 0. */
static void check_distribution(const char *what, pbs2p_sampler *s, const float *logits, int32_t n, const double *expect) {
    int counts[64] = {0};
    for (int i = 0; i < NDRAW; i++) {
        int32_t t = sample_copy(s, logits, n, NULL, 0);
        CHECK(t >= 0 && t < n, "%s: token %d out of range", what, t);
        if (t >= 0 && t < n) counts[t]++;
    }
    for (int32_t i = 0; i < n; i++) {
        double f = (double)counts[i] / NDRAW;
        if (expect[i] == 0.0) CHECK(counts[i] == 0, "%s: token %d drawn %d times, expected never", what, i, counts[i]);
        else CHECK(fabs(f - expect[i]) <= 0.01, "%s: token %d freq %.4f, expected %.4f", what, i, f, expect[i]);
    }
}

int main(void) {
    const float logits[6] = {1.0f, 3.0f, 0.5f, 3.0f, 2.0f, -1.0f};
    const int32_t n = 6;

    /* greedy: argmax, lowest id on ties (ids 1 and 3 tie) */
    pbs2p_sampler *g = make(0.0f, 0, 1.0f, 0.0f, 1.0f, 1);
    CHECK(sample_copy(g, logits, n, NULL, 0) == 1, "greedy tie should pick id 1");
    const float neg[4] = {-5.0f, -2.0f, -2.0f, -7.0f};
    CHECK(sample_copy(g, neg, 4, NULL, 0) == 1, "greedy over negative logits should pick id 1");
    pbs2p_sampler_free(g);

    /* top-k = 1 at any temperature is greedy (same tie rule) */
    pbs2p_sampler *k1 = make(1.5f, 1, 1.0f, 0.0f, 1.0f, 7);
    for (int i = 0; i < 100; i++) CHECK(sample_copy(k1, logits, n, NULL, 0) == 1, "top-k 1 draw %d is not greedy", i);
    pbs2p_sampler_free(k1);

    /* same seed -> same sequence; a different seed -> a different one (over 200 draws) */
    pbs2p_sampler *a = make(1.0f, 0, 1.0f, 0.0f, 1.0f, 42), *b = make(1.0f, 0, 1.0f, 0.0f, 1.0f, 42),
                  *c = make(1.0f, 0, 1.0f, 0.0f, 1.0f, 43);
    int same = 1, differ = 0;
    for (int i = 0; i < 200; i++) {
        int32_t ta = sample_copy(a, logits, n, NULL, 0), tb = sample_copy(b, logits, n, NULL, 0),
                tc = sample_copy(c, logits, n, NULL, 0);
        same &= ta == tb;
        differ |= ta != tc;
    }
    CHECK(same, "same seed gave different tokens");
    CHECK(differ, "seeds 42 and 43 gave the same 200 tokens");
    pbs2p_sampler_free(a), pbs2p_sampler_free(b), pbs2p_sampler_free(c);

    /* plain softmax at T = 1 */
    double p[6], z = 0.0;
    for (int i = 0; i < n; i++) z += exp(logits[i]);
    for (int i = 0; i < n; i++) p[i] = exp(logits[i]) / z;
    pbs2p_sampler *s = make(1.0f, 0, 1.0f, 0.0f, 1.0f, 3);
    check_distribution("softmax T=1", s, logits, n, p);
    pbs2p_sampler_free(s);

    /* temperature 2: softmax(l / 2) */
    double q[6];
    z = 0.0;
    for (int i = 0; i < n; i++) z += exp(logits[i] / 2.0);
    for (int i = 0; i < n; i++) q[i] = exp(logits[i] / 2.0) / z;
    s = make(2.0f, 0, 1.0f, 0.0f, 1.0f, 5);
    check_distribution("softmax T=2", s, logits, n, q);
    pbs2p_sampler_free(s);

    /* top-k 3 keeps ids 1, 3 (3.0) and 4 (2.0), renormalised */
    double r[6] = {0};
    z = 2 * exp(3.0) + exp(2.0);
    r[1] = r[3] = exp(3.0) / z, r[4] = exp(2.0) / z;
    s = make(1.0f, 3, 1.0f, 0.0f, 1.0f, 9);
    check_distribution("top-k 3", s, logits, n, r);
    pbs2p_sampler_free(s);

    /* top-p 0.7: sorted probs p1 = p3 ~ 0.378, p4 ~ 0.139...: 1 and 3 reach 0.756 >= 0.7 -> keep {1, 3} */
    double t[6] = {0};
    t[1] = t[3] = 0.5;
    s = make(1.0f, 0, 0.7f, 0.0f, 1.0f, 11);
    check_distribution("top-p 0.7", s, logits, n, t);
    pbs2p_sampler_free(s);

    /* min-p 0.3: keep p >= 0.3·p_max, i.e. logit >= 3 + ln 0.3 = 1.796 -> {1, 3, 4} (same as top-k 3) */
    s = make(1.0f, 0, 1.0f, 0.3f, 1.0f, 13);
    check_distribution("min-p 0.3", s, logits, n, r);
    pbs2p_sampler_free(s);

    /* repetition penalty 2 (llama.cpp rule): positive logits divided, negative multiplied; each token once */
    pbs2p_sampler_params pp = pbs2p_sampler_default_params();
    pp.temperature = 0.0f, pp.repeat_penalty = 2.0f, pp.repeat_last_n = 3;
    pbs2p_sampler *pen = NULL;
    CHECK(pbs2p_sampler_init(&pp, &pen) == PBS2P_OK, "init penalty sampler");
    float l2[6];
    memcpy(l2, logits, sizeof l2);
    const int32_t hist[5] = {1, 5, 3, 5, 3}; /* window of 3: {3, 5} — token 1 is outside it */
    int32_t tok = pbs2p_sample(pen, l2, n, hist, 5);
    CHECK(l2[3] == 1.5f, "penalised positive logit: %g, expected 1.5", (double)l2[3]);
    CHECK(l2[5] == -2.0f, "penalised negative logit: %g, expected -2", (double)l2[5]);
    CHECK(l2[1] == 3.0f, "token outside the window was penalised: %g", (double)l2[1]);
    CHECK(tok == 1, "greedy after penalty: %d, expected 1", tok);
    pbs2p_sampler_free(pen);

    /* invalid parameters are refused */
    pp = pbs2p_sampler_default_params();
    pp.repeat_penalty = 0.0f;
    pbs2p_sampler *bad = NULL;
    CHECK(pbs2p_sampler_init(&pp, &bad) == PBS2P_ERR_INVALID_ARG && bad == NULL, "repeat_penalty 0 accepted");

    printf("test-sampler: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
