/* pbs2p-run: generate text from a prompt, chat, or measure perplexity with a pbs2p model file. */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pbs2p.h"

typedef struct options {
    const char *model, *prompt, *prompt_file, *ppl_file, *kernel;
    int32_t n_predict, n_threads, n_ctx, seqlen, n_batch, kv_f16, chat;
    pbs2p_sampler_params sp;
} options;

static void usage(FILE *f) {
    fprintf(f,
            "usage: pbs2p-run -m MODEL [-p PROMPT | -f FILE] [options]\n"
            "       pbs2p-run -m MODEL --perplexity FILE [--seqlen N] [options]\n"
            "\n"
            "  -m, --model FILE         pbs2p model file (required)\n"
            "  -p, --prompt TEXT        prompt text\n"
            "  -f, --file FILE          read the prompt from FILE\n"
            "  -n, --n-predict N        tokens to generate, >= 1 (default 128); stops early at end-of-generation\n"
            "  -t, --threads N          threads, >= 1 (default: all online CPUs)\n"
            "  -c, --ctx N              context length (default: training context, at most 4096)\n"
            "  -b, --batch N            prompt tokens per forward pass (default 64)\n"
            "      --temp T             temperature; <= 0 is greedy (default 0.8)\n"
            "      --top-k K            keep the K most likely tokens; <= 0 off (default 40)\n"
            "      --top-p P            nucleus sampling mass; >= 1 off (default 0.95)\n"
            "      --min-p P            drop tokens below P x the top probability; <= 0 off (default 0.05)\n"
            "      --repeat-penalty R   llama.cpp repetition penalty over the last 64 tokens; 1 off (default 1)\n"
            "      --seed S             sampler seed (default 0x5eed): same seed, same output\n"
            "      --chat               wrap the prompt as a user message in the model's chat template\n"
            "      --kv-f16             store the KV cache in f16 (half the memory)\n"
            "      --kernel NAME        sparse-binary kernel: scalar, avx2, avx512, neon (popcount),\n"
            "                           avx2-expand, avx512-expand, neon-expand (byte-mask), auto\n"
            "      --perplexity FILE    perplexity of FILE: no BOS, non-overlapping windows of --seqlen tokens\n"
            "                           (last partial window dropped), scoring tokens 1..L-1 of each window\n"
            "      --seqlen N           perplexity window (default 2048)\n"
            "  -h, --help               this help\n"
            "\n"
            "Generated text goes to stdout as it is produced; timings go to stderr.\n");
}

static pbs2p_ctx *volatile g_ctx;
static void on_sigint(int sig) {
    (void)sig;
    if (g_ctx) pbs2p_ctx_abort(g_ctx);
}

/* Errors reach the user once, through pbs2p_last_error() in the CLI's message; warnings are shown as they come. */
static void on_log(int32_t level, const char *msg, void *user) {
    (void)user;
    if (level == PBS2P_LOG_WARN) fprintf(stderr, "pbs2p: %s\n", msg);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int parse_int(const char *opt, const char *s, int32_t *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 0);
    if (errno || *end || end == s || v < INT32_MIN || v > INT32_MAX) {
        fprintf(stderr, "error: %s expects an integer, got '%s'\n", opt, s);
        return 0;
    }
    *out = (int32_t)v;
    return 1;
}

static int parse_float(const char *opt, const char *s, float *out) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || *end || end == s || isnan(v)) {
        fprintf(stderr, "error: %s expects a number, got '%s'\n", opt, s);
        return 0;
    }
    *out = v;
    return 1;
}

