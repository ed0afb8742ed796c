/* Internal: UTF-8 decoding and the code point classes of the pre-tokenizer regexes (\p{L}, \p{N}, \s). */
#ifndef PBS2P_UNICODE_H
#define PBS2P_UNICODE_H

#include <stddef.h>
#include <stdint.h>

enum { PBS2P_UNI_L = 1, PBS2P_UNI_N = 2, PBS2P_UNI_S = 4 };

/* Code points of invalid UTF-8 bytes: 0x110000 + byte (outside Unicode, so no class matches them). */
#define PBS2P_UNI_INVALID_BASE 0x110000u

/* Decodes one code point from s[0..n) (n >= 1) and stores its byte length in *len. A byte that does not
 * start a well-formed sequence (stray continuation, overlong, surrogate, > U+10FFFF, truncated) decodes as
 * PBS2P_UNI_INVALID_BASE + byte with *len = 1, so every input byte is covered exactly once. */
uint32_t pbs2p_utf8_decode(const uint8_t *s, size_t n, size_t *len);
/* Encodes cp (< 0x110000) into out; returns the byte count (1..4). */
int pbs2p_utf8_encode(uint32_t cp, uint8_t out[4]);
/* PBS2P_UNI_* flags of cp (0 for invalid bytes and everything else). */
int pbs2p_unicode_flags(uint32_t cp);

#endif
