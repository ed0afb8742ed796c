/* Tokenizers from tokenizer.* metadata, reproducing HF `tokenizers` ids (docs/format.md).
 *
 * Encoding: the text is first cut at special tokens (leftmost, longest first, as HF's added-vocabulary
 * matcher does), then each fragment is
 *   gpt2:  split into words by the pre-tokenizer regex of tokenizer.ggml.pre (hand-written matchers below,
 *          one per regex, on code points), each word's bytes mapped to GPT-2 byte-level characters and
 *          merged by merge rank (lowest rank first, leftmost on ties: HF's BPE word merge);
 *   llama: spaces replaced by U+2581, U+2581 prepended to a fragment at offset 0 (HF Metaspace,
 *          prepend_scheme "first"), and the whole fragment merged by the score of the merged piece (highest
 *          first, leftmost on ties: SentencePiece / llama.cpp), unknown pieces falling back to <0xAB> byte tokens.
 * Both merge loops keep the symbols in a linked list and the candidate pairs in a binary heap, so a word of
 * n symbols costs O(n log n).
 *
 * Invalid UTF-8 (HF only ever sees valid str): every byte that does not start a well-formed sequence is a
 * code point of its own that belongs to no class (not \p{L}, \p{N} or \s), i.e. it behaves like punctuation
 * in the split regexes; its byte is then encoded through the byte-level map (gpt2) or byte fallback (llama),
 * so the ids decode back to the exact input bytes wherever the vocabulary has those bytes. */
#include "tokenizer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "gguf.h"
#include "unicode.h"

enum { TOK_BPE = 0, TOK_SPM = 1 };
enum { PRE_GPT2 = 0, PRE_SMOLLM = 1, PRE_QWEN2 = 2, PRE_LLAMA3 = 3 };
enum { TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3, TT_USER = 4, TT_UNUSED = 5, TT_BYTE = 6 };
enum { MAX_TOKEN_BYTES = 65536, MAX_EOG = 8 };

typedef struct merge_ent {
    uint64_t key;     /* left id << 32 | right id; UINT64_MAX marks an empty slot */
    uint32_t rank;
    int32_t result;
} merge_ent;

struct pbs2p_tokenizer {
    int32_t type, pre, n_vocab;
    int32_t bos, eos, unk;
    int32_t add_bos, add_eos, add_space_prefix;
    char *text;              /* token texts as the file spells them, each NUL-terminated */
    uint32_t *text_off;      /* (n_vocab + 1) offsets into text; length = next offset - 1 - this */
    char *key;               /* gpt2: byte-level spelling of every token (HF respells those outside the alphabet) */
    uint32_t *key_off;
    uint8_t *ttype;          /* (n_vocab) token types */
    float *score;            /* (n_vocab) llama only */
    char *piece;             /* decoded bytes of every token */
    uint32_t *piece_off;     /* (n_vocab + 1) */
    int32_t *ht;             /* open-addressing vocab hash over the lookup spelling: id or -1 */
    uint32_t ht_mask;
    merge_ent *mt;           /* gpt2 merges hash */
    uint32_t mt_mask;
    int32_t byte_tok[256];   /* gpt2: id of byte b's byte-level character; llama: id of "<0xAB>"; -1 none */
    int32_t *spec;           /* tokens matched whole in the text, by first byte then longest first */
    int32_t n_spec;
    int32_t spec_start[257]; /* spec[spec_start[b] .. spec_start[b+1]) start with byte b */
    int32_t eog[MAX_EOG];
    int32_t n_eog;
};

/* ---- GPT-2 byte <-> unicode map ---- */

/* bytes_to_unicode(): printable Latin-1 bytes map to themselves; the other 68 (0x00-0x20, 0x7F-0xA0, 0xAD)
 * to U+0100.. in byte order. */
static uint32_t byte_to_cp(int b) {
    if (b <= 0x20) return 256u + (uint32_t)b;
    if (b >= 0x7f && b <= 0xa0) return 256u + 33 + (uint32_t)(b - 0x7f);
    if (b == 0xad) return 256u + 67;
    return (uint32_t)b;
}

/* Inverse: the byte of a byte-level character, -1 if cp is outside the alphabet. */
static int cp_to_byte(uint32_t cp) {
    if (cp < 256) return (cp <= 0x20 || (cp >= 0x7f && cp <= 0xa0) || cp == 0xad) ? -1 : (int)cp;
    if (cp <= 256 + 32) return (int)(cp - 256);
    if (cp <= 256 + 66) return (int)(0x7f + cp - 256 - 33);
    if (cp == 256 + 67) return 0xad;
    return -1;
}

/* ---- hashing ---- */

static uint32_t hash_bytes(const char *s, size_t n) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

static uint32_t hash_u64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return (uint32_t)k;
}

static const char *tok_key(const pbs2p_tokenizer *t, int32_t id, size_t *n) {
    if (t->key) {
        *n = t->key_off[id + 1] - t->key_off[id] - 1;
        return t->key + t->key_off[id];
    }
    *n = t->text_off[id + 1] - t->text_off[id] - 1;
    return t->text + t->text_off[id];
}

static int32_t vocab_find(const pbs2p_tokenizer *t, const char *s, size_t n) {
    for (uint32_t h = hash_bytes(s, n) & t->ht_mask;; h = (h + 1) & t->ht_mask) {
        int32_t id = t->ht[h];
        if (id < 0) return -1;
        size_t kn;
        const char *k = tok_key(t, id, &kn);
        if (kn == n && memcmp(k, s, n) == 0) return id;
    }
}

