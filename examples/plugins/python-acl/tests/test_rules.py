"""Unit tests of rules.py on the host's Python (3.11+): python3 -m unittest discover tests"""

import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import rules  # noqa: E402

TABLE = rules.parse(
    """
default = "deny"
[[rules]]
allow = "readwrite"
topic = "devices/%c/#"
[[rules]]
allow = "read"
topic = "public/#"
[[rules]]
deny = "write"
topic = "devices/%c/secret"
[[rules]]
allow = "readwrite"
topic = "#"
username = "admin"
[[rules]]
allow = "write"
topic = "users/%u/out"
[[rules]]
allow = "read"
topic = "fleet/+/status"
client_id = "ops-*"
"""
)


def decide(action, topic, client_id="dev1", username=None):
    return rules.decide(TABLE, client_id, username, action, topic)


class Decide(unittest.TestCase):
    def test_own_topics(self):
        self.assertEqual(decide("subscribe", "devices/dev1/#"), "allow")
        self.assertEqual(decide("publish", "devices/dev1/temp"), "allow")
        self.assertEqual(decide("subscribe", "devices/dev2/#"), "deny")
        self.assertEqual(decide("publish", "devices/dev2/temp"), "deny")

    def test_placeholders_take_only_safe_values(self):
        # A client id that would change the filter's shape grants nothing (CVE-2017-7650).
        for bad in ["+", "#", "a/b", ""]:
            self.assertEqual(decide("subscribe", "devices/victim/cmd", client_id=bad), "deny", bad)
            self.assertEqual(decide("publish", "devices/victim/cmd", client_id=bad), "deny", bad)
        # A rule with %u never matches a client without a user name, or with an unsafe one.
        self.assertEqual(decide("publish", "users/alice/out", username="alice"), "allow")
        self.assertEqual(decide("publish", "users/+/out", username="+"), "deny")
        self.assertEqual(decide("publish", "users/x/out"), "deny")
        # A deny rule is widened, not skipped: "devices/+/secret" for a client named "+".
        self.assertEqual(decide("publish", "devices/other/secret", client_id="+",
                                username="admin"), "deny")
        self.assertEqual(rules.substitute_widened("d/%c/s", None, "a/b"), "d/+/s")

    def test_read_only(self):
        self.assertEqual(decide("subscribe", "public/news"), "allow")
        self.assertEqual(decide("retained", "public/news"), "allow")
        self.assertEqual(decide("publish", "public/news"), "deny")
        self.assertEqual(decide("will", "public/news"), "deny")

    def test_deny_wins(self):
        self.assertEqual(decide("publish", "devices/dev1/secret"), "deny")
        # Subscribing is still allowed: the deny rule is write-only.
        self.assertEqual(decide("subscribe", "devices/dev1/secret"), "allow")
        # ...but even the admin cannot publish there.
        self.assertEqual(decide("publish", "devices/dev1/secret", username="admin"), "deny")

    def test_filter_wider_than_the_rule_is_denied(self):
        self.assertEqual(decide("subscribe", "#"), "deny")
        self.assertEqual(decide("subscribe", "devices/+/#"), "deny")
        self.assertEqual(decide("subscribe", "public/+"), "allow")

    def test_username_and_client_id_patterns(self):
        self.assertEqual(decide("subscribe", "anything/x", username="admin"), "allow")
        self.assertEqual(decide("publish", "users/alice/out", username="alice"), "allow")
        self.assertEqual(decide("publish", "users/alice/out", username="bob"), "deny")
        self.assertEqual(decide("publish", "users//out"), "deny")
        self.assertEqual(decide("subscribe", "fleet/7/status", client_id="ops-1"), "allow")
        self.assertEqual(decide("subscribe", "fleet/+/status", client_id="ops-1"), "allow")
        self.assertEqual(decide("subscribe", "fleet/#", client_id="ops-1"), "deny")
        self.assertEqual(decide("subscribe", "fleet/7/status", client_id="dev-1"), "deny")

    def test_default(self):
        for default in ("allow", "ignore"):
            t = rules.parse(f'default = "{default}"')
            self.assertEqual(rules.decide(t, "c", None, "publish", "x"), default)
        self.assertEqual(rules.decide(rules.parse(""), "c", None, "publish", "x"), "deny")


class Topics(unittest.TestCase):
    def test_covers(self):
        yes = [("#", "a/b"), ("a/+", "a/b"), ("a/+", "a/+"), ("a/#", "a"), ("a/#", "a/#"), ("+/+", "a/b")]
        no = [("a/+", "a/#"), ("a/+", "a/b/c"), ("a/b", "a/+"), ("#", "$SYS/x"), ("+/x", "$SYS/x"), ("a", "a/b")]
        for rule, req in yes:
            self.assertTrue(rules.covers(rule, req), (rule, req))
        for rule, req in no:
            self.assertFalse(rules.covers(rule, req), (rule, req))

    def test_overlaps(self):
        yes = [("a/#", "#"), ("a/+", "+/b"), ("a/b", "a/b"), ("a/#", "a")]
        no = [("a/+", "b/+"), ("a/b", "a/b/c"), ("a/+", "a")]
        for a, b in yes:
            self.assertTrue(rules.overlaps(a, b), (a, b))
        for a, b in no:
            self.assertFalse(rules.overlaps(a, b), (a, b))


class Parse(unittest.TestCase):
    def test_errors_say_where(self):
        for text, where in [
            ('default = "maybe"', "default"),
            ("[[rules]]\nallow = \"all\"\ntopic = \"a\"", "rules[0].allow"),
            ("[[rules]]\nallow = \"read\"", "rules[0]: a topic filter is required"),
            ("[[rules]]\ntopic = \"a\"\nuser = \"x\"", "unknown key"),
            ("colour = 1", "unknown key"),
            ("rules = [", "not TOML"),
        ]:
            with self.assertRaises(ValueError) as e:
                rules.parse(text)
            self.assertIn(where, str(e.exception))


if __name__ == "__main__":
    unittest.main()