/* 0: ok, 1: --help shown, -1: error (message printed). */
static int parse_args(int argc, char **argv, options *o) {
    memset(o, 0, sizeof *o);
    o->n_predict = 128;
    o->seqlen = 2048;
    o->sp = pbs2p_sampler_default_params();
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 1;
        }
        if (!strcmp(a, "--chat")) { o->chat = 1; continue; }
        if (!strcmp(a, "--kv-f16")) { o->kv_f16 = 1; continue; }
        if (i + 1 >= argc) {
            fprintf(stderr, "error: %s: unknown option or missing value (see --help)\n", a);
            return -1;
        }
        const char *v = argv[++i];
        int ok = 1;
        uint64_t seed;
        char *end;
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) o->model = v;
        else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) o->prompt = v;
        else if (!strcmp(a, "-f") || !strcmp(a, "--file")) o->prompt_file = v;
        else if (!strcmp(a, "--perplexity")) o->ppl_file = v;
        else if (!strcmp(a, "--kernel")) o->kernel = v;
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) ok = parse_int(a, v, &o->n_predict);
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            ok = parse_int(a, v, &o->n_threads);
            if (ok && o->n_threads < 1) {
                fprintf(stderr, "error: -t %d: need threads >= 1\n", o->n_threads);
                ok = 0;
            }
        }
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx")) ok = parse_int(a, v, &o->n_ctx);
        else if (!strcmp(a, "-b") || !strcmp(a, "--batch")) ok = parse_int(a, v, &o->n_batch);
        else if (!strcmp(a, "--seqlen")) ok = parse_int(a, v, &o->seqlen);
        else if (!strcmp(a, "--temp")) ok = parse_float(a, v, &o->sp.temperature);
        else if (!strcmp(a, "--top-k")) ok = parse_int(a, v, &o->sp.top_k);
        else if (!strcmp(a, "--top-p")) ok = parse_float(a, v, &o->sp.top_p);
        else if (!strcmp(a, "--min-p")) ok = parse_float(a, v, &o->sp.min_p);
        else if (!strcmp(a, "--repeat-penalty")) ok = parse_float(a, v, &o->sp.repeat_penalty);
        else if (!strcmp(a, "--seed")) {
            errno = 0;
            seed = strtoull(v, &end, 0);
            if (errno || *end || end == v || v[0] == '-') {
                fprintf(stderr, "error: --seed expects a non-negative integer, got '%s'\n", v);
                ok = 0;
            }
            o->sp.seed = seed;
        } else {
            fprintf(stderr, "error: unknown option %s (see --help)\n", a);
            return -1;
        }
        if (!ok) return -1;
    }
    if (!o->model) {
        fprintf(stderr, "error: no model given (-m FILE; see --help)\n");
        return -1;
    }
    if (o->ppl_file) {
        if (o->prompt || o->prompt_file || o->chat) {
            fprintf(stderr, "error: --perplexity cannot be combined with -p, -f or --chat\n");
            return -1;
        }
        if (o->seqlen < 2) {
            fprintf(stderr, "error: --seqlen %d: need >= 2\n", o->seqlen);
            return -1;
        }
        return 0;
    }
    if (o->prompt && o->prompt_file) {
        fprintf(stderr, "error: give the prompt with -p or -f, not both\n");
        return -1;
    }
    if (o->n_predict < 1) {
        fprintf(stderr, "error: -n %d: need -n >= 1\n", o->n_predict);
        return -1;
    }
    return 0;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "error: cannot open %s: %s\n", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (n == cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) break;
            buf = nb, cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) {
            if (ferror(f)) {
                fprintf(stderr, "error: cannot read %s: %s\n", path, strerror(errno));
                free(buf);
                buf = NULL;
            }
            break;
        }
    }
    fclose(f);
    if (!buf) return NULL;
    *len = n;
    return buf;
}

static int32_t *tokenize(const pbs2p_model *m, const char *text, size_t len, int add_special, int parse_special,
                         int32_t *n_out) {
    int32_t n = 0;
    pbs2p_status st = pbs2p_tokenize(m, text, len, add_special, parse_special, NULL, 0, &n);
    if (st != PBS2P_OK && st != PBS2P_ERR_BUFFER_TOO_SMALL) {
        fprintf(stderr, "error: tokenize: %s\n", pbs2p_last_error());
        return NULL;
    }
    int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
    if (!ids) {
        fprintf(stderr, "error: out of memory for %d tokens\n", n);
        return NULL;
    }
    if (pbs2p_tokenize(m, text, len, add_special, parse_special, ids, n + 1, n_out) != PBS2P_OK) {
        fprintf(stderr, "error: tokenize: %s\n", pbs2p_last_error());
        free(ids);
        return NULL;
    }
    return ids;
}