/* Later duplicates replace earlier ones, as HF's vocab dict (and llama.cpp's map) does. */
static void vocab_insert(pbs2p_tokenizer *t, int32_t id) {
    size_t n;
    const char *s = tok_key(t, id, &n);
    for (uint32_t h = hash_bytes(s, n) & t->ht_mask;; h = (h + 1) & t->ht_mask) {
        int32_t old = t->ht[h];
        size_t kn = 0;
        const char *k = old >= 0 ? tok_key(t, old, &kn) : NULL;
        if (old < 0 || (kn == n && memcmp(k, s, n) == 0)) {
            t->ht[h] = id;
            return;
        }
    }
}

static const merge_ent *merge_find(const pbs2p_tokenizer *t, int32_t l, int32_t r) {
    uint64_t key = (uint64_t)(uint32_t)l << 32 | (uint32_t)r;
    for (uint32_t h = hash_u64(key) & t->mt_mask;; h = (h + 1) & t->mt_mask) {
        if (t->mt[h].key == key) return &t->mt[h];
        if (t->mt[h].key == UINT64_MAX) return NULL;
    }
}

static uint32_t pow2_at_least(uint64_t n) {
    uint32_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

/* ---- load ---- */

void pbs2p_tokenizer_free(pbs2p_tokenizer *t) {
    if (!t) return;
    free(t->text);
    free(t->text_off);
    free(t->key);
    free(t->key_off);
    free(t->ttype);
    free(t->score);
    free(t->piece);
    free(t->piece_off);
    free(t->ht);
    free(t->mt);
    free(t->spec);
    free(t);
}

static int str_eq(gguf_str s, const char *c) { return s.n == strlen(c) && memcmp(s.s, c, s.n) == 0; }

static pbs2p_status get_special_id(const pbs2p_file *f, const char *key, int32_t n_vocab, int32_t *out) {
    uint32_t v;
    *out = -1;
    const gguf_kv *kv = pbs2p_gguf_find_kv(f, key);
    if (!kv) return PBS2P_OK;
    /* llama.cpp writes -1 (as i32) or 0xFFFFFFFF for "none" in some converters: treat both as absent. */
    if (kv->type == GGUF_TYPE_INT32 && pbs2p_gguf_arr_i64(kv, 0) == -1) return PBS2P_OK;
    pbs2p_status st = pbs2p_gguf_get_u32(f, key, 1, &v);
    if (st != PBS2P_OK) return st;
    if (v == UINT32_MAX) return PBS2P_OK;
    if (v >= (uint32_t)n_vocab) return PBS2P_FAIL(PBS2P_ERR_FORMAT, "%s = %u out of range (n_vocab %d)", key, v, n_vocab);
    *out = (int32_t)v;
    return PBS2P_OK;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* Decoded bytes of token id into dst (NULL: count only); returns the byte count. */
static size_t decode_token(const pbs2p_tokenizer *t, int32_t id, char *dst) {
    const char *s = t->text + t->text_off[id];
    size_t n = t->text_off[id + 1] - t->text_off[id] - 1, o = 0;
    if (t->type == TOK_SPM) {
        int hi, lo;
        if (t->ttype[id] == TT_BYTE && n == 6 && memcmp(s, "<0x", 3) == 0 && s[5] == '>' &&
            (hi = hex_digit(s[3])) >= 0 && (lo = hex_digit(s[4])) >= 0) {
            if (dst) dst[0] = (char)(hi << 4 | lo);
            return 1;
        }
        for (size_t i = 0; i < n;) {
            if (i + 3 <= n && memcmp(s + i, "\xe2\x96\x81", 3) == 0) {
                if (dst) dst[o] = ' ';
                o++;
                i += 3;
            } else {
                if (dst) dst[o] = s[i];
                o++;
                i++;
            }
        }
        return o;
    }
    for (size_t i = 0; i < n;) {
        size_t len;
        uint32_t cp = pbs2p_utf8_decode((const uint8_t *)s + i, n - i, &len);
        int b = cp_to_byte(cp);
        if (b >= 0) {
            if (dst) dst[o] = (char)b;
            o++;
        } else { /* outside the alphabet: the file spelled the raw text */
            if (dst) memcpy(dst + o, s + i, len);
            o += len;
        }
        i += len;
    }
    return o;
}

static int cmp_spec_ctx_len(const pbs2p_tokenizer *t, int32_t a, int32_t b) {
    const uint8_t *sa = (const uint8_t *)t->text + t->text_off[a], *sb = (const uint8_t *)t->text + t->text_off[b];
    if (sa[0] != sb[0]) return sa[0] < sb[0] ? -1 : 1;
    uint32_t la = t->text_off[a + 1] - t->text_off[a], lb = t->text_off[b + 1] - t->text_off[b];
    if (la != lb) return la > lb ? -1 : 1; /* longest first */
    return a < b ? -1 : (a > b);
}

static void sort_spec(pbs2p_tokenizer *t) { /* insertion sort: a few hundred special tokens at most in practice */
    for (int32_t i = 1; i < t->n_spec; i++) {
        int32_t v = t->spec[i], j = i - 1;
        while (j >= 0 && cmp_spec_ctx_len(t, t->spec[j], v) > 0) {
            t->spec[j + 1] = t->spec[j];
            j--;
        }
        t->spec[j + 1] = v;
    }
}

static int in_byte_alphabet(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        size_t len;
        uint32_t cp = pbs2p_utf8_decode((const uint8_t *)s + i, n - i, &len);
        if (cp_to_byte(cp) < 0) return 0;
        i += len;
    }
    return 1;
}

static pbs2p_status load_merges(pbs2p_tokenizer *t, const gguf_kv *mk) {
    if (mk->n > UINT32_MAX / 4) return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tokenizer.ggml.merges: %llu entries", (unsigned long long)mk->n);
    t->mt_mask = pow2_at_least(mk->n * 2 + 1) - 1;
    t->mt = malloc(((size_t)t->mt_mask + 1) * sizeof *t->mt);
    if (!t->mt) return PBS2P_FAIL(PBS2P_ERR_NOMEM, "merges hash (%llu merges)", (unsigned long long)mk->n);
    for (size_t i = 0; i <= t->mt_mask; i++) t->mt[i].key = UINT64_MAX;
    char *buf = NULL;
    size_t cap = 0;
    for (uint64_t i = 0; i < mk->n; i++) {
        gguf_str s = mk->strs[i];
        const char *sp = memchr(s.s, ' ', s.n);
        if (!sp || memchr(sp + 1, ' ', s.n - (size_t)(sp + 1 - s.s)) || sp == s.s || sp + 1 == s.s + s.n) {
            free(buf);
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tokenizer.ggml.merges[%llu] = \"%.*s\" is not \"left right\"",
                              (unsigned long long)i, (int)(s.n > 64 ? 64 : s.n), s.s);
        }
        size_t nl = (size_t)(sp - s.s), nr = s.n - nl - 1;
        if (nl + nr > cap) {
            cap = 2 * (nl + nr);
            char *nb = realloc(buf, cap);
            if (!nb) { free(buf); return PBS2P_FAIL(PBS2P_ERR_NOMEM, "merge buffer"); }
            buf = nb;
        }
        memcpy(buf, s.s, nl);
        memcpy(buf + nl, sp + 1, nr);
        int32_t l = vocab_find(t, s.s, nl), r = vocab_find(t, sp + 1, nr), m = vocab_find(t, buf, nl + nr);
        if (l < 0 || r < 0 || m < 0) {
            free(buf);
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tokenizer.ggml.merges[%llu] = \"%.*s\": %s not in the vocabulary",
                              (unsigned long long)i, (int)(s.n > 64 ? 64 : s.n), s.s,
                              l < 0 ? "left piece" : r < 0 ? "right piece" : "merged piece");
        }
        /* A repeated pair takes the later rank, as HF's merge map (a HashMap collected in order) does. */
        uint64_t key = (uint64_t)(uint32_t)l << 32 | (uint32_t)r;
        uint32_t h = hash_u64(key) & t->mt_mask;
        while (t->mt[h].key != UINT64_MAX && t->mt[h].key != key) h = (h + 1) & t->mt_mask;
        t->mt[h].key = key;
        t->mt[h].rank = (uint32_t)i;
        t->mt[h].result = m;
    }
    free(buf);
    return PBS2P_OK;
}

