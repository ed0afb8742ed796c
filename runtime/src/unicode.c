/* UTF-8 and code point classes; the class table is generated (unicode-data.h, tools/gen_unicode_data.py). */
#include "unicode.h"
#include "unicode-data.h"

uint32_t pbs2p_utf8_decode(const uint8_t *s, size_t n, size_t *len) {
    uint32_t c = s[0];
    *len = 1;
    if (c < 0x80) return c;
    size_t need;
    uint32_t min;
    if ((c & 0xe0) == 0xc0) { need = 1; min = 0x80; c &= 0x1f; }
    else if ((c & 0xf0) == 0xe0) { need = 2; min = 0x800; c &= 0x0f; }
    else if ((c & 0xf8) == 0xf0) { need = 3; min = 0x10000; c &= 0x07; }
    else return PBS2P_UNI_INVALID_BASE + s[0];
    if (need >= n) return PBS2P_UNI_INVALID_BASE + s[0];
    for (size_t i = 1; i <= need; i++) {
        if ((s[i] & 0xc0) != 0x80) return PBS2P_UNI_INVALID_BASE + s[0];
        c = (c << 6) | (s[i] & 0x3fu);
    }
    if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) return PBS2P_UNI_INVALID_BASE + s[0];
    *len = need + 1;
    return c;
}

int pbs2p_utf8_encode(uint32_t cp, uint8_t out[4]) {
    if (cp < 0x80) { out[0] = (uint8_t)cp; return 1; }
    if (cp < 0x800) { out[0] = (uint8_t)(0xc0 | (cp >> 6)); out[1] = (uint8_t)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) {
        out[0] = (uint8_t)(0xe0 | (cp >> 12));
        out[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (uint8_t)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (uint8_t)(0xf0 | (cp >> 18));
    out[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (uint8_t)(0x80 | (cp & 0x3f));
    return 4;
}

int pbs2p_unicode_flags(uint32_t cp) {
    if (cp < 256) return pbs2p_ucd_latin1[cp];
    size_t lo = 0, hi = sizeof pbs2p_ucd_ranges / sizeof pbs2p_ucd_ranges[0];
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < pbs2p_ucd_ranges[mid][0]) hi = mid;
        else if (cp > pbs2p_ucd_ranges[mid][1]) lo = mid + 1;
        else return (int)pbs2p_ucd_ranges[mid][2];
    }
    return 0;
}
