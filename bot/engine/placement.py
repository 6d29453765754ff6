"""Which slots may run which job kinds: the operator's placement rules and each slot's installed models.

A kind named by no rule runs anywhere its models are; a kind named by rules runs only on a slot that
matches one of them (all of the rule's conditions: GPU index, least memory, labels).
"""
from __future__ import annotations

from collections.abc import Sequence

from bot.config import PlacementRule
from bot.engine.backends.base import SlotInfo


def rule_matches(rule: PlacementRule, info: SlotInfo) -> bool:
    """Whether the slot satisfies every condition of the rule."""
    if rule.gpus and info.gpu_index not in rule.gpus:
        return False
    if rule.gpus and info.device == "cpu":
        return False
    if rule.min_memory_mb and (info.gpu_memory_mb is None or info.gpu_memory_mb < rule.min_memory_mb):
        return False
    return all(info.labels.get(key) == value for key, value in rule.labels.items())


def allowed(kind: str, info: SlotInfo, rules: Sequence[PlacementRule]) -> bool:
    """Whether a job of `kind` may run on the slot."""
    if info.kinds is not None and kind not in info.kinds:
        return False
    mine = [r for r in rules if kind in r.kinds]
    return not mine or any(rule_matches(r, info) for r in mine)