static pbs2p_status load_inner(const pbs2p_file *f, pbs2p_tokenizer *t) {
    pbs2p_status st;
    gguf_str model = {0}, pre = {0};
    if ((st = pbs2p_gguf_get_str(f, "tokenizer.ggml.model", 1, &model))) return st;
    if (str_eq(model, "gpt2")) t->type = TOK_BPE;
    else if (str_eq(model, "llama")) t->type = TOK_SPM;
    else return PBS2P_FAIL(PBS2P_ERR_UNSUPPORTED, "tokenizer.ggml.model \"%.*s\" (supported: gpt2, llama)",
                           (int)(model.n > 64 ? 64 : model.n), model.s);
    t->pre = PRE_GPT2;
    if (t->type == TOK_BPE) {
        if ((st = pbs2p_gguf_get_str(f, "tokenizer.ggml.pre", 0, &pre))) return st;
        if (pre.s == NULL || str_eq(pre, "default") || str_eq(pre, "gpt2")) t->pre = PRE_GPT2;
        else if (str_eq(pre, "smollm")) t->pre = PRE_SMOLLM;
        else if (str_eq(pre, "qwen2")) t->pre = PRE_QWEN2;
        else if (str_eq(pre, "llama-bpe") || str_eq(pre, "llama3") || str_eq(pre, "llama-v3")) t->pre = PRE_LLAMA3;
        else return PBS2P_FAIL(PBS2P_ERR_UNSUPPORTED,
                               "tokenizer.ggml.pre \"%.*s\" (supported: default, gpt2, smollm, qwen2, llama-bpe)",
                               (int)(pre.n > 64 ? 64 : pre.n), pre.s);
    }

    const gguf_kv *tk, *tt = NULL, *sc = NULL, *mk = NULL;
    if ((st = pbs2p_gguf_get_arr(f, "tokenizer.ggml.tokens", 1, GGUF_TYPE_STRING, -1, &tk))) return st;
    if (tk->n == 0) return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tokenizer.ggml.tokens is empty");
    if (tk->n > (1u << 24)) return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tokenizer.ggml.tokens: %llu tokens", (unsigned long long)tk->n);
    t->n_vocab = (int32_t)tk->n;
    if ((st = pbs2p_gguf_get_arr(f, "tokenizer.ggml.token_type", 0, GGUF_TYPE_INT32, t->n_vocab, &tt))) return st;
    if (t->type == TOK_SPM) {
        if ((st = pbs2p_gguf_get_arr(f, "tokenizer.ggml.scores", 1, GGUF_TYPE_FLOAT32, t->n_vocab, &sc))) return st;
    } else {
        if ((st = pbs2p_gguf_get_arr(f, "tokenizer.ggml.merges", 1, GGUF_TYPE_STRING, -1, &mk))) return st;
    }

    /* Token texts, types, scores. */
    uint64_t total = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) {
        if (tk->strs[i].n >= MAX_TOKEN_BYTES)
            return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tokenizer.ggml.tokens[%d] is %llu bytes long", i,
                              (unsigned long long)tk->strs[i].n);
        total += tk->strs[i].n + 1;
    }
    if (total > UINT32_MAX / 8) return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tokenizer.ggml.tokens: %llu bytes", (unsigned long long)total);
    size_t nv = (size_t)t->n_vocab;
    t->text = malloc(total);
    t->text_off = malloc((nv + 1) * sizeof *t->text_off);
    t->ttype = malloc(nv);
    t->piece_off = malloc((nv + 1) * sizeof *t->piece_off);
    t->ht_mask = pow2_at_least(nv * 2 + 1) - 1;
    t->ht = malloc(((size_t)t->ht_mask + 1) * sizeof *t->ht);
    if (sc) t->score = malloc(nv * sizeof *t->score);
    if (!t->text || !t->text_off || !t->ttype || !t->piece_off || !t->ht || (sc && !t->score))
        return PBS2P_FAIL(PBS2P_ERR_NOMEM, "vocabulary of %d tokens", t->n_vocab);
    uint32_t o = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) {
        t->text_off[i] = o;
        memcpy(t->text + o, tk->strs[i].s, tk->strs[i].n);
        o += (uint32_t)tk->strs[i].n;
        t->text[o++] = '\0';
        int64_t ty = tt ? pbs2p_gguf_arr_i64(tt, (uint64_t)i) : TT_NORMAL;
        if (ty < 0 || ty > TT_BYTE) return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tokenizer.ggml.token_type[%d] = %lld", i, (long long)ty);
        t->ttype[i] = (uint8_t)ty;
        if (sc) {
            double v = pbs2p_gguf_arr_f64(sc, (uint64_t)i);
            if (isnan(v)) return PBS2P_FAIL(PBS2P_ERR_FORMAT, "tokenizer.ggml.scores[%d] is NaN", i);
            t->score[i] = (float)v;
        }
    }
    t->text_off[nv] = o;

    /* gpt2: HF looks tokens up in byte-level spelling; one spelled with characters outside the alphabet is
     * respelled from its UTF-8 bytes (transformers' GGUF byte_level_tokenizer). */
    if (t->type == TOK_BPE) {
        uint64_t ktotal = 0;
        for (int32_t i = 0; i < t->n_vocab; i++) {
            size_t n = t->text_off[i + 1] - t->text_off[i] - 1;
            ktotal += (in_byte_alphabet(t->text + t->text_off[i], n) ? n : 2 * n) + 1;
        }
        t->key = malloc(ktotal);
        t->key_off = malloc((nv + 1) * sizeof *t->key_off);
        if (!t->key || !t->key_off) return PBS2P_FAIL(PBS2P_ERR_NOMEM, "byte-level vocabulary");
        uint32_t ko = 0;
        for (int32_t i = 0; i < t->n_vocab; i++) {
            const char *s = t->text + t->text_off[i];
            size_t n = t->text_off[i + 1] - t->text_off[i] - 1;
            t->key_off[i] = ko;
            if (in_byte_alphabet(s, n)) {
                memcpy(t->key + ko, s, n);
                ko += (uint32_t)n;
            } else {
                for (size_t j = 0; j < n; j++) ko += (uint32_t)pbs2p_utf8_encode(byte_to_cp((uint8_t)s[j]), (uint8_t *)t->key + ko);
            }
            t->key[ko++] = '\0';
        }
        t->key_off[nv] = ko;
    }
    for (size_t i = 0; i <= t->ht_mask; i++) t->ht[i] = -1;
    for (int32_t i = 0; i < t->n_vocab; i++) vocab_insert(t, i);

    /* Specials. */
    if ((st = get_special_id(f, "tokenizer.ggml.bos_token_id", t->n_vocab, &t->bos))) return st;
    if ((st = get_special_id(f, "tokenizer.ggml.eos_token_id", t->n_vocab, &t->eos))) return st;
    if ((st = get_special_id(f, "tokenizer.ggml.unknown_token_id", t->n_vocab, &t->unk))) return st;
    int32_t pad;
    if ((st = get_special_id(f, "tokenizer.ggml.padding_token_id", t->n_vocab, &pad))) return st;
    t->add_bos = t->type == TOK_SPM; /* llama.cpp's and transformers' default for sentencepiece vocabularies */
    t->add_eos = 0;
    t->add_space_prefix = 1;
    if ((st = pbs2p_gguf_get_bool(f, "tokenizer.ggml.add_bos_token", 0, &t->add_bos))) return st;
    if ((st = pbs2p_gguf_get_bool(f, "tokenizer.ggml.add_eos_token", 0, &t->add_eos))) return st;
    if ((st = pbs2p_gguf_get_bool(f, "tokenizer.ggml.add_space_prefix", 0, &t->add_space_prefix))) return st;

    if (mk && (st = load_merges(t, mk))) return st;

    /* Byte tokens. */
    for (int b = 0; b < 256; b++) {
        char s[8];
        size_t n;
        if (t->type == TOK_SPM) n = (size_t)snprintf(s, sizeof s, "<0x%02X>", b);
        else n = (size_t)pbs2p_utf8_encode(byte_to_cp(b), (uint8_t *)s);
        t->byte_tok[b] = vocab_find(t, s, n);
    }

    /* Decoded pieces. */
    uint64_t ptotal = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) ptotal += decode_token(t, i, NULL);
    t->piece = malloc(ptotal ? ptotal : 1);
    if (!t->piece) return PBS2P_FAIL(PBS2P_ERR_NOMEM, "token pieces (%llu bytes)", (unsigned long long)ptotal);
    uint32_t po = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) {
        t->piece_off[i] = po;
        po += (uint32_t)decode_token(t, i, t->piece + po);
    }
    t->piece_off[nv] = po;

    /* Tokens matched whole in the text: control and unknown (when parse_special: transformers registers
     * <unk> as a special token too, llama.cpp matches it) and user-defined (always). Like transformers' GGUF
     * loader, a gpt2 control token spelled outside the byte alphabet is not matched. */
    t->spec = malloc(nv * sizeof *t->spec);
    if (!t->spec) return PBS2P_FAIL(PBS2P_ERR_NOMEM, "special token list");
    for (int32_t i = 0; i < t->n_vocab; i++) {
        size_t n = t->text_off[i + 1] - t->text_off[i] - 1;
        if (n == 0 || (t->ttype[i] != TT_CONTROL && t->ttype[i] != TT_USER && t->ttype[i] != TT_UNKNOWN)) continue;
        if (t->type == TOK_BPE && t->ttype[i] == TT_CONTROL && !in_byte_alphabet(t->text + t->text_off[i], n)) continue;
        t->spec[t->n_spec++] = i;
    }
    sort_spec(t);
    int32_t k = 0;
    for (int b = 0; b <= 256; b++) {
        while (k < t->n_spec && (uint8_t)t->text[t->text_off[t->spec[k]]] < b) k++;
        t->spec_start[b] = k;
    }

    static const char *const eog_names[] = {"<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<|end_of_text|>"};
    if (t->eos >= 0) t->eog[t->n_eog++] = t->eos;
    for (size_t j = 0; j < sizeof eog_names / sizeof eog_names[0]; j++) {
        int32_t id = -1;
        for (int32_t i = 0; i < t->n_vocab; i++) {
            if (t->ttype[i] == TT_CONTROL && strcmp(t->text + t->text_off[i], eog_names[j]) == 0) id = i;
        }
        if (id >= 0 && id != t->eos && t->n_eog < MAX_EOG) t->eog[t->n_eog++] = id;
    }
    return PBS2P_OK;
}