/* Streams bytes to stdout, holding back a trailing incomplete UTF-8 sequence so no character is split. */
typedef struct utf8_out {
    unsigned char pend[8];
    int n;
} utf8_out;

static int utf8_len(unsigned char c) {
    if (c < 0x80) return 1;
    if ((c & 0xe0) == 0xc0) return 2;
    if ((c & 0xf0) == 0xe0) return 3;
    if ((c & 0xf8) == 0xf0) return 4;
    return 1; /* continuation or invalid lead byte: pass through */
}

static void utf8_write(utf8_out *u, const char *s, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        const unsigned char c = (unsigned char)s[i];
        if (u->n > 0 && (c & 0xc0) != 0x80) { /* new lead byte before the sequence completed: flush as is */
            fwrite(u->pend, 1, (size_t)u->n, stdout);
            u->n = 0;
        }
        u->pend[u->n++] = c;
        if (u->n >= utf8_len(u->pend[0])) {
            fwrite(u->pend, 1, (size_t)u->n, stdout);
            u->n = 0;
        }
    }
    fflush(stdout);
}

static void utf8_flush(utf8_out *u) {
    fwrite(u->pend, 1, (size_t)u->n, stdout);
    u->n = 0;
    fflush(stdout);
}

static int run_perplexity(const options *o, const pbs2p_model *m, pbs2p_ctx *ctx, int32_t n_vocab) {
    size_t len = 0;
    char *text = read_file(o->ppl_file, &len);
    if (!text) return 1;
    int32_t n_tok = 0;
    int32_t *toks = tokenize(m, text, len, 0, 0, &n_tok);
    free(text);
    if (!toks) return 1;
    const int32_t L = o->seqlen, n_win = n_tok / L, nb = o->n_batch > 0 ? o->n_batch : 64;
    if (n_win < 1) {
        fprintf(stderr, "error: %s has %d tokens, fewer than one window of --seqlen %d\n", o->ppl_file, n_tok, L);
        free(toks);
        return 1;
    }
    fprintf(stderr, "perplexity: %d tokens, %d windows of %d\n", n_tok, n_win, L);
    float *logits = malloc((size_t)nb * n_vocab * sizeof(float));
    if (!logits) {
        fprintf(stderr, "error: out of memory for logits\n");
        free(toks);
        return 1;
    }
    double nll = 0.0, t0 = now_ms();
    int64_t count = 0;
    int rc = 0;
    for (int32_t w = 0; w < n_win && !rc; w++) {
        const int32_t *wt = toks + (size_t)w * L;
        pbs2p_ctx_truncate(ctx, 0);
        for (int32_t i0 = 0; i0 < L - 1 && !rc; i0 += nb) {
            const int32_t n = L - 1 - i0 < nb ? L - 1 - i0 : nb; /* the last token has no target */
            if (pbs2p_eval(ctx, wt + i0, n, logits, 1) != PBS2P_OK) {
                fprintf(stderr, "\nerror: eval: %s\n", pbs2p_last_error());
                rc = 1;
                break;
            }
            for (int32_t i = 0; i < n; i++) {
                const float *lg = logits + (size_t)i * n_vocab;
                double mx = lg[0], z = 0.0;
                for (int32_t v = 1; v < n_vocab; v++) mx = lg[v] > mx ? lg[v] : mx;
                for (int32_t v = 0; v < n_vocab; v++) z += exp((double)lg[v] - mx);
                nll -= (double)lg[wt[i0 + i + 1]] - mx - log(z);
                count++;
            }
        }
        if (!rc) {
            printf("[%d] %.4f\n", w + 1, exp(nll / (double)count));
            fflush(stdout);
        }
    }
    if (!rc) {
        const double ms = now_ms() - t0;
        printf("PPL = %.4f over %lld tokens\n", exp(nll / (double)count), (long long)count);
        fprintf(stderr, "perplexity: %.2f s (%.1f tok/s)\n", ms / 1e3, (double)count * 1e3 / ms);
    }
    free(logits);
    free(toks);
    return rc;
}

