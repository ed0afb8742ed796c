/* The C tests' one check macro: counts passes and failures, prints a failure with its place, condition and a
 * printf-style message to stderr. Each test ends with printf("N passed, M failed") and exits non-zero on a
 * failure (the plain closing line CI reads). */
#ifndef PBS2P_TEST_UTIL_H
#define PBS2P_TEST_UTIL_H

#include <stdio.h>

static int n_pass, n_fail;

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        if (cond) {                                                         \
            n_pass++;                                                       \
        } else {                                                            \
            n_fail++;                                                       \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                   \
            fprintf(stderr, "\n");                                          \
        }                                                                   \
    } while (0)

#endif
