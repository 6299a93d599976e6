/*
 * The user table of c-auth: parsing and password checks. Pure C with no WIT types, so the
 * native unit tests (test/test_users.c) run it under the sanitizers.
 *
 * The table is text, one user a line:
 *
 *     NAME:sha256$SALT$HASH
 *
 * NAME is the MQTT user name (everything before the last ':'), SALT is any text without
 * '$', ':' or white space, and HASH is the 64 hex digits of SHA-256(SALT || password),
 * where SALT counts as its bytes. Blank lines and lines starting with '#' are skipped.
 */
#ifndef C_AUTH_USERS_H
#define C_AUTH_USERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sha256.h"

struct user {
    /* Points into `users.text`; not NUL-terminated. */
    const uint8_t *name;
    size_t name_len;
    const uint8_t *salt;
    size_t salt_len;
    uint8_t hash[SHA256_DIGEST_LEN];
    /* False when the line's credential is malformed: that user is always refused. */
    bool usable;
};

struct users {
    /* Owned copy of the table text. */
    uint8_t *text;
    struct user *items;
    size_t len;
};

enum users_verdict {
    USERS_UNKNOWN,
    USERS_BAD_PASSWORD,
    USERS_OK,
};

/* Called once per line that is not used as written: its number (from 1) and why. */
typedef void users_warn_fn(void *ctx, size_t line, const char *why);

/*
 * Parses `len` bytes of `text` into `out` (which owns a copy afterwards). Malformed lines
 * are reported through `warn` (may be NULL): a line without a name is skipped, a name
 * with a malformed credential is kept as unusable, and a repeated name keeps its first
 * line. Returns false only when memory runs out (`out` is then empty).
 */
bool users_parse(struct users *out, const uint8_t *text, size_t len, users_warn_fn *warn,
                 void *ctx);

/*
 * Checks a user name and password (any bytes, any length; `password` may be NULL when
 * `password_len` is 0). Costs one SHA-256 of the password whether or not the user exists,
 * and compares digests in constant time.
 */
enum users_verdict users_check(const struct users *u, const uint8_t *name, size_t name_len,
                               const uint8_t *password, size_t password_len);

void users_free(struct users *u);

#endif
