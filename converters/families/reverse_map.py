"""The reverse of a family's key map (bundle key -> fairseq key), derived from its forward rules, never written by hand.

A forward rule is an anchored pattern whose only regex syntax is its capture groups (``(\\d+)``, ``(weight|bias)``)
and a replacement that refers to those groups. Swapping the two gives the reverse rule: the replacement's literal
text (escaped) with each ``\\N`` replaced by group N's own sub-pattern, and the pattern's literal text with each
group replaced by a reference to it. Where several forward rules reach the same bundle key (fairseq's pos_conv
weight norm as ``weight_g``/``weight_v`` or as torch's ``parametrizations``), the first rule of the table wins: the
tables list the form the published checkpoints hold first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .key_map import KeyMap, Rule

_GROUP = re.compile(r"\((?!\?)([^()]*)\)")  # a capture group without nested groups
_REFERENCE = re.compile(r"\\(\d)")


class IrreversibleRule(ValueError):
    """A forward rule uses regex syntax outside its capture groups, or references a group twice."""


def _split_pattern(pattern: str) -> tuple[list[str], list[str]]:
    """(literal texts between the groups, unescaped; the groups' sub-patterns), checked to be plain literals."""
    literals, groups, pos = [], [], 0
    for match in _GROUP.finditer(pattern):
        literals.append(pattern[pos:match.start()])
        groups.append(match.group(1))
        pos = match.end()
    literals.append(pattern[pos:])
    plain = []
    for text in literals:
        unescaped = re.sub(r"\\(.)", r"\1", text)
        if re.escape(unescaped) != text:
            raise IrreversibleRule(f"{pattern!r}: {text!r} is not literal text")
        plain.append(unescaped)
    return plain, groups


def reverse_rule(rule: Rule) -> Rule:
    """The rule mapping what ``rule`` produces back to what it matched."""
    pattern, replacement = rule
    literals, groups = _split_pattern(pattern)
    # reverse pattern: the replacement's text with each \N standing for group N's sub-pattern, captured in order
    parts, order, pos = [], [], 0
    for match in _REFERENCE.finditer(replacement):
        parts.append(re.escape(replacement[pos:match.start()]))
        number = int(match.group(1))
        if number in order or not 1 <= number <= len(groups):
            raise IrreversibleRule(f"{rule!r}: group {number} is used twice or does not exist")
        order.append(number)
        parts.append(f"({groups[number - 1]})")
        pos = match.end()
    parts.append(re.escape(replacement[pos:]))
    if sorted(order) != list(range(1, len(groups) + 1)):
        raise IrreversibleRule(f"{rule!r}: the replacement drops a group, so the source key cannot be rebuilt")
    position = {number: i + 1 for i, number in enumerate(order)}  # group N of the pattern is group position[N] here
    template = literals[0] + "".join(f"\\{position[n]}" + literals[n] for n in range(1, len(groups) + 1))
    return "".join(parts), template


@dataclass(frozen=True)
class ReverseKeyMap:
    rules: tuple[Rule, ...]

    def fairseq_key(self, bundle_key: str) -> str | None:
        """The fairseq key of ``bundle_key`` (first matching rule), or None when no rule maps it."""
        for pattern, template in self.rules:
            match = re.fullmatch(pattern, bundle_key)
            if match:
                return match.expand(template)
        return None


def reverse_key_map(key_map: KeyMap) -> ReverseKeyMap:
    """Every rule of ``key_map`` reversed, in the table's order."""
    return ReverseKeyMap(tuple(reverse_rule(rule) for rule in key_map.rules))
