/* Parsing the user table and checking passwords (see users.h for the format). */
#include "users.h"

#include <stdlib.h>
#include <string.h>

static const char SCHEME[] = "sha256$";
#define SCHEME_LEN (sizeof SCHEME - 1)

static bool is_space(uint8_t c) { return c == ' ' || c == '\t' || c == '\r'; }

/* The value of one hex digit, or -1. */
static int hex_value(uint8_t c) {
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

/* Parses `sha256$SALT$HASH` (exactly `len` bytes) into `u`; false if malformed. */
static bool parse_credential(struct user *u, const uint8_t *s, size_t len) {
    if (len < SCHEME_LEN || memcmp(s, SCHEME, SCHEME_LEN) != 0) {
        return false;
    }
    s += SCHEME_LEN;
    len -= SCHEME_LEN;
    const uint8_t *dollar = memchr(s, '$', len);
    if (dollar == NULL || dollar == s) {
        return false;
    }
    size_t salt_len = (size_t)(dollar - s);
    for (size_t i = 0; i < salt_len; i++) {
        if (s[i] == ':' || is_space(s[i])) {
            return false;
        }
    }
    const uint8_t *hex = dollar + 1;
    size_t hex_len = len - salt_len - 1;
    if (hex_len != 2 * SHA256_DIGEST_LEN) {
        return false;
    }
    for (size_t i = 0; i < SHA256_DIGEST_LEN; i++) {
        int hi = hex_value(hex[2 * i]);
        int lo = hex_value(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            return false;
        }
        u->hash[i] = (uint8_t)(hi << 4 | lo);
    }
    u->salt = s;
    u->salt_len = salt_len;
    return true;
}

static const struct user *find(const struct users *u, const uint8_t *name, size_t name_len) {
    for (size_t i = 0; i < u->len; i++) {
        const struct user *x = &u->items[i];
        if (x->name_len == name_len && (name_len == 0 || memcmp(x->name, name, name_len) == 0)) {
            return x;
        }
    }
    return NULL;
}

bool users_parse(struct users *out, const uint8_t *text, size_t len, users_warn_fn *warn,
                 void *ctx) {
    memset(out, 0, sizeof *out);
    if (len == 0) {
        return true;
    }
    out->text = malloc(len);
    if (out->text == NULL) {
        return false;
    }
    memcpy(out->text, text, len);
    /* At most one user per line: count the lines to size the array once. */
    size_t lines = 1;
    for (size_t i = 0; i < len; i++) {
        lines += out->text[i] == '\n';
    }
    if (lines > SIZE_MAX / sizeof(struct user)) {
        users_free(out);
        return false;
    }
    out->items = calloc(lines, sizeof(struct user));
    if (out->items == NULL) {
        users_free(out);
        return false;
    }

    const uint8_t *p = out->text;
    const uint8_t *end = out->text + len;
    for (size_t line = 1; p < end; line++) {
        const uint8_t *nl = memchr(p, '\n', (size_t)(end - p));
        const uint8_t *stop = nl != NULL ? nl : end;
        const uint8_t *a = p;
        const uint8_t *b = stop;
        p = nl != NULL ? nl + 1 : end;
        while (a < b && is_space(*a)) {
            a++;
        }
        while (b > a && is_space(b[-1])) {
            b--;
        }
        if (a == b || *a == '#') {
            continue;
        }
        /* The name is everything before the last ':' (a credential holds no ':'). */
        const uint8_t *colon = NULL;
        for (const uint8_t *q = a; q < b; q++) {
            if (*q == ':') {
                colon = q;
            }
        }
        if (colon == NULL || colon == a) {
            if (warn != NULL) {
                warn(ctx, line, "expected NAME:sha256$SALT$HASH; line skipped");
            }
            continue;
        }
        struct user u = {.name = a, .name_len = (size_t)(colon - a)};
        if (find(out, u.name, u.name_len) != NULL) {
            if (warn != NULL) {
                warn(ctx, line, "user listed again; the first line counts");
            }
            continue;
        }
        u.usable = parse_credential(&u, colon + 1, (size_t)(b - colon - 1));
        if (!u.usable && warn != NULL) {
            warn(ctx, line, "malformed sha256$SALT$HASH; this user is refused");
        }
        out->items[out->len++] = u;
    }
    return true;
}

enum users_verdict users_check(const struct users *u, const uint8_t *name, size_t name_len,
                               const uint8_t *password, size_t password_len) {
    static const struct user nobody = {.salt = (const uint8_t *)"-", .salt_len = 1};
    const struct user *x = find(u, name, name_len);
    /* Unknown and unusable users cost the same hash as known ones. */
    const struct user *h = x != NULL && x->usable ? x : &nobody;
    uint8_t digest[SHA256_DIGEST_LEN];
    struct sha256 ctx;
    sha256_init(&ctx);
    sha256_update(&ctx, h->salt, h->salt_len);
    sha256_update(&ctx, password, password_len);
    sha256_final(&ctx, digest);
    uint8_t diff = 0;
    for (size_t i = 0; i < SHA256_DIGEST_LEN; i++) {
        diff |= (uint8_t)(digest[i] ^ h->hash[i]);
    }
    if (x == NULL) {
        return USERS_UNKNOWN;
    }
    return x->usable && diff == 0 ? USERS_OK : USERS_BAD_PASSWORD;
}

void users_free(struct users *u) {
    free(u->items);
    free(u->text);
    memset(u, 0, sizeof *u);
}
