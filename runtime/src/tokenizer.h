/* Internal: tokenizers built from a file's tokenizer.* metadata (docs/format.md):
 * byte-level BPE ("gpt2": SmolLM2, Llama 3, Qwen2, OPT, with each model's pre-tokenizer split rules) and
 * SentencePiece BPE with byte fallback ("llama": Llama 2, TinyLlama, Mistral). Exactly HF's ids. */
#ifndef PBS2P_TOKENIZER_H
#define PBS2P_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>
#include "pbs2p.h"

typedef struct pbs2p_tokenizer pbs2p_tokenizer;

/* Validates every id and string (merges naming unknown tokens, special ids out of range, empty vocab...). */
pbs2p_status pbs2p_tokenizer_load(const pbs2p_file *f, pbs2p_tokenizer **out);
void pbs2p_tokenizer_free(pbs2p_tokenizer *tok);
int32_t pbs2p_tokenizer_n_vocab(const pbs2p_tokenizer *tok);
int32_t pbs2p_tokenizer_bos(const pbs2p_tokenizer *tok);    /* -1 if none */
int32_t pbs2p_tokenizer_eos(const pbs2p_tokenizer *tok);    /* -1 if none */
int32_t pbs2p_tokenizer_is_eog(const pbs2p_tokenizer *tok, int32_t id);
/* Same contracts as pbs2p_tokenize / pbs2p_token_to_piece in pbs2p.h. */
pbs2p_status pbs2p_tokenizer_encode(const pbs2p_tokenizer *tok, const char *text, size_t len, int32_t add_special,
                                    int32_t parse_special, int32_t *out, int32_t cap, int32_t *n_out);
pbs2p_status pbs2p_tokenizer_piece(const pbs2p_tokenizer *tok, int32_t id, int32_t render_special, char *buf,
                                   int32_t cap, int32_t *n_out);

#endif
