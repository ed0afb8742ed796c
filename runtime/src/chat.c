/* Chat templates: no Jinja interpreter — the model's tokenizer.chat_template is recognised by its markers and
 * rendered by hand, producing exactly the text of HF's apply_chat_template(tokenize=False) for:
 *   ChatML  (<|im_start|>: SmolLM2, Qwen2) — including a default system prompt written literally in the
 *           template ("<|im_start|>system\nYou are ...<|im_end|>"), emitted when the first message is not system
 *   Llama-3 (<|start_header_id|>) — <|begin_of_text|> from {{ bos_token }}, contents trimmed; Llama 3.1's
 *           "Cutting Knowledge Date" system header with its default date
 *   Llama-2 ([INST]) — <<SYS>> folded into the first user turn */
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "model.h"

pbs2p_chat_kind pbs2p_chat_detect(const char *tmpl) {
    if (!tmpl) return PBS2P_CHAT_NONE;
    if (strstr(tmpl, "<|im_start|>")) return PBS2P_CHAT_CHATML;
    if (strstr(tmpl, "<|start_header_id|>")) return PBS2P_CHAT_LLAMA3;
    if (strstr(tmpl, "[INST]")) return PBS2P_CHAT_LLAMA2;
    return PBS2P_CHAT_NONE;
}

/* Growing output: counts every byte, stores those that fit. */
typedef struct out_buf {
    char *buf;
    int64_t cap, n;
} out_buf;

static void put(out_buf *o, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++, o->n++)
        if (o->n < o->cap) o->buf[o->n] = s[i];
}
static void puts_(out_buf *o, const char *s) { put(o, s, strlen(s)); }

/* Jinja's `| trim` / Python's str.strip(): ASCII whitespace at both ends. */
static void put_trim(out_buf *o, const char *s) {
    size_t a = 0, b = strlen(s);
    while (a < b && strchr(" \t\n\r\f\v", s[a])) a++;
    while (b > a && strchr(" \t\n\r\f\v", s[b - 1])) b--;
    put(o, s + a, b - a);
}

/* A literal default system prompt of a ChatML template: the text after "<|im_start|>system\n" (real newline or
 * the two characters \n of a Jinja string escape) up to "<|im_end|>", when it holds no quote or Jinja syntax. */
static int chatml_default_system(const char *tmpl, const char **start, size_t *len) {
    const char *marker = "<|im_start|>system";
    for (const char *p = strstr(tmpl, marker); p; p = strstr(p + 1, marker)) {
        const char *s = p + strlen(marker);
        if (s[0] == '\n') s += 1;
        else if (s[0] == '\\' && s[1] == 'n') s += 2;
        else continue;
        const char *e = strstr(s, "<|im_end|>");
        if (!e || e == s) continue;
        size_t n = (size_t)(e - s);
        int literal = 1;
        for (size_t i = 0; i < n && literal; i++) literal = !strchr("'\"{}\\", s[i]);
        if (literal) {
            *start = s;
            *len = n;
            return 1;
        }
    }
    return 0;
}

static pbs2p_status special_text(const pbs2p_model *m, int32_t id, char *buf, int32_t cap) {
    int32_t n = 0;
    buf[0] = '\0';
    if (id < 0) return PBS2P_OK;
    pbs2p_status st = pbs2p_token_to_piece(m, id, 1, buf, cap - 1, &n);
    if (st) return st;
    buf[n] = '\0';
    return PBS2P_OK;
}

