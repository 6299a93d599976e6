/*
 * c-auth: a Sandpiper authenticate plugin in C (an example of the WIT contract from C;
 * for production use plugins/password-auth, whose PBKDF2 hashes resist guessing far
 * better than one salted SHA-256).
 *
 * The sidecar `c-auth.toml` holds the user table (format in users.h):
 *
 *     [config]
 *     users = """
 *     alice:sha256$4c1f0e5a$<64 hex digits>
 *     """
 *     unknown_users = "deny"   # or "ignore": leave unknown names to the next plugin
 *
 * A wrong password (or an unknown user, unless "ignore") is refused with 0x86, bad user
 * name or password (MQTT 3.1.1: return code 4). A client without a user name, or one
 * using MQTT 5 enhanced authentication, is left to the next plugin and the listener's own
 * rule.
 *
 * Instances are reused for many calls, so the table is parsed once per instance, on its
 * first call; a changed sidecar loads a new plugin version with fresh instances.
 */
#include <string.h>

#include "authenticator.h"
#include "users.h"

/* MQTT 5 reason code 0x86: bad user name or password. */
#define BAD_USER_NAME_OR_PASSWORD 0x86
/* MQTT 5 reason code 0x8C: bad authentication method. */
#define BAD_AUTHENTICATION_METHOD 0x8C

typedef exports_sandpiper_plugin_authenticate_connect_info_t connect_info_t;
typedef exports_sandpiper_plugin_authenticate_step_t step_t;
typedef exports_sandpiper_plugin_authenticate_decision_t decision_t;

static struct users table;
static bool ignore_unknown;
static bool loaded;

static authenticator_string_t str(const char *s) {
    authenticator_string_t out;
    authenticator_string_set(&out, s);
    return out;
}

/* One line in the broker's log, with up to one field. */
static void log_line(sandpiper_plugin_log_level_t level, const char *message,
                     const char *field, const char *value) {
    authenticator_string_t text = str(message);
    authenticator_tuple2_string_string_t pair = {str(field != NULL ? field : ""),
                                                 str(value != NULL ? value : "")};
    authenticator_list_tuple2_string_string_t fields = {&pair, field != NULL ? 1 : 0};
    sandpiper_plugin_log_log(level, &text, &fields);
}

static void warn_line(void *ctx, size_t line, const char *why) {
    (void)ctx;
    /* Line numbers of a table are small; 20 digits hold any size_t anyway. */
    char number[24];
    size_t i = sizeof number - 1;
    number[i] = '\0';
    do {
        number[--i] = (char)('0' + line % 10);
        line /= 10;
    } while (line > 0 && i > 0);
    log_line(SANDPIPER_PLUGIN_LOG_LEVEL_WARN, why, "users line", number + i);
}

/* Reads the sidecar's [config] once per instance. */
static void load(void) {
    if (loaded) {
        return;
    }
    loaded = true;
    authenticator_string_t key = str("users");
    authenticator_string_t value;
    if (sandpiper_plugin_config_get(&key, &value)) {
        if (!users_parse(&table, value.ptr, value.len, warn_line, NULL)) {
            log_line(SANDPIPER_PLUGIN_LOG_LEVEL_ERROR, "out of memory reading the user table",
                     NULL, NULL);
        }
        authenticator_string_free(&value);
    } else {
        log_line(SANDPIPER_PLUGIN_LOG_LEVEL_WARN, "no [config] users: every user is unknown",
                 NULL, NULL);
    }
    key = str("unknown_users");
    if (sandpiper_plugin_config_get(&key, &value)) {
        ignore_unknown = value.len == 6 && memcmp(value.ptr, "ignore", 6) == 0;
        authenticator_string_free(&value);
    }
}

static void deny(decision_t *ret, uint8_t code) {
    ret->tag = EXPORTS_SANDPIPER_PLUGIN_AUTHENTICATE_DECISION_DENY;
    ret->val.deny = code;
}

void exports_sandpiper_plugin_authenticate_authenticate(connect_info_t *info, decision_t *ret) {
    memset(ret, 0, sizeof *ret);
    /* No user name, or MQTT 5 enhanced authentication (a method this plugin does not
     * speak): left to the next plugin and the listener's rule. */
    if (!info->username.is_some || info->auth_method.is_some) {
        ret->tag = EXPORTS_SANDPIPER_PLUGIN_AUTHENTICATE_DECISION_IGNORE;
    } else {
        load();
        const authenticator_string_t *name = &info->username.val;
        /* No password checks as an empty one. */
        const uint8_t *password = info->password.is_some ? info->password.val.ptr : NULL;
        size_t password_len = info->password.is_some ? info->password.val.len : 0;
        switch (users_check(&table, name->ptr, name->len, password, password_len)) {
        case USERS_OK:
            /* An empty grant: keep the user name, no attributes. */
            ret->tag = EXPORTS_SANDPIPER_PLUGIN_AUTHENTICATE_DECISION_ALLOW;
            break;
        case USERS_UNKNOWN:
            if (ignore_unknown) {
                ret->tag = EXPORTS_SANDPIPER_PLUGIN_AUTHENTICATE_DECISION_IGNORE;
            } else {
                deny(ret, BAD_USER_NAME_OR_PASSWORD);
            }
            break;
        case USERS_BAD_PASSWORD:
            deny(ret, BAD_USER_NAME_OR_PASSWORD);
            break;
        }
    }
    /* The arguments belong to the callee. */
    exports_sandpiper_plugin_authenticate_connect_info_free(info);
}

/* Part of the `authenticate` interface; never called, as this plugin never answers
 * `continue`. */
void exports_sandpiper_plugin_authenticate_auth_step(step_t *step, decision_t *ret) {
    memset(ret, 0, sizeof *ret);
    deny(ret, BAD_AUTHENTICATION_METHOD);
    exports_sandpiper_plugin_authenticate_step_free(step);
}
