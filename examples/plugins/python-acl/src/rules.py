"""The access rules of python-acl, without any binding to the broker (so they can be
tested with a plain Python 3.11+).

A rule table is the plugin's `[config]`:

    default = "deny"          # when no rule matches: "deny", "allow" or "ignore"

    [[rules]]
    allow = "readwrite"       # or deny = ...: "read" (subscribe, retained),
                              # "write" (publish, will) or "readwrite"
    topic = "devices/%c/#"    # MQTT filter; %u = user name, %c = client id
    username = "alice"        # optional; "*" or absent: anyone; "x*": a prefix
    client_id = "sensor-*"    # optional, same form

Deny rules win over allow rules. A subscription is allowed when an allow rule's filter
covers every topic the requested filter can match, and denied when it can match any
topic a deny rule names.
"""

import tomllib
from dataclasses import dataclass

READ = frozenset(("subscribe", "retained"))
WRITE = frozenset(("publish", "will"))
ACCESS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE}
DEFAULTS = ("deny", "allow", "ignore")


@dataclass(frozen=True)
class Rule:
    allow: frozenset
    deny: frozenset
    topic: str
    username: str | None
    client_id: str | None


@dataclass(frozen=True)
class Rules:
    default: str
    rules: tuple


def _access(value, where):
    if value is None:
        return frozenset()
    if value not in ACCESS:
        raise ValueError(f"{where}: expected read, write or readwrite, got {value!r}")
    return ACCESS[value]


def _who(value, where):
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def parse(text):
    """The rules of a `[config]` table given as TOML text; ValueError says what is wrong."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"not TOML: {e}") from e
    unknown = set(table) - {"default", "rules"}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}")
    default = table.get("default", "deny")
    if default not in DEFAULTS:
        raise ValueError(f"default: expected deny, allow or ignore, got {default!r}")
    rules = []
    for i, r in enumerate(table.get("rules", [])):
        where = f"rules[{i}]"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected a table")
        unknown = set(r) - {"allow", "deny", "topic", "username", "client_id"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
        topic = r.get("topic")
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"{where}: a topic filter is required")
        rules.append(
            Rule(
                allow=_access(r.get("allow"), f"{where}.allow"),
                deny=_access(r.get("deny"), f"{where}.deny"),
                topic=topic,
                username=_who(r.get("username"), f"{where}.username"),
                client_id=_who(r.get("client_id"), f"{where}.client_id"),
            )
        )
    return Rules(default, tuple(rules))


def who_matches(pattern, value):
    """`username` / `client_id` of a rule: absent or "*" is anyone, "x*" a prefix."""
    if pattern is None or pattern == "*":
        return True
    if value is None:
        return False
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def covers(rule, requested):
    """Every topic that the name or filter `requested` can match also matches `rule`."""
    # Wildcards at the first level do not match topics starting with "$" (MQTT 4.7.2).
    if rule[:1] in ("+", "#") and requested.startswith("$"):
        return False
    r, q = rule.split("/"), requested.split("/")
    for i, level in enumerate(r):
        if level == "#":
            return True
        if i >= len(q):
            return False
        if level == "+":
            if q[i] == "#":
                return False
        elif level != q[i]:
            return False
    return len(r) == len(q)


def overlaps(a, b):
    """Some topic matches both filters `a` and `b`."""
    # A leading wildcard never matches a topic starting with "$".
    if (a.startswith("$") and b[:1] in ("+", "#")) or (b.startswith("$") and a[:1] in ("+", "#")):
        return False
    x, y = a.split("/"), b.split("/")
    for i in range(max(len(x), len(y))):
        p = x[i] if i < len(x) else None
        q = y[i] if i < len(y) else None
        if p == "#" or q == "#":
            return True
        if p is None or q is None:
            return False
        if p != q and p != "+" and q != "+":
            return False
    return True


def safe_value(v):
    """A client id or user name may stand for %c / %u only when it cannot change the
    filter's shape: not empty, no "/", "+" or "#" (a client named "+" would otherwise be
    granted "devices/+/#", every device; the class of Mosquitto's CVE-2017-7650)."""
    return bool(v) and not any(c in v for c in "/+#")


def substitute(filt, username, client_id):
    """`filt` with %u and %c put in, or None when a placeholder it holds has no safe
    value (the same rule as the Rust SDK's `topic::substitute`)."""
    if "%u" in filt:
        if username is None or not safe_value(username):
            return None
        filt = filt.replace("%u", username)
    if "%c" in filt:
        if not safe_value(client_id):
            return None
        filt = filt.replace("%c", client_id)
    return filt


def substitute_widened(filt, username, client_id):
    """For deny rules: `substitute`, or with every level holding a placeholder widened
    to "+" when a value is not safe, so a deny rule gets stricter, never weaker."""
    done = substitute(filt, username, client_id)
    if done is not None:
        return done
    return "/".join("+" if ("%u" in l or "%c" in l) else l for l in filt.split("/"))


def decide(rules, client_id, username, action, topic):
    """"allow", "deny" or "ignore" for `action` ("publish", "subscribe", "will",
    "retained") on `topic` (a filter for subscribe, a name otherwise)."""
    allowed = False
    for rule in rules.rules:
        if not who_matches(rule.username, username):
            continue
        if not who_matches(rule.client_id, client_id):
            continue
        if action in rule.deny:
            filt = substitute_widened(rule.topic, username, client_id)
            hit = overlaps(filt, topic) if action == "subscribe" else covers(filt, topic)
            if hit:
                return "deny"
        if action in rule.allow:
            filt = substitute(rule.topic, username, client_id)
            if filt is not None and covers(filt, topic):
                allowed = True
    return "allow" if allowed else rules.default