pbs2p_status pbs2p_tokenizer_load(const pbs2p_file *f, pbs2p_tokenizer **out) {
    if (!out) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "out is NULL");
    *out = NULL;
    if (!f) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "file is NULL");
    pbs2p_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return PBS2P_FAIL(PBS2P_ERR_NOMEM, "tokenizer");
    pbs2p_status st = load_inner(f, t);
    if (st != PBS2P_OK) {
        pbs2p_tokenizer_free(t);
        return st;
    }
    *out = t;
    return PBS2P_OK;
}

int32_t pbs2p_tokenizer_n_vocab(const pbs2p_tokenizer *t) { return t ? t->n_vocab : 0; }
int32_t pbs2p_tokenizer_bos(const pbs2p_tokenizer *t) { return t ? t->bos : -1; }
int32_t pbs2p_tokenizer_eos(const pbs2p_tokenizer *t) { return t ? t->eos : -1; }

int32_t pbs2p_tokenizer_is_eog(const pbs2p_tokenizer *t, int32_t id) {
    if (!t || id < 0) return 0;
    for (int32_t i = 0; i < t->n_eog; i++) {
        if (t->eog[i] == id) return 1;
    }
    return 0;
}

pbs2p_status pbs2p_tokenizer_piece(const pbs2p_tokenizer *t, int32_t id, int32_t render_special, char *buf,
                                   int32_t cap, int32_t *n_out) {
    if (n_out) *n_out = 0;
    if (!t || !n_out || cap < 0 || (cap > 0 && !buf)) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "NULL argument or cap %d", cap);
    if (id < 0 || id >= t->n_vocab) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "token %d out of range (n_vocab %d)", id, t->n_vocab);
    int hidden = (t->ttype[id] == TT_CONTROL || t->ttype[id] == TT_UNKNOWN) && !render_special;
    int32_t n = hidden ? 0 : (int32_t)(t->piece_off[id + 1] - t->piece_off[id]);
    *n_out = n;
    if (n > cap) return PBS2P_ERR_BUFFER_TOO_SMALL;
    if (n) memcpy(buf, t->piece + t->piece_off[id], (size_t)n);
    return PBS2P_OK;
}