pbs2p_status pbs2p_chat_apply(const pbs2p_model *m, const pbs2p_chat_msg *msgs, int32_t n_msgs,
                              int32_t add_assistant, char *buf, int32_t cap, int32_t *n_out) {
    if (!m || !n_out || (!msgs && n_msgs > 0) || n_msgs < 0 || (!buf && cap > 0) || cap < 0)
        return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "NULL model/msgs/buf/n_out or negative count (%d) / cap (%d)",
                          n_msgs, cap);
    for (int32_t i = 0; i < n_msgs; i++)
        if (!msgs[i].role || !msgs[i].content)
            return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "message %d has a NULL role or content", i);
    const char *tmpl = m->chat_template;
    const pbs2p_chat_kind kind = pbs2p_chat_detect(tmpl);
    if (kind == PBS2P_CHAT_NONE)
        return PBS2P_FAIL(PBS2P_ERR_UNSUPPORTED, "%s (known: ChatML, Llama-2, Llama-3)",
                          tmpl ? "unrecognised chat template" : "the model has no tokenizer.chat_template");
    out_buf o = {buf, cap, 0};
    char bos[64], eos[64];
    pbs2p_status st;
    if ((st = special_text(m, pbs2p_token_bos(m), bos, sizeof bos))) return st;
    if ((st = special_text(m, pbs2p_token_eos(m), eos, sizeof eos))) return st;
    const int has_system = n_msgs > 0 && !strcmp(msgs[0].role, "system");

    if (kind == PBS2P_CHAT_CHATML) {
        const char *ds;
        size_t dn;
        if (!has_system && n_msgs > 0 && chatml_default_system(tmpl, &ds, &dn)) {
            puts_(&o, "<|im_start|>system\n");
            put(&o, ds, dn);
            puts_(&o, "<|im_end|>\n");
        }
        for (int32_t i = 0; i < n_msgs; i++) {
            puts_(&o, "<|im_start|>");
            puts_(&o, msgs[i].role);
            puts_(&o, "\n");
            puts_(&o, msgs[i].content);
            puts_(&o, "<|im_end|>\n");
        }
        if (add_assistant) puts_(&o, "<|im_start|>assistant\n");
    } else if (kind == PBS2P_CHAT_LLAMA3) {
        if (strstr(tmpl, "bos_token")) puts_(&o, bos);
        int32_t i0 = 0;
        if (strstr(tmpl, "Cutting Knowledge Date")) {
            puts_(&o, "<|start_header_id|>system<|end_header_id|>\n\n");
            puts_(&o, "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n");
            if (has_system) put_trim(&o, msgs[0].content);
            puts_(&o, "<|eot_id|>");
            i0 = has_system;
        }
        for (int32_t i = i0; i < n_msgs; i++) {
            puts_(&o, "<|start_header_id|>");
            puts_(&o, msgs[i].role);
            puts_(&o, "<|end_header_id|>\n\n");
            put_trim(&o, msgs[i].content);
            puts_(&o, "<|eot_id|>");
        }
        if (add_assistant) puts_(&o, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    } else {
        for (int32_t i = has_system; i < n_msgs; i++) {
            if (!strcmp(msgs[i].role, "user")) {
                puts_(&o, bos);
                puts_(&o, "[INST] ");
                if (i == 1 && has_system) {
                    /* '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content, then .strip() on the whole */
                    puts_(&o, "<<SYS>>\n");
                    puts_(&o, msgs[0].content);
                    puts_(&o, "\n<</SYS>>\n\n");
                    const char *c = msgs[i].content;
                    size_t b = strlen(c);
                    while (b > 0 && strchr(" \t\n\r\f\v", c[b - 1])) b--;
                    put(&o, c, b);
                } else {
                    put_trim(&o, msgs[i].content);
                }
                puts_(&o, " [/INST]");
            } else if (!strcmp(msgs[i].role, "assistant")) {
                puts_(&o, " ");
                put_trim(&o, msgs[i].content);
                puts_(&o, " ");
                puts_(&o, eos);
            } else {
                return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG,
                                  "Llama-2 template: message %d has role '%s' (system only first; user, assistant)",
                                  i, msgs[i].role);
            }
        }
    }
    if (o.n > INT32_MAX - 1) return PBS2P_FAIL(PBS2P_ERR_INVALID_ARG, "rendered chat is too long (%lld bytes)", (long long)o.n);
    *n_out = (int32_t)o.n;
    if (o.n < cap) buf[o.n] = '\0';
    if (o.n > cap)
        return PBS2P_FAIL(PBS2P_ERR_BUFFER_TOO_SMALL, "chat needs %lld bytes, buffer holds %d", (long long)o.n, cap);
    return PBS2P_OK;
}
