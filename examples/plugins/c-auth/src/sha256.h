/* SHA-256 (FIPS 180-4), incremental. Small and portable: no allocation, no global state. */
#ifndef C_AUTH_SHA256_H
#define C_AUTH_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define SHA256_DIGEST_LEN 32

struct sha256 {
    uint32_t state[8];
    uint64_t total; /* bytes hashed so far */
    uint8_t block[64];
    size_t used; /* bytes waiting in `block` */
};

void sha256_init(struct sha256 *h);
void sha256_update(struct sha256 *h, const uint8_t *data, size_t len);
void sha256_final(struct sha256 *h, uint8_t out[SHA256_DIGEST_LEN]);

#endif