/* ---- encoding ---- */

typedef struct heap_ent {
    double key;     /* gpt2: merge rank; llama: -score (both exact in a double). Lower pops first, then lower pos. */
    int32_t pos;    /* left symbol */
    int32_t a, b;   /* gpt2: the pair's ids; llama: left symbol index and merged byte length (staleness checks) */
} heap_ent;

typedef struct work {
    /* code points of the fragment */
    uint32_t *cp;
    uint8_t *fl;
    uint32_t *off;     /* byte offset of each code point, n + 1 */
    size_t cap_cp;
    /* symbols of one word */
    int32_t *sid, *prev, *next;
    uint32_t *sstart, *slen;
    size_t cap_sym;
    heap_ent *heap;
    size_t n_heap, cap_heap;
    char *buf;         /* llama: fragment with spaces as U+2581 */
    size_t cap_buf;
    /* output */
    int32_t *out;
    int32_t cap, n;
    int nomem;
} work;

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 1;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) return 0;
    *p = q;
    *cap = c;
    return 1;
}

static void emit(work *w, int32_t id) {
    if (w->n < w->cap) w->out[w->n] = id;
    if (w->n < INT32_MAX) w->n++;
}

static int heap_less(const heap_ent *x, const heap_ent *y) { return x->key < y->key || (x->key == y->key && x->pos < y->pos); }

