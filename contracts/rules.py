"""The lint rules, as data: an ID (subject then property), a category, a
one-sentence purpose and a handler.

A handler reads a `context.Context` and yields `(Site, message)` pairs; the run
adds the rule's ID, drops what an ignore comment or the config waives, and
sorts. Handlers never report a problem another rule already owns (a missing
contract, a zero timeout, an unknown SLA), so one mistake is one finding.
Every message is a full sentence that quotes the values involved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from holdfast.contracts.context import Context, Sla
from holdfast.contracts.tree import CONTRACT_OPTION, ContractOption, Rpc, Site, field_type, is_repeated, is_scalar

Report = Iterator[tuple[Site, str]]


@dataclass(frozen=True, slots=True)
class Rule:
    """`category` is what `use` / `except` may name instead of each ID:
    CONTRACT, SLA, FAULT, GENERATED, BREAKING."""

    id: str
    category: str
    purpose: str
    check: Callable[[Context], Iterable[tuple[Site, str]]]


def _contracted(context: Context) -> Iterator[tuple[Rpc, ContractOption]]:
    for rpc in context.tree.rpcs:
        if rpc.contract is not None:
            yield rpc, rpc.contract


def _sla(context: Context, contract: ContractOption) -> Sla | None:
    return context.sla.entries.get(contract.sla)


# -- CONTRACT: each RPC declares a well-formed contract --------------------------------------


def rpc_contract_required(context: Context) -> Report:
    for rpc in context.tree.rpcs:
        if rpc.contract is None:
            yield rpc.site(), (
                f"RPC {rpc.method} declares no {CONTRACT_OPTION} option; "
                "every RPC needs a contract with its timeout, idempotency key and retry policy."
            )


def contract_timeout_required(context: Context) -> Report:
    for rpc, contract in _contracted(context):
        if contract.timeout_ms <= 0:
            yield rpc.option_site("timeout_ms"), (
                f"Contract of {rpc.method} has timeout_ms {contract.timeout_ms}; "
                "it must be a positive number of milliseconds."
            )


def contract_key_required(context: Context) -> Report:
    for rpc, contract in _contracted(context):
        if not rpc.read_only and not contract.idempotency_key:
            yield rpc.option_site("idempotency_key"), (
                f"RPC {rpc.method} changes state (its idempotency_level is not NO_SIDE_EFFECTS) "
                "but its contract declares no idempotency_key, so a retry would repeat the change instead of replaying it."
            )


def contract_key_fields_exist(context: Context) -> Report:
    for rpc, contract in _contracted(context):
        request = context.tree.message(rpc.request)
        if request is None:
            continue
        for index, name in enumerate(contract.idempotency_key):
            if name not in request.fields:
                known = ", ".join(f'"{field}"' for field in request.fields) or "none"
                yield rpc.option_site("idempotency_key", index), (
                    f'Idempotency key field "{name}" of {rpc.method} is not a field of {request.full_name} '
                    f"(its fields: {known})."
                )


def contract_key_fields_scalar(context: Context) -> Report:
    for rpc, contract in _contracted(context):
        request = context.tree.message(rpc.request)
        for index, name in enumerate(contract.idempotency_key):
            if request is None or name not in request.fields:
                continue
            field = request.fields[name][1]
            if is_scalar(field) and not is_repeated(field):
                continue
            kind = f"a message ({field_type(field)})" if not is_scalar(field) else field_type(field)
            kind = f"a repeated {kind.removeprefix('a ')}" if is_repeated(field) else kind
            yield rpc.option_site("idempotency_key", index, request.field_site_waived(name)), (
                f'Idempotency key field "{name}" of {rpc.method} is {kind}; '
                "a key field must be a singular scalar so the key has one stable encoding."
            )


def contract_lock_ttl_below_timeout(context: Context) -> Report:
    for rpc, contract in _contracted(context):
        if contract.timeout_ms > 0 and contract.lock_ttl_ms >= contract.timeout_ms:
            yield rpc.option_site("lock_ttl_ms"), (
                f"Contract of {rpc.method} has lock_ttl_ms {contract.lock_ttl_ms}, not below its timeout_ms "
                f"{contract.timeout_ms}; the lock lease must end before the call's budget does."
            )


# What `on_duplicate` may be: the numbers of holdfast.contract.v1.OnDuplicate.
_ON_DUPLICATE = {0: "ON_DUPLICATE_REFUSE", 1: "ON_DUPLICATE_WAIT"}
_WAIT = 1


def contract_on_duplicate_known(context: Context) -> Report:
    known = ", ".join(f"{name} ({number})" for number, name in _ON_DUPLICATE.items())
    for rpc, contract in _contracted(context):
        if contract.on_duplicate not in _ON_DUPLICATE:
            yield rpc.option_site("on_duplicate"), (
                f"Contract of {rpc.method} has on_duplicate {contract.on_duplicate}, which is not one holdfast knows "
                f"({known}); the server would refuse to serve it."
            )


def contract_on_duplicate_wait_keyed(context: Context) -> Report:
    for rpc, contract in _contracted(context):
        # A mutating RPC without a key is CONTRACT_KEY_REQUIRED's finding; adding the key fixes both.
        if contract.on_duplicate == _WAIT and not contract.idempotency_key and rpc.read_only:
            yield rpc.option_site("on_duplicate"), (
                f"Contract of {rpc.method} waits for duplicates (on_duplicate: ON_DUPLICATE_WAIT) but declares no "
                "idempotency_key; without a key no two calls are duplicates, so there is nothing to wait for."
            )


# -- SLA: each contract fits its entry in the SLA registry ------------------------------------


def contract_sla_defined(context: Context) -> Report:
    registry, shown = context.sla, context.display(context.sla.file)
    entries = ", ".join(f'"{name}"' for name in registry.entries) or "none"
    for rpc, contract in _contracted(context):
        if not contract.sla:
            yield rpc.option_site("sla"), (
                f"Contract of {rpc.method} names no sla; it must name an entry of {shown} (entries: {entries})."
            )
        elif contract.sla not in registry.entries:
            yield rpc.option_site("sla"), (
                f'Contract of {rpc.method} names sla "{contract.sla}", which is not an entry of {shown} '
                f"(entries: {entries})."
            )


def contract_timeout_within_sla(context: Context) -> Report:
    for rpc, contract in _contracted(context):
        sla = _sla(context, contract)
        if sla is not None and contract.timeout_ms > sla.timeout_ms_max:
            yield rpc.option_site("timeout_ms"), (
                f"Contract of {rpc.method} has timeout_ms {contract.timeout_ms}, above timeout_ms_max "
                f'{sla.timeout_ms_max} of sla "{sla.name}".'
            )


def contract_retry_within_budget(context: Context) -> Report:
    for rpc, contract in _contracted(context):
        sla = _sla(context, contract)
        if sla is None or contract.timeout_ms <= 0:
            continue
        attempts = max(1, contract.max_attempts)  # 0 is "no retry policy": one attempt
        total = attempts * (contract.timeout_ms + contract.fixed_delay_ms)
        if total > sla.budget_ms:
            yield rpc.option_site("retry"), (
                f"Contract of {rpc.method} can take {attempts} * ({contract.timeout_ms} + "
                f"{contract.fixed_delay_ms}) = {total} ms over all attempts (max_attempts * "
                f'(timeout_ms + fixed_delay_ms)), above budget_ms {sla.budget_ms} of sla "{sla.name}".'
            )


# -- FAULT: fault-injection files fit the contracts ------------------------------------------


def fault_method_known(context: Context) -> Report:
    methods = {rpc.method for rpc in context.tree.rpcs}
    for fault in context.faults:
        if fault.method not in methods:
            yield fault.site, (
                f'Fault table ["{fault.method}"] names no RPC of the linted protos, so it would inject nothing '
                "(a table is keyed by the full method name, pkg.Service/Method)."
            )


def fault_delay_below_timeout(context: Context) -> Report:
    rpcs = {rpc.method: rpc for rpc in context.tree.rpcs}
    for fault in context.faults:
        rpc = rpcs.get(fault.method)
        if rpc is None or rpc.contract is None or fault.delay_ms is None or rpc.contract.timeout_ms <= 0:
            continue
        if fault.delay_ms >= rpc.contract.timeout_ms:
            yield fault.delay_site, (
                f"Fault delay_ms {fault.delay_ms} for {fault.method} is not below the method's timeout_ms "
                f"{rpc.contract.timeout_ms}, so every delayed call would run out of budget instead of running slow."
            )


# -- GENERATED: the committed code matches its stamp -----------------------------------------


def generated_code_fresh(context: Context) -> Report:
    if context.generated is None:
        return
    from holdfast.contracts import codegen

    protos, out = context.generated
    try:
        stale = codegen.check(protos=protos, out=out)
    except (OSError, ValueError) as error:  # an unreadable or hand-broken stamp is stale too
        reasons = f"{context.display(out / codegen.STAMP_NAME)} cannot be read: {error}"
    else:
        if not stale:
            return
        reasons = "; ".join(stale.reasons)
    for folder in sorted((protos, out), key=lambda p: len(str(p)), reverse=True):
        reasons = reasons.replace(str(folder), context.display(folder))
    yield Site(out / codegen.STAMP_NAME, 1, 1), (
        f"Generated code in {context.display(out)} is stale ({reasons}); run `{codegen.command(protos, out, context.display)}`."
    )


RULES: tuple[Rule, ...] = (
    Rule("RPC_CONTRACT_REQUIRED", "CONTRACT",
         "Every RPC declares a contract option, because an RPC with no budget and no key is the bare-timeout guess holdfast removes.",
         rpc_contract_required),
    Rule("CONTRACT_TIMEOUT_REQUIRED", "CONTRACT",
         "A contract's timeout_ms is positive, because a zero budget would expire every call before it runs.",
         contract_timeout_required),
    Rule("CONTRACT_KEY_REQUIRED", "CONTRACT",
         "An RPC that changes state (no idempotency_level = NO_SIDE_EFFECTS) declares an idempotency key, so a retry is replayed rather than repeated.",
         contract_key_required),
    Rule("CONTRACT_KEY_FIELDS_EXIST", "CONTRACT",
         "Every idempotency key field names a field of the request message, because the gateway builds the key from those fields.",
         contract_key_fields_exist),
    Rule("CONTRACT_KEY_FIELDS_SCALAR", "CONTRACT",
         "Every idempotency key field is a singular scalar, so a key has exactly one stable encoding.",
         contract_key_fields_scalar),
    Rule("CONTRACT_LOCK_TTL_BELOW_TIMEOUT", "CONTRACT",
         "A contract's lock_ttl_ms is below its timeout_ms, so a lock held by a call that died expires before a retry's budget does.",
         contract_lock_ttl_below_timeout),
    Rule("CONTRACT_ON_DUPLICATE_KNOWN", "CONTRACT",
         "A contract's on_duplicate is ON_DUPLICATE_REFUSE or ON_DUPLICATE_WAIT, because the server refuses to serve a behaviour it does not know.",
         contract_on_duplicate_known),
    Rule("CONTRACT_ON_DUPLICATE_WAIT_KEYED", "CONTRACT",
         "A contract with on_duplicate ON_DUPLICATE_WAIT declares an idempotency key, because only calls that share a key are duplicates.",
         contract_on_duplicate_wait_keyed),
    Rule("CONTRACT_SLA_DEFINED", "SLA",
         "A contract's sla names an entry of the SLA registry, which bounds its timeout and its retries.",
         contract_sla_defined),
    Rule("CONTRACT_TIMEOUT_WITHIN_SLA", "SLA",
         "A contract's timeout_ms is at most its SLA entry's timeout_ms_max, which bounds one attempt.",
         contract_timeout_within_sla),
    Rule("CONTRACT_RETRY_WITHIN_BUDGET", "SLA",
         "max_attempts * (timeout_ms + fixed_delay_ms) is at most the SLA entry's budget_ms, which bounds all attempts end to end.",
         contract_retry_within_budget),
    Rule("FAULT_METHOD_KNOWN", "FAULT",
         "Each table of a fault file names an RPC of the linted protos, so a misspelt method cannot make a fault test test nothing.",
         fault_method_known),
    Rule("FAULT_DELAY_BELOW_TIMEOUT", "FAULT",
         "A fault file's delay_ms is below its method's timeout_ms, so an injected delay makes a call slow rather than certainly late.",
         fault_delay_below_timeout),
    Rule("GENERATED_CODE_FRESH", "GENERATED",
         "The generated code matches its stamp (sources, outputs, toolchain), so stale code fails CI instead of surprising an import.",
         generated_code_fresh),
)
