"""Breaking-change rules: `holdfast lint --against GIT_REF`.

Each compares the tree at the revision (`context.against`) with the working
tree (`context.tree`) and reports on the working tree: what was removed is
reported where it used to live (its service or enum, else its file). These
are the changes that break clients or the replay of recorded idempotency
keys; additions never do. Without --against they report nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

from holdfast.contracts.context import Context
from holdfast.contracts.rules import Report, Rule
from holdfast.contracts.tree import Rpc, Tree, field_type


def _pairs(context: Context) -> Iterator[tuple[Rpc, Rpc | None]]:
    """(old, new) for every RPC of the revision; new is None when it is gone."""
    if context.against is None:
        return
    now = {rpc.method: rpc for rpc in context.tree.rpcs}
    for old in context.against.rpcs:
        yield old, now.get(old.method)


def rpc_no_delete(context: Context) -> Report:
    for old, new in _pairs(context):
        if new is None:
            site = context.tree.removed_site(old.service, "service", old.source.name, old.source.home)
            yield site, (
                f"RPC {old.method} exists at {context.ref} but not here: it was removed or renamed, "
                "which breaks its clients and the replay of its recorded calls."
            )


def _key(tree: Tree, rpc: Rpc) -> tuple[tuple[str, str], ...]:
    """The key as (field, type) pairs; a field the request lacks has type "?"."""
    if rpc.contract is None:
        return ()
    message = tree.message(rpc.request)
    fields = message.fields if message else {}
    return tuple((name, field_type(fields[name][1]) if name in fields else "?") for name in rpc.contract.idempotency_key)


def contract_key_same_fields(context: Context) -> Report:
    for old, new in _pairs(context):
        if new is None:
            continue
        before, after = _key(context.against, old), _key(context.tree, new)
        if not before or before == after:
            continue
        if [name for name, _ in before] != [name for name, _ in after]:
            yield new.option_site("idempotency_key"), (
                f"Idempotency key of {new.method} changed from {_names(before)} at {context.ref} to {_names(after)}; "
                "every recorded key of this RPC would no longer replay."
            )
            continue
        for (name, was), (_, now) in zip(before, after):
            if was != now:
                index = [n for n, _ in after].index(name)
                yield new.option_site("idempotency_key", index), (
                    f'Idempotency key field "{name}" of {new.method} changed type from {was} at {context.ref} '
                    f"to {now}; every recorded key of this RPC would no longer replay."
                )


def _names(key: tuple[tuple[str, str], ...]) -> str:
    return "[" + ", ".join(f'"{name}"' for name, _ in key) + "]"


def contract_timeout_no_raise_past_sla(context: Context) -> Report:
    """Measured against the SLA as it was at the revision (the registry is
    read from git when it is in the repository): raising a timeout together
    with its SLA entry passes CONTRACT_TIMEOUT_WITHIN_SLA but still breaks
    every client whose deadline was sized by the old promise."""
    registry = context.against_sla or context.sla
    for old, new in _pairs(context):
        if new is None or old.contract is None or new.contract is None:
            continue
        sla = registry.entries.get(old.contract.sla)
        was, now = old.contract.timeout_ms, new.contract.timeout_ms
        if sla is not None and now > was and now > sla.timeout_ms_max:
            at = f" at {context.ref}" if context.against_sla is not None else ""
            yield new.option_site("timeout_ms"), (
                f"Contract of {new.method} raised timeout_ms from {was} at {context.ref} to {now}, beyond "
                f'timeout_ms_max {sla.timeout_ms_max} of sla "{sla.name}"{at}; clients size their deadlines by that SLA.'
            )


def enum_value_no_delete(context: Context) -> Report:
    if context.against is None:
        return
    now = {enum.full_name: enum for enum in context.tree.enums}
    for old in context.against.enums:
        new = now.get(old.full_name)
        for name, (number, _) in old.values.items():
            if new is not None and name in new.values:
                moved = new.values[name][0]
                if moved != number:
                    yield new.value_site(name), (
                        f"Enum value {name} of {old.full_name} changed number from {number} at {context.ref} "
                        f"to {moved}; stored states and recorded replies carry the old number."
                    )
                continue
            site = context.tree.removed_site(old.full_name, "enum", old.source.name, old.source.home)
            yield site, (
                f"Enum value {name} = {number} of {old.full_name} exists at {context.ref} but not here; "
                "stored states and recorded replies that carry it would no longer decode."
            )


RULES: tuple[Rule, ...] = (
    Rule("RPC_NO_DELETE", "BREAKING",
         "An RPC of the --against revision still exists under the same service and name, because clients and recorded keys name it.",
         rpc_no_delete),
    Rule("CONTRACT_KEY_SAME_FIELDS", "BREAKING",
         "An RPC's idempotency key keeps its fields, order and types, because a recorded key is replayed by recomputing it from them.",
         contract_key_same_fields),
    Rule("CONTRACT_TIMEOUT_NO_RAISE_PAST_SLA", "BREAKING",
         "An RPC's timeout_ms is not raised beyond its SLA entry's timeout_ms_max at the --against revision, because clients sized their deadlines by that SLA.",
         contract_timeout_no_raise_past_sla),
    Rule("ENUM_VALUE_NO_DELETE", "BREAKING",
         "An enum value of the --against revision keeps its name and number, because stored states and recorded replies carry them.",
         enum_value_no_delete),
)