static int heap_push(work *w, heap_ent e) {
    if (!grow((void **)&w->heap, &w->cap_heap, w->n_heap + 1, sizeof *w->heap)) return 0;
    size_t i = w->n_heap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&e, &w->heap[p])) break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = e;
    return 1;
}

static heap_ent heap_pop(work *w) {
    heap_ent top = w->heap[0], last = w->heap[--w->n_heap];
    size_t i = 0, n = w->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_less(&w->heap[c + 1], &w->heap[c])) c++;
        if (!heap_less(&w->heap[c], &last)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n) w->heap[i] = last;
    return top;
}

static int alloc_syms(work *w, size_t n) {
    size_t c = w->cap_sym;
    if (n <= c) return 1;
    size_t c1 = c, c2 = c, c3 = c, c4 = c, c5 = c;
    int ok = grow((void **)&w->sid, &c1, n, sizeof *w->sid) && grow((void **)&w->prev, &c2, n, sizeof *w->prev) &&
             grow((void **)&w->next, &c3, n, sizeof *w->next) && grow((void **)&w->sstart, &c4, n, sizeof *w->sstart) &&
             grow((void **)&w->slen, &c5, n, sizeof *w->slen);
    if (ok) w->cap_sym = c1;
    return ok;
}

static void bpe_try_pair(const pbs2p_tokenizer *t, work *w, int32_t l) {
    int32_t r = w->next[l];
    if (l < 0 || r < 0) return;
    const merge_ent *m = merge_find(t, w->sid[l], w->sid[r]);
    if (m && !heap_push(w, (heap_ent){(double)m->rank, l, w->sid[l], w->sid[r]})) w->nomem = 1;
}

/* Byte-level BPE of one pre-tokenized word (raw bytes). */
static void bpe_word(const pbs2p_tokenizer *t, work *w, const uint8_t *s, size_t n) {
    if (!alloc_syms(w, n)) { w->nomem = 1; return; }
    int32_t m = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_tok[s[i]];
        /* A byte whose character is not in the vocabulary (SmolLM2 lacks 21, e.g. 0x04, 0xC0, 0xF5..0xFF) is
         * dropped: transformers builds byte-level BPE models without an unk token, and its BPE drops what it
         * cannot map. */
        if (id < 0) continue;
        w->sid[m] = id;
        w->prev[m] = m - 1;
        w->next[m] = m + 1;
        m++;
    }
    if (m == 0) return;
    w->next[m - 1] = -1;
    w->n_heap = 0;
    for (int32_t i = 0; i + 1 < m; i++) bpe_try_pair(t, w, i);
    while (w->n_heap) {
        heap_ent e = heap_pop(w);
        int32_t l = e.pos, r = w->next[l];
        if (w->sid[l] != e.a || r < 0 || w->sid[r] != e.b) continue;
        w->sid[l] = merge_find(t, e.a, e.b)->result;
        w->next[l] = w->next[r];
        if (w->next[r] >= 0) w->prev[w->next[r]] = l;
        w->sid[r] = -1;
        if (w->prev[l] >= 0) bpe_try_pair(t, w, w->prev[l]);
        bpe_try_pair(t, w, l);
    }
    for (int32_t i = 0; i >= 0; i = w->next[i]) emit(w, w->sid[i]);
}

/* ---- pre-tokenizer matchers: each returns the end (code point index) of the match starting at i < end ---- */

#define IS_L(k) (w->fl[k] & PBS2P_UNI_L)
#define IS_N(k) (w->fl[k] & PBS2P_UNI_N)
#define IS_S(k) (w->fl[k] & PBS2P_UNI_S)
#define IS_OTHER(k) (!(w->fl[k] & (PBS2P_UNI_L | PBS2P_UNI_N | PBS2P_UNI_S)))
#define IS_NL(k) (w->cp[k] == '\r' || w->cp[k] == '\n')

/* \s+(?!\S)|\s+ at a whitespace code point: a run followed by a non-space gives its last space to the
 * next match (where " ?\p{L}+" can take it). */
static size_t match_spaces(const work *w, size_t i, size_t end) {
    size_t k = i;
    while (k < end && IS_S(k)) k++;
    return (k == end || k - i == 1) ? k : k - 1;
}

/* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t match_gpt2(const work *w, size_t i, size_t end) {
    const uint32_t *cp = w->cp;
    if (cp[i] == '\'' && i + 1 < end) {
        uint32_t d = cp[i + 1];
        if (d == 's' || d == 't' || d == 'm' || d == 'd') return i + 2;
        if (i + 2 < end && ((d == 'r' && cp[i + 2] == 'e') || (d == 'v' && cp[i + 2] == 'e') || (d == 'l' && cp[i + 2] == 'l')))
            return i + 3;
    }
    size_t j = (cp[i] == ' ' && i + 1 < end) ? i + 1 : i;
    if (IS_L(j)) { while (j < end && IS_L(j)) j++; return j; }
    if (IS_N(j)) { while (j < end && IS_N(j)) j++; return j; }
    if (IS_OTHER(j)) { while (j < end && IS_OTHER(j)) j++; return j; }
    return match_spaces(w, i, end);
}

/* Simple case folding as Oniguruma's (?i) applies it to the contraction letters: ASCII, and U+017F LATIN SMALL
 * LETTER LONG S, which folds to 's' ("'\u017fa" splits as "'\u017f", "a"). */
static uint32_t fold_lower(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c == 0x17f ? 's' : c; }

/* (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_n}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 * (qwen2: max_n 1; llama3: max_n 3) */
static size_t match_qwen2(const work *w, size_t i, size_t end, size_t max_n) {
    const uint32_t *cp = w->cp;
    if (cp[i] == '\'' && i + 1 < end) {
        uint32_t d = fold_lower(cp[i + 1]);
        if (d == 's' || d == 't' || d == 'm' || d == 'd') return i + 2;
        if (i + 2 < end) {
            uint32_t e = fold_lower(cp[i + 2]);
            if ((d == 'r' && e == 'e') || (d == 'v' && e == 'e') || (d == 'l' && e == 'l')) return i + 3;
        }
    }
    size_t j = i;
    if (!IS_L(i) && !IS_N(i) && !IS_NL(i) && i + 1 < end && IS_L(i + 1)) j = i + 1;
    if (IS_L(j)) { while (j < end && IS_L(j)) j++; return j; }
    if (IS_N(i)) { j = i; while (j < end && j - i < max_n && IS_N(j)) j++; return j; }
    j = (cp[i] == ' ' && i + 1 < end && IS_OTHER(i + 1)) ? i + 1 : i;
    if (IS_OTHER(j)) {
        while (j < end && IS_OTHER(j)) j++;
        while (j < end && IS_NL(j)) j++;
        return j;
    }
    /* \s*[\r\n]+: the greedy \s* backs off to the last newline of the run */
    size_t k = i, last_nl = SIZE_MAX;
    while (k < end && IS_S(k)) {
        if (IS_NL(k)) last_nl = k;
        k++;
    }
    if (last_nl != SIZE_MAX) return last_nl + 1;
    return match_spaces(w, i, end);
}

static void pretok_words(const pbs2p_tokenizer *t, work *w, const uint8_t *s, size_t n_cp) {
    size_t seg = 0; /* smollm: end of the current digit-free piece */
    for (size_t i = 0; i < n_cp && !w->nomem;) {
        size_t e;
        if (t->pre == PRE_SMOLLM) {
            /* Digits(individual_digits=True) first: every \p{N} is a piece of its own, and the GPT-2 regex then
             * runs inside the pieces between digits (its lookahead ends at a digit). */
            if (IS_N(i)) {
                e = i + 1;
            } else {
                if (seg <= i) {
                    seg = i;
                    while (seg < n_cp && !IS_N(seg)) seg++;
                }
                e = match_gpt2(w, i, seg);
            }
        } else if (t->pre == PRE_QWEN2) {
            e = match_qwen2(w, i, n_cp, 1);
        } else if (t->pre == PRE_LLAMA3) {
            e = match_qwen2(w, i, n_cp, 3);
        } else {
            e = match_gpt2(w, i, n_cp);
        }
        bpe_word(t, w, s + w->off[i], w->off[e] - w->off[i]);
        i = e;
    }
}

static int decode_fragment(work *w, const uint8_t *s, size_t n, size_t *n_cp) {
    size_t c1 = w->cap_cp, c2 = c1, c3 = c1;
    if (!grow((void **)&w->cp, &c1, n + 1, sizeof *w->cp) || !grow((void **)&w->fl, &c2, n + 1, 1) ||
        !grow((void **)&w->off, &c3, n + 1, sizeof *w->off))
        return 0;
    w->cap_cp = c1;
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        size_t len;
        w->cp[k] = pbs2p_utf8_decode(s + i, n - i, &len);
        w->fl[k] = (uint8_t)pbs2p_unicode_flags(w->cp[k]);
        w->off[k] = (uint32_t)i;
        k++;
        i += len;
    }
    w->off[k] = (uint32_t)n;
    *n_cp = k;
    return 1;
}

static void spm_try_pair(const pbs2p_tokenizer *t, work *w, int32_t l) {
    if (l < 0) return;
    int32_t r = w->next[l];
    if (r < 0) return;
    uint32_t len = w->slen[l] + w->slen[r];
    int32_t id = vocab_find(t, w->buf + w->sstart[l], len);
    if (id >= 0 && !heap_push(w, (heap_ent){-(double)t->score[id], l, l, (int32_t)len})) w->nomem = 1;
}

