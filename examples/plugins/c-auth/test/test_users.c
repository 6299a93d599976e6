/*
 * Native unit tests of sha256.c and users.c, built by ../build with -fsanitize=address,
 * undefined: FIPS 180-4 / NIST example digests, split updates, and the table parser and
 * password check on well-formed, malformed and hostile input.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sha256.h"
#include "users.h"

static int failures;

#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);           \
            failures++;                                                                        \
        }                                                                                      \
    } while (0)

static void hex(const uint8_t *d, char out[2 * SHA256_DIGEST_LEN + 1]) {
    for (size_t i = 0; i < SHA256_DIGEST_LEN; i++) {
        snprintf(out + 2 * i, 3, "%02x", d[i]);
    }
}

/* Hashes `len` bytes of `data` fed in pieces of `step` bytes. */
static void digest_hex(const uint8_t *data, size_t len, size_t step,
                       char out[2 * SHA256_DIGEST_LEN + 1]) {
    struct sha256 h;
    uint8_t d[SHA256_DIGEST_LEN];
    sha256_init(&h);
    for (size_t at = 0; at < len; at += step) {
        sha256_update(&h, data + at, len - at < step ? len - at : step);
    }
    sha256_final(&h, d);
    hex(d, out);
}

static void test_sha256(void) {
    static const struct {
        const char *text;
        const char *digest;
    } cases[] = {
        {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
        {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
    };
    char out[2 * SHA256_DIGEST_LEN + 1];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t len = strlen(cases[i].text);
        for (size_t step = 1; step <= 65; step += 7) {
            digest_hex((const uint8_t *)cases[i].text, len, step, out);
            CHECK(strcmp(out, cases[i].digest) == 0);
        }
    }
    /* One million 'a': many blocks, in uneven pieces. */
    size_t n = 1000000;
    uint8_t *a = malloc(n);
    CHECK(a != NULL);
    if (a != NULL) {
        memset(a, 'a', n);
        digest_hex(a, n, 4093, out);
        CHECK(strcmp(out, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0") ==
              0);
        free(a);
    }
    /* Lengths around the padding boundary (55, 56, 63, 64 bytes) must not overrun. */
    uint8_t z[130] = {0};
    for (size_t len = 50; len <= sizeof z; len++) {
        digest_hex(z, len, len == 0 ? 1 : len, out);
        CHECK(strlen(out) == 64);
    }
}

static size_t warnings;
static void count_warning(void *ctx, size_t line, const char *why) {
    (void)ctx;
    (void)line;
    (void)why;
    warnings++;
}

static enum users_verdict check(const struct users *u, const char *name, const char *pw,
                                size_t pw_len) {
    return users_check(u, (const uint8_t *)name, strlen(name), (const uint8_t *)pw, pw_len);
}

static void test_users(void) {
    const char *table =
        "# the test users\n"
        "\n"
        "  alice:sha256$4c1f0e5a$6663d775bc91886d9aa9e8ab3c1f766e87f4400a28a4241f9e61baef30c48bbc  \r\n"
        "dev:1:sha256$salt$34847309CB2F0C3DA0872F5F8FBED13D6CDDA6485F87C0D71DAB23A188FEA673\n"
        "carol:sha256$AbC.9$0ee1cf3ae079cffcbf533c8d91c2b6d615da9d5710670fcc01bf37083deaff32\n"
        "nobody-line-without-colon\n"
        ":sha256$salt$585be4492554969bc5ff86e2657b70e8b6e5a56aa11275fb27462ca71063f5d2\n"
        "bob:sha256$salt$tooshort\n"
        "eve:md5$salt$585be4492554969bc5ff86e2657b70e8b6e5a56aa11275fb27462ca71063f5d2\n"
        "frank:sha256$$585be4492554969bc5ff86e2657b70e8b6e5a56aa11275fb27462ca71063f5d2\n"
        "gina:sha256$s$585be4492554969bc5ff86e2657b70e8b6e5a56aa11275fb27462ca71063f5dz\n"
        "alice:sha256$salt$63479ad69a090b258277ec8fba6f99419a2ffb248981510657c944ccd1148e97\n"
        "henry:sha256$salt$63479ad69a090b258277ec8fba6f99419a2ffb248981510657c944ccd1148e97";
    struct users u;
    warnings = 0;
    CHECK(users_parse(&u, (const uint8_t *)table, strlen(table), count_warning, NULL));
    /* alice, dev:1, carol, bob, eve, frank, gina, henry (no trailing newline). */
    CHECK(u.len == 8);
    /* No colon, no name, bob, eve, frank, gina, alice again. */
    CHECK(warnings == 7);

    CHECK(check(&u, "alice", "s3cret", 6) == USERS_OK);
    CHECK(check(&u, "alice", "s3cret!", 7) == USERS_BAD_PASSWORD);
    CHECK(check(&u, "alice", "s3cre", 5) == USERS_BAD_PASSWORD);
    CHECK(check(&u, "alice", "", 0) == USERS_BAD_PASSWORD);
    CHECK(users_check(&u, (const uint8_t *)"alice", 5, NULL, 0) == USERS_BAD_PASSWORD);
    CHECK(check(&u, "Alice", "s3cret", 6) == USERS_UNKNOWN);
    CHECK(check(&u, "alic", "s3cret", 6) == USERS_UNKNOWN);
    CHECK(check(&u, "", "s3cret", 6) == USERS_UNKNOWN);
    /* A name with ':' (split at the last one), upper-case hex, a password with a NUL. */
    CHECK(check(&u, "dev:1", "p\0w", 3) == USERS_OK);
    CHECK(check(&u, "dev:1", "p", 1) == USERS_BAD_PASSWORD);
    CHECK(check(&u, "carol", "caf\xc3\xa9", 5) == USERS_OK);
    /* Listed with a malformed credential: refused whatever the password. */
    CHECK(check(&u, "bob", "", 0) == USERS_BAD_PASSWORD);
    CHECK(check(&u, "eve", "p\0w", 3) == USERS_BAD_PASSWORD);
    CHECK(check(&u, "frank", "p\0w", 3) == USERS_BAD_PASSWORD);
    CHECK(check(&u, "gina", "p\0w", 3) == USERS_BAD_PASSWORD);
    CHECK(check(&u, "henry", "", 0) == USERS_OK);
    /* A long password is hashed like any other. */
    size_t big = 65535;
    char *pw = malloc(big);
    CHECK(pw != NULL);
    if (pw != NULL) {
        memset(pw, 'x', big);
        CHECK(check(&u, "alice", pw, big) == USERS_BAD_PASSWORD);
        free(pw);
    }
    /* A name that is a prefix of a line, or longer than any. */
    CHECK(check(&u, "alice:sha256", "s3cret", 6) == USERS_UNKNOWN);
    users_free(&u);

    /* Empty and comment-only tables. */
    CHECK(users_parse(&u, NULL, 0, NULL, NULL));
    CHECK(u.len == 0);
    CHECK(check(&u, "alice", "s3cret", 6) == USERS_UNKNOWN);
    users_free(&u);
    const char *comments = "# nothing\n\n   \n#:sha256$a$b\n";
    CHECK(users_parse(&u, (const uint8_t *)comments, strlen(comments), NULL, NULL));
    CHECK(u.len == 0);
    users_free(&u);

    /* Every byte value, every prefix: parsing never reads outside the text. */
    uint8_t junk[300];
    for (size_t i = 0; i < sizeof junk; i++) {
        junk[i] = (uint8_t)(i * 37 + 11);
    }
    for (size_t len = 0; len <= sizeof junk; len++) {
        uint8_t *copy = malloc(len == 0 ? 1 : len);
        CHECK(copy != NULL);
        if (copy == NULL) {
            break;
        }
        memcpy(copy, junk, len);
        CHECK(users_parse(&u, copy, len, NULL, NULL));
        free(copy);
        (void)users_check(&u, junk, len % 17, junk, len);
        users_free(&u);
    }
}

int main(void) {
    test_sha256();
    test_users();
    if (failures != 0) {
        fprintf(stderr, "c-auth unit tests: %d failed\n", failures);
        return 1;
    }
    printf("c-auth unit tests: ok\n");
    return 0;
}