static int run_generate(const options *o, const pbs2p_model *m, pbs2p_ctx *ctx, int32_t n_vocab, double load_ms) {
    char *text = NULL;
    size_t len = 0;
    if (o->prompt_file) {
        if (!(text = read_file(o->prompt_file, &len))) return 1;
    } else {
        const char *p = o->prompt ? o->prompt : "";
        len = strlen(p);
        if (!(text = malloc(len + 1))) return 1;
        memcpy(text, p, len + 1);
    }
    int32_t n_prompt = 0, *toks = NULL;
    if (o->chat) {
        char *prompt_c = malloc(len + 1);
        if (!prompt_c) {
            free(text);
            return 1;
        }
        memcpy(prompt_c, text, len);
        prompt_c[len] = '\0';
        pbs2p_chat_msg msg = {"user", prompt_c};
        int32_t need = 0;
        pbs2p_status st = pbs2p_chat_apply(m, &msg, 1, 1, NULL, 0, &need);
        char *chat = NULL;
        if ((st == PBS2P_OK || st == PBS2P_ERR_BUFFER_TOO_SMALL) && (chat = malloc((size_t)need + 1)))
            st = pbs2p_chat_apply(m, &msg, 1, 1, chat, need + 1, &need);
        free(prompt_c);
        if (st != PBS2P_OK || !chat) {
            fprintf(stderr, "error: chat template: %s\n", pbs2p_last_error());
            free(chat);
            free(text);
            return 1;
        }
        /* the template already holds any BOS text; its control tokens are parsed */
        toks = tokenize(m, chat, (size_t)need, 0, 1, &n_prompt);
        free(chat);
    } else {
        toks = tokenize(m, text, len, 1, 0, &n_prompt);
    }
    free(text);
    if (!toks) return 1;
    if (n_prompt == 0) {
        const int32_t bos = pbs2p_token_bos(m);
        if (bos < 0) {
            fprintf(stderr, "error: empty prompt and the model has no BOS token to start from\n");
            free(toks);
            return 1;
        }
        toks[n_prompt++] = bos;
    }
    const int32_t n_ctx = pbs2p_ctx_n_ctx(ctx);
    if (n_prompt > n_ctx) {
        fprintf(stderr, "error: the prompt has %d tokens, the context holds %d (raise --ctx)\n", n_prompt, n_ctx);
        free(toks);
        return 1;
    }
    int32_t cap = n_prompt + o->n_predict;
    int32_t *hist = malloc((size_t)cap * sizeof *hist);
    float *logits = malloc((size_t)n_vocab * sizeof *logits);
    pbs2p_sampler *smp = NULL;
    if (!hist || !logits || pbs2p_sampler_init(&o->sp, &smp) != PBS2P_OK) {
        fprintf(stderr, "error: %s\n", smp ? "out of memory" : pbs2p_last_error());
        free(hist), free(logits), free(toks), pbs2p_sampler_free(smp);
        return 1;
    }
    memcpy(hist, toks, (size_t)n_prompt * sizeof *hist);
    free(toks);
    int rc = 0;
    const double t0 = now_ms();
    pbs2p_status st = pbs2p_eval(ctx, hist, n_prompt, logits, 0);
    const double t_prompt = now_ms() - t0;
    int32_t n_hist = n_prompt, n_gen = 0;
    utf8_out u = {{0}, 0};
    char piece[256];
    const double t1 = now_ms();
    if (st != PBS2P_OK) {
        fprintf(stderr, "error: prompt eval: %s\n", pbs2p_last_error());
        rc = 1;
    }
    while (!rc && n_gen < o->n_predict) {
        const int32_t tok = pbs2p_sample(smp, logits, n_vocab, hist, n_hist);
        if (tok < 0) {
            fprintf(stderr, "\nerror: sample: %s\n", pbs2p_last_error());
            rc = 1;
            break;
        }
        hist[n_hist++] = tok;
        n_gen++;
        if (pbs2p_token_is_eog(m, tok)) break;
        int32_t np = 0;
        if (pbs2p_token_to_piece(m, tok, 0, piece, sizeof piece, &np) == PBS2P_OK) utf8_write(&u, piece, np);
        if (n_gen == o->n_predict) break;
        if (pbs2p_ctx_n_past(ctx) >= n_ctx) {
            fprintf(stderr, "\nwarning: context full (%d tokens), stopping\n", n_ctx);
            break;
        }
        st = pbs2p_eval(ctx, &tok, 1, logits, 0);
        if (st == PBS2P_ERR_ABORTED) {
            fprintf(stderr, "\ninterrupted\n");
            break;
        }
        if (st != PBS2P_OK) {
            fprintf(stderr, "\nerror: eval: %s\n", pbs2p_last_error());
            rc = 1;
        }
    }
    utf8_flush(&u);
    printf("\n");
    const double t_gen = now_ms() - t1;
    fprintf(stderr,
            "pbs2p-run: load %.1f ms | prompt %d tokens, %.1f ms (%.2f tok/s) | generated %d tokens, %.1f ms "
            "(%.2f tok/s) | kernel %s\n",
            load_ms, n_prompt, t_prompt, t_prompt > 0 ? n_prompt * 1e3 / t_prompt : 0.0, n_gen, t_gen,
            t_gen > 0 ? n_gen * 1e3 / t_gen : 0.0, pbs2p_kernel_name());
    pbs2p_sampler_free(smp);
    free(hist);
    free(logits);
    return rc;
}

