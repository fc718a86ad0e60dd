"""Access rules (config `access:`, ours): who may pull, push and delete which repositories.

registry:2's semantics are the default: an authenticated user may do anything. The first rule
whose `repositories` globs match a repository decides the actions it lists; an action it does not
list stays open to every authenticated user. In a rule's user list `*` is every authenticated
user and `anonymous` a client that did not authenticate. Clients without credentials may
otherwise only pull proxied (cached upstream) repositories, when `anonymous_pull` is on.
"""

from __future__ import annotations

import re

from mirror.config import ANONYMOUS, ANY_USER, AccessConfig, AccessRule
from mirror.registry.namespace import glob_to_regex


class AccessRules:
    def __init__(self, config: AccessConfig) -> None:
        self.config = config
        self.anonymous_pull = config.anonymous_pull
        self._rules = [(re.compile("|".join(f"(?:{glob_to_regex(p)})" for p in rule.repositories)), rule)
                       for rule in config.rules]
        self._matches: dict[str, AccessRule | None] = {}  # the hot path: one dict lookup per name

    def rule(self, name: str) -> AccessRule | None:
        try:
            return self._matches[name]
        except KeyError:
            pass
        found = next((rule for regex, rule in self._rules if regex.fullmatch(name)), None)
        if len(self._matches) >= 100_000:
            self._matches.clear()
        self._matches[name] = found
        return found

    def allows(self, user: str | None, name: str, action: str, proxied: bool) -> bool:
        """May `user` (None: anonymous) do `action` (pull, push, delete) on repository `name`?
        `proxied`: the repository is a pull-through cache (for anonymous_pull)."""
        rule = self.rule(name) if self._rules else None
        users = rule.users(action) if rule is not None else None
        if user is None:
            if users is not None and ANONYMOUS in users:
                return True
            return action == "pull" and proxied and self.anonymous_pull and users is None
        return users is None or ANY_USER in users or user in users
