"""Key maps as data: anchored regex -> replacement rules, plus an explicit drop list with reasons."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

Rule = tuple[str, str]  # (pattern matched against the whole key, replacement template)
Drop = tuple[str, str]  # (pattern matched against the whole key, why it is dropped)


def prefixed(rules: Iterable[Rule], source_prefix: str, target_prefix: str) -> tuple[Rule, ...]:
    """The same rules for keys living under ``source_prefix``, mapped under ``target_prefix``."""
    return tuple((re.escape(source_prefix) + pattern, target_prefix + replacement) for pattern, replacement in rules)


@dataclass
class KeyMapResult:
    mapped: dict[str, str] = field(default_factory=dict)  # source key -> target key
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> reason
    unmapped: list[str] = field(default_factory=list)  # matched by nothing
    conflicting: list[str] = field(default_factory=list)  # matched by a rule and a drop, or by several rules

    def problems(self) -> list[str]:
        out = []
        if self.unmapped:
            out.append(f"tensors no rule maps: {self.unmapped[:8]}{' ...' if len(self.unmapped) > 8 else ''}")
        if self.conflicting:
            out.append(f"tensors several rules claim: {self.conflicting[:8]}")
        targets: dict[str, str] = {}
        for source, target in self.mapped.items():
            if target in targets:
                out.append(f"{source} and {targets[target]} both map to {target}")
            targets[target] = source
        return out


@dataclass(frozen=True)
class KeyMap:
    rules: tuple[Rule, ...]
    drops: tuple[Drop, ...] = ()

    def classify(self, keys: Iterable[str]) -> KeyMapResult:
        """Map every key; a key must match exactly one rule or exactly one drop."""
        result = KeyMapResult()
        compiled_rules = [(re.compile(p), r) for p, r in self.rules]
        compiled_drops = [(re.compile(p), why) for p, why in self.drops]
        for key in keys:
            hits = [(rx, rep) for rx, rep in compiled_rules if rx.fullmatch(key)]
            drops = [why for rx, why in compiled_drops if rx.fullmatch(key)]
            if len(hits) + len(drops) > 1:
                result.conflicting.append(key)
            elif hits:
                rx, rep = hits[0]
                result.mapped[key] = rx.sub(rep, key)
            elif drops:
                result.dropped[key] = drops[0]
            else:
                result.unmapped.append(key)
        return result
