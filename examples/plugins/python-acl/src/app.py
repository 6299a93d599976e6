"""python-acl: topic access rules for Sandpiper, in Python.

The component exports only the `authorize` hook (world `sandpiper:plugin/authorizer`).
Its rules (see rules.py) are the `[config]` table of its sidecar `python-acl.toml`, read
through the `config` host import.
"""

from wit_world import exports
from wit_world.exports.authorize import (
    Action,
    Decision,
    Decision_Allow,
    Decision_Deny,
    Decision_Ignore,
    Request,
)
from wit_world.imports import config, log
from wit_world.imports.types import Client

import rules as acl

NOT_AUTHORIZED = 0x87
ACTIONS = {
    Action.PUBLISH: "publish",
    Action.SUBSCRIBE: "subscribe",
    Action.WILL: "will",
    Action.RETAINED: "retained",
}
DECISIONS = {
    "allow": Decision_Allow(),
    "deny": Decision_Deny(NOT_AUTHORIZED),
    "ignore": Decision_Ignore(),
}

# Read on the first call of each instance, not at import: componentize-py imports this
# module while building the component, when there is no broker to ask. A changed sidecar
# reloads the plugin, and so brings fresh instances.
_rules: acl.Rules | str | None = None


def rules() -> acl.Rules | str:
    global _rules
    if _rules is None:
        try:
            _rules = acl.parse(config.toml())
        except ValueError as e:
            _rules = str(e)
    return _rules


class Authorize(exports.Authorize):
    def authorize(self, client: Client, requests: list[Request]) -> list[Decision]:
        table = rules()
        if isinstance(table, str):
            # Broken rules deny everything (and say why on every call).
            log.log(log.Level.ERROR, "python-acl: bad rules, denying", [("error", table)])
            return [DECISIONS["deny"] for _ in requests]
        return [
            DECISIONS[acl.decide(table, client.client_id, client.username, ACTIONS[r.action], r.topic)]
            for r in requests
        ]