int main(int argc, char **argv) {
    options o;
    const int pa = parse_args(argc, argv, &o);
    if (pa != 0) exit(pa > 0 ? 0 : 2);
    pbs2p_set_log(on_log, NULL);
    if (o.kernel && pbs2p_set_kernel(o.kernel) != PBS2P_OK) {
        fprintf(stderr, "error: --kernel %s: %s\n", o.kernel, pbs2p_last_error());
        exit(1);
    }
    const double t0 = now_ms();
    pbs2p_model *m = NULL;
    if (pbs2p_model_load(o.model, &m) != PBS2P_OK) {
        fprintf(stderr, "error: cannot load %s: %s\n", o.model, pbs2p_last_error());
        exit(1);
    }
    pbs2p_model_info info;
    pbs2p_model_get_info(m, &info);
    pbs2p_ctx_params cp = pbs2p_ctx_default_params();
    cp.n_threads = o.n_threads;
    cp.kv_f16 = o.kv_f16;
    if (o.n_batch) cp.n_batch = o.n_batch;
    cp.n_ctx = o.ppl_file ? o.seqlen : o.n_ctx;
    pbs2p_ctx *ctx = NULL;
    if (pbs2p_ctx_init(m, &cp, &ctx) != PBS2P_OK) {
        fprintf(stderr, "error: cannot create a context: %s\n", pbs2p_last_error());
        pbs2p_model_free(m);
        exit(1);
    }
    const double load_ms = now_ms() - t0;
    fprintf(stderr, "pbs2p-run: %s %s, %d layers, n_embd %d, vocab %d, %.2f storage bpw, %.2f param bits, ctx %d\n",
            info.arch, info.method, info.n_layer, info.n_embd, info.n_vocab, info.storage_bpw, info.param_bits,
            pbs2p_ctx_n_ctx(ctx));
    g_ctx = ctx;
    signal(SIGINT, on_sigint);
    const int rc = o.ppl_file ? run_perplexity(&o, m, ctx, info.n_vocab) : run_generate(&o, m, ctx, info.n_vocab, load_ms);
    g_ctx = NULL;
    pbs2p_ctx_free(ctx);
    pbs2p_model_free(m);
    exit(rc);
}