/* SentencePiece BPE over a whole fragment (HF Metaspace with split=False makes it one word). */
static void spm_fragment(const pbs2p_tokenizer *t, work *w, const uint8_t *s, size_t n, int at_start) {
    /* Metaspace: ' ' -> U+2581; prepend_scheme "first" prepends one to the fragment at offset 0 unless it
     * already starts with U+2581 (a leading space). */
    int prefix = t->add_space_prefix && at_start && n > 0 && s[0] != ' ' &&
                 !(n >= 3 && memcmp(s, "\xe2\x96\x81", 3) == 0);
    size_t n_sp = 0;
    for (size_t i = 0; i < n; i++) n_sp += s[i] == ' ';
    size_t nb = n + 2 * n_sp + (prefix ? 3 : 0);
    if (!grow((void **)&w->buf, &w->cap_buf, nb + 1, 1) || !alloc_syms(w, nb + 1)) { w->nomem = 1; return; }
    size_t o = 0;
    if (prefix) { memcpy(w->buf, "\xe2\x96\x81", 3); o = 3; }
    for (size_t i = 0; i < n; i++) {
        if (s[i] == ' ') { memcpy(w->buf + o, "\xe2\x96\x81", 3); o += 3; }
        else w->buf[o++] = (char)s[i];
    }
    int32_t m = 0;
    for (size_t i = 0; i < nb;) {
        size_t len;
        pbs2p_utf8_decode((const uint8_t *)w->buf + i, nb - i, &len);
        w->sstart[m] = (uint32_t)i;
        w->slen[m] = (uint32_t)len;
        w->prev[m] = m - 1;
        w->next[m] = m + 1;
        m++;
        i += len;
    }
    if (m == 0) return;
    w->next[m - 1] = -1;
    w->n_heap = 0;
    for (int32_t i = 0; i + 1 < m; i++) spm_try_pair(t, w, i);
    while (w->n_heap && !w->nomem) {
        heap_ent e = heap_pop(w);
        int32_t l = e.pos, r = w->next[l];
        if (w->slen[l] == 0 || r < 0 || w->slen[l] + w->slen[r] != (uint32_t)e.b) continue;
        w->slen[l] += w->slen[r];
        w->slen[r] = 0;
        w->next[l] = w->next[r];
        if (w->next[r] >= 0) w->prev[w->next[r]] = l;
        spm_try_pair(t, w, w->prev[l]);
        spm_try_pair(t, w, l);
    }
    int last_unk = 0; /* HF's fuse_unk: consecutive unknowns become one unk */
    for (int32_t i = 0; i >= 0; i = w->next[i]) {
        const char *p = w->buf + w->sstart[i];
        int32_t id = vocab_find(t, p, w->slen[i]);
        if (id >= 0) { emit(w, id); last_unk = 0; continue; }
        int all = 1;
        for (uint32_t k = 0; k < w->slen[i]; k++) all &= t->byte_tok[(uint8_t)p[k]] >= 0;
        if (all) {
            for (uint32_t k = 0; k < w->slen[i]; k++) emit(w, t->byte_tok[(uint8_t)p[k]]);
            last_unk = 0;
        } else if (t->unk >= 0 && !last_unk) {
            emit(w, t->unk);
            last_unk = 1;
        }
    }
}

static void encode_fragment(const pbs2p_tokenizer *t, work *w, const uint8_t *s, size_t n, int at_start) {
    if (n == 0) return;
    if (t->type == TOK_SPM) {
        spm_fragment(t, w, s, n, at_start);
        return;
    }
    size_t n_cp;
    if (!decode_fragment(w, s, n, &n_cp)) { w->nomem = 1; return; }
    pretok_words(t, w, s, n_cp);
}

/* Longest special token starting at s[0..n), -1 if none. */
static int32_t match_special(const pbs2p_tokenizer *t, const uint8_t *s, size_t n, int parse_special) {
    for (int32_t k = t->spec_start[s[0]]; k < t->spec_start[s[0] + 1]; k++) {
        int32_t id = t->spec[k];
        if (t->ttype[id] != TT_USER && !parse_special) continue;
        size_t len = t->text_off[id + 1] - t->text_off[id] - 1;
        if (len <= n && memcmp(s, t->text + t->text_off[id], len) == 0) return id;
    }
    return -1;
}

pbs2p_status pbs2p_tokenizer_encode(const pbs2p_tokenizer *t, const char *text, size_t len, int32_t add_special,
                                    int32_t parse_special, int32_t *out, int32_t cap, int32_t *n_out) {
    if (n_out) *n_out = 0;
    if (!t || !n_out || (len > 0 && !text) || cap < 0 || (cap > 0 && !out))
        return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "NULL argument or cap %d", cap);
    if (len > UINT32_MAX / 4) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "text of %zu bytes", len);
    work w = {0};
    w.out = out;
    w.cap = cap;
    if (add_special && t->add_bos && t->bos >= 0) emit(&w, t->bos);
    const uint8_t *s = (const uint8_t *)text;
    size_t frag = 0;
    for (size_t i = 0; i < len && !w.nomem;) {
        int32_t id = t->n_spec ? match_special(t, s + i, len - i, parse_special) : -1;
        if (id < 0) { i++; continue; }
        encode_fragment(t, &w, s + frag, i - frag, frag == 0);
        emit(&w, id);
        i += t->text_off[id + 1] - t->text_off[id] - 1;
        frag = i;
    }
    if (!w.nomem) encode_fragment(t, &w, s + frag, len - frag, frag == 0);
    if (add_special && t->add_eos && t->eos >= 0) emit(&w, t->eos);
    free(w.cp);
    free(w.fl);
    free(w.off);
    free(w.sid);
    free(w.prev);
    free(w.next);
    free(w.sstart);
    free(w.slen);
    free(w.heap);
    free(w.buf);
    if (w.nomem) return PBS2P_FAIL(PBS2P_ERR_NOMEM, "tokenizing %zu bytes", len);
    *n_out = w.n;
    if (w.n > cap) return PBS2P_ERR_BUFFER_TOO_SMALL;
    return PBS2P_OK;
}
