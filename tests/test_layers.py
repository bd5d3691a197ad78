"""The layers of DESIGN.md, enforced: each module imports only its own layer
and those below it, no import cycle is left in the runtime, and nothing below
the apps names an app's nouns.

    core → backends → server → testing → apps → tools

Every module of the distribution (found through pyproject's package-dir, so
contracts/ and the generated code are included) is parsed, never imported.
An import counts wherever it is written: at the top, inside a function (a
lazy import is still a dependency), or under `if TYPE_CHECKING:`, and so does
a module named by a string the runtime loads (`importlib.import_module`, a
`MODULE:ATTR` spec such as the server's default apps). `from holdfast import
NAME` is resolved through the public API's `_HOMES` table
(service/__init__.py) to the module NAME lives in, which is what it imports
at run time (PEP 562).

Type-only imports (`if TYPE_CHECKING:`) obey the layer rule like any other,
so a type can never point up a layer either; they are left out of the cycle
check alone, because they never run: with `from __future__ import
annotations` two modules of one layer may name each other's types without
either importing the other when the program runs.

Exceptions would be listed below (`KNOWN_*`), one entry per edge or module
with what would remove it; all three lists are empty, and a new violation
fails. An entry that no longer matches anything fails too (remove it).

Plain `ast` rather than import-linter: import-linter finds modules by walking
one package's folder, but holdfast is one import package spread over three
folders by setuptools' package-dir (service/, contracts/, service/generated/),
and it would read `from holdfast import Service` as an import of the package
itself rather than of holdfast.framework.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CORE, BACKENDS, SERVER, TESTING, APPS, TOOLS = range(6)
LAYER_NAMES = ("core", "backends", "server", "testing", "apps", "tools")

# Every module, by import name, and its layer. A module missing here fails
# test_every_module_has_a_layer: a new module is placed on purpose.
LAYERS: dict[str, int] = {
    # -- core: the machine, contracts, calls, entities, outcomes and reasons,
    # the engine, the store and snapshot interfaces, the clock.
    "holdfast.machine": CORE,
    "holdfast.call": CORE,
    "holdfast.outcome": CORE,
    "holdfast.refusal": CORE,  # a reason as a client reads it back
    "holdfast.framework": CORE,  # the Service base a team's app subclasses
    "holdfast.engine": CORE,
    "holdfast.store": CORE,  # the Txn and Store interfaces, and the SQL the backends share
    "holdfast.table": CORE,  # an app's own tables, declared
    "holdfast.snapshot": CORE,  # the Snapshot interface
    "holdfast.clock": CORE,
    "holdfast.spans": CORE,  # tracing's hook: None unless holdfast.tracing set it (OpenTelemetry stays optional)
    "holdfast.redaction": CORE,  # every backend scrubs passwords out of its errors
    # The metric definitions are core: the engine counts replays and
    # compensations, the snapshot its degradations, the gateway its answers,
    # all into one registry. The server layer serves them (server.py's
    # /metrics port); holdfast.stats (tools) reads them back.
    "holdfast.metrics": CORE,
    # The contract toolchain's data: what a contract is (read from the
    # descriptors), its gRPC service config, and where the generated code,
    # its stamp and its service config live (codegen; imports nothing of the
    # runtime, and holdfast.client reads its locations).
    "holdfast.contracts": CORE,
    "holdfast.contracts.contract": CORE,
    "holdfast.contracts.service_config": CORE,
    "holdfast.contracts.codegen": CORE,
    # Generated and shipped data: the contract option's own code is core.
    "holdfast.generated": CORE,
    "holdfast.protos": CORE,
    "holdfast.contract": CORE,
    "holdfast.contract.v1": CORE,
    "holdfast.contract.v1.contract_pb2": CORE,
    "holdfast.contract.v1.contract_pb2_grpc": CORE,
    # -- backends: SQLite, PostgreSQL, memory, Redis (standalone and Cluster).
    "holdfast.batch": BACKENDS,  # the SQL stores' buffered batches
    "holdfast.sqlite": BACKENDS,
    "holdfast.postgres": BACKENDS,
    "holdfast.memory": BACKENDS,
    "holdfast.memory_snapshot": BACKENDS,
    "holdfast.redis_snapshot": BACKENDS,
    "holdfast.backends": BACKENDS,  # URL -> store or snapshot
    # -- server: gateway, limits, security, faults, reaper, metrics' port, workers.
    "holdfast.gateway": SERVER,
    "holdfast.limits": SERVER,
    "holdfast.security": SERVER,
    "holdfast.recorder": SERVER,  # the journal's writer, for `serve --journal`; holdfast.journal reads it back
    "holdfast.faults": SERVER,
    "holdfast.reaper": SERVER,
    "holdfast.retention": SERVER,  # pruning what the store and the snapshot keep, on the reaper's loop
    "holdfast.workers": SERVER,
    "holdfast.server": SERVER,
    "holdfast.loop": SERVER,  # the event loop a server process runs on
    "holdfast.tracing": SERVER,  # OpenTelemetry traces of the calls, for `serve --otlp-endpoint`
    "holdfast.client": SERVER,  # the other end of the gateway: channels that apply the contracts
    # The public API re-exports core and server names (lazily, PEP 562), so
    # it sits at the top of the layers it names; imports *through* it are
    # resolved to each name's home.
    "holdfast": SERVER,
    # -- testing: pytest plugin, journal, replay, simulation.
    "holdfast.pytest_plugin": TESTING,
    "holdfast.journal": TESTING,
    "holdfast.replay": TESTING,
    "holdfast.simulate": TESTING,
    "holdfast.auditor": TESTING,
    "holdfast.workload": TESTING,
    # -- apps: inventory, fulfillment, and their generated code.
    "holdfast.apps": APPS,
    "holdfast.apps.inventory": APPS,
    "holdfast.apps.inventory_machine": APPS,
    "holdfast.apps.inventory_store": APPS,
    "holdfast.apps.inventory_workload": APPS,
    "holdfast.apps.inventory_verify": APPS,  # inventory's checks for `holdfast verify` (Inventory.verifier)
    "holdfast.apps.fulfillment": APPS,
    "holdfast.apps.fulfillment_workload": APPS,
    "holdfast.apps.carrier": APPS,
    "holdfast.inventory": APPS,
    "holdfast.inventory.v1": APPS,
    "holdfast.inventory.v1.inventory_pb2": APPS,
    "holdfast.inventory.v1.inventory_pb2_grpc": APPS,
    "holdfast.fulfillment": APPS,
    "holdfast.fulfillment.v1": APPS,
    "holdfast.fulfillment.v1.fulfillment_pb2": APPS,
    "holdfast.fulfillment.v1.fulfillment_pb2_grpc": APPS,
    # -- tools: CLI, doctor, graph, bench, stats, the probe, the lint.
    "holdfast.cli": TOOLS,
    "holdfast.doctor": TOOLS,
    "holdfast.graph": TOOLS,
    "holdfast.bench": TOOLS,
    "holdfast.handwritten": TOOLS,  # the service a team writes without holdfast: the bench's baseline
    "holdfast.stats": TOOLS,
    "holdfast.verify": TOOLS,  # `holdfast verify`: the books checked read-only, the snapshot repaired
    "holdfast.probe": TOOLS,  # a container's health check: a command, like stats
    "holdfast.contracts.tree": TOOLS,
    "holdfast.contracts.context": TOOLS,
    "holdfast.contracts.rules": TOOLS,
    "holdfast.contracts.breaking": TOOLS,
    "holdfast.contracts.lint": TOOLS,
    "holdfast.contracts.lint_bench": TOOLS,
}

# Python files under the package folders that are no module of the
# distribution (pyproject lists no package for them).
NOT_MODULES = {
    # protoc's output root inside service/generated/: its subfolders are
    # installed as holdfast.contract, holdfast.inventory, ... (package-dir).
    "service/generated/holdfast/__init__.py",
}

# Imports that go up a layer: (importer, imported) -> what would remove it.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}

# Runtime imports that close a cycle: (importer, imported) -> what would remove it.
KNOWN_CYCLES: dict[tuple[str, str], str] = {}

# Below the apps layer, the app nouns each module still names (identifiers,
# or words of its non-docstring strings), by module -> {names} with why.
# The nouns are the apps' (inventory: SKU, stock, reservation; fulfillment:
# waybill, carrier), as words of an identifier (snake_case or CamelCase,
# singular or plural: `sku_id`, `take_stock`, `Reservation`, `SKUS`).
KNOWN_NOUNS: dict[str, frozenset[str]] = {}

APP_NOUNS = frozenset({"sku", "stock", "reservation", "waybill", "carrier"})


# -- the modules -----------------------------------------------------------------------


def _package_folders() -> dict[str, Path]:
    """Each package of the distribution and its folder, as setuptools maps them."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = tool.get("package-dir", {})
    folders = {}
    for package in tool["packages"]:
        base = max((k for k in mapping if package == k or package.startswith(k + ".")), key=len, default="")
        rest = package[len(base) :].lstrip(".").split(".") if package != base else []
        folders[package] = ROOT / (mapping[base] if base else "") / Path(*rest) if rest else ROOT / mapping[base]
    return folders


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in _package_folders().items():
        for file in sorted(folder.glob("*.py")):
            modules[package if file.name == "__init__.py" else f"{package}.{file.stem}"] = file
    return modules


MODULES = _modules()


def _homes() -> dict[str, str]:
    """The public API's names and their modules: `_HOMES` of service/__init__.py."""
    tree = ast.parse(MODULES["holdfast"].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_HOMES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("service/__init__.py has no _HOMES table")


HOMES = _homes()


# -- reading imports ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Import:
    source: str
    target: str
    line: int
    typing_only: bool  # under `if TYPE_CHECKING:`
    how: str  # "import", "lazy" (inside a function), "call" (import_module), "string" (named)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_of(name: str) -> str | None:
    """The longest known module `name` starts with; None outside holdfast."""
    if name != "holdfast" and not name.startswith("holdfast."):
        return None
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    assert parts, name
    return ".".join(parts)


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _from_targets(source: str, node: ast.ImportFrom) -> Iterator[str]:
    if node.level:
        base = _package_of(source).split(".")
        base = base[: len(base) - node.level + 1]
        module = ".".join([*base, *([node.module] if node.module else [])])
    else:
        module = node.module or ""
    if module != "holdfast" and not module.startswith("holdfast."):
        return
    for alias in node.names:
        candidate = f"{module}.{alias.name}"
        if candidate in MODULES:
            yield candidate
        elif module == "holdfast" and alias.name in HOMES:
            yield HOMES[alias.name]
        else:
            assert module in MODULES, f"{source} imports from {module}, which is no module of holdfast"
            assert module != "holdfast", f"{source} imports holdfast.{alias.name}, which is neither a module nor public"
            yield module


def _loads_by_name(call: ast.Call) -> bool:
    """`importlib.import_module("literal")` or `__import__("literal", ...)`."""
    function = call.func
    named = (isinstance(function, ast.Name) and function.id in ("__import__", "import_module")) or (
        isinstance(function, ast.Attribute) and function.attr == "import_module"
    )
    return named and bool(call.args) and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)


_SPEC = re.compile(r"holdfast(?:\.\w+)+(?::[\w.]+)?")


def _docstrings(tree: ast.Module) -> set[int]:
    """The ids of string statements: docstrings and other prose, no code."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }


def imports_of(source: str, text: str) -> list[Import]:
    tree = ast.parse(text)
    prose = _docstrings(tree)
    found: list[Import] = []

    def visit(node: ast.AST, typing_only: bool, lazy: bool) -> None:
        how = "lazy" if lazy else "import"
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _module_of(alias.name)
                if target is not None:
                    assert target == alias.name, f"{source}:{node.lineno} imports {alias.name}, which is no module of holdfast"
                    found.append(Import(source, target, node.lineno, typing_only, how))
        elif isinstance(node, ast.ImportFrom):
            for target in _from_targets(source, node):
                found.append(Import(source, target, node.lineno, typing_only, how))
        elif isinstance(node, ast.Call) and _loads_by_name(node):
            name = node.args[0].value  # type: ignore[attr-defined]
            target = _module_of(name)
            if target is not None:
                assert target == name, f"{source}:{node.lineno} loads {name}, which is no module of holdfast"
                found.append(Import(source, target, node.lineno, typing_only, "call"))
                return
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            # A module named for someone to load: a "holdfast.x:Attr" spec, a
            # table of commands, `python -m holdfast.x`. The bare "holdfast"
            # is a logger's name.
            if _SPEC.fullmatch(node.value):
                target = _module_of(node.value.partition(":")[0])
                if target is not None and target == node.value.partition(":")[0]:
                    found.append(Import(source, target, node.lineno, typing_only, "string"))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True, lazy)
            for child in node.orelse:
                visit(child, typing_only, lazy)
            return
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, typing_only, inner)

    visit(tree, False, False)
    if source == "holdfast":
        # The public API imports each name's home when the name is first
        # read (importlib.import_module(_HOMES[name])).
        found += [Import(source, home, 0, False, "call") for home in sorted(set(HOMES.values()))]
    return [i for i in found if i.target != source]


IMPORTS = [i for module, file in MODULES.items() for i in imports_of(module, file.read_text())]


def _where(i: Import) -> str:
    file = MODULES[i.source].relative_to(ROOT)
    kind = {"import": "imports", "lazy": "imports lazily", "call": "loads", "string": "names"}[i.how]
    typing = " (type-only)" if i.typing_only else ""
    return f"{file}:{i.line}: {i.source} {kind}{typing} {i.target}"


# -- the parser itself, on known snippets -------------------------------------------------


@pytest.mark.parametrize(
    ("source", "text", "expected"),
    [
        ("holdfast.engine", "from holdfast import metrics", {("holdfast.metrics", False, "import")}),
        ("holdfast.engine", "from holdfast import Service", {("holdfast.framework", False, "import")}),
        ("holdfast.engine", "import holdfast.store", {("holdfast.store", False, "import")}),
        ("holdfast.engine", "from holdfast.store import Txn", {("holdfast.store", False, "import")}),
        ("holdfast.engine", "def f():\n    from holdfast.sqlite import SqliteStore", {("holdfast.sqlite", False, "lazy")}),
        ("holdfast.engine", "if TYPE_CHECKING:\n    from holdfast.server import Config", {("holdfast.server", True, "import")}),
        ("holdfast.engine", "from holdfast.inventory.v1 import inventory_pb2 as pb", {("holdfast.inventory.v1.inventory_pb2", False, "import")}),
        ("holdfast.engine", "APPS = ('holdfast.apps.inventory:Inventory',)", {("holdfast.apps.inventory", False, "string")}),
        ("holdfast.engine", "importlib.import_module('holdfast.doctor')", {("holdfast.doctor", False, "call")}),
        ("holdfast.engine", "__import__('holdfast.contracts.codegen', fromlist=['main'])", {("holdfast.contracts.codegen", False, "call")}),
        ("holdfast.engine", "ARGV = ['-m', 'holdfast.cli', 'serve']", {("holdfast.cli", False, "string")}),
        ("holdfast.engine", "'''holdfast.server, in a docstring'''\nlog = getLogger('holdfast')", set()),
        ("holdfast.contracts.lint", "from . import rules\nfrom .tree import Site", {("holdfast.contracts.rules", False, "import"), ("holdfast.contracts.tree", False, "import")}),
        ("holdfast.engine", "import grpc\nfrom google.protobuf import message", set()),
    ],
)
def test_imports_are_read_wherever_they_are_written(source: str, text: str, expected: set) -> None:
    assert {(i.target, i.typing_only, i.how) for i in imports_of(source, text)} == expected


# -- the rules ------------------------------------------------------------------------------


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(set(MODULES) - set(LAYERS))
    assert not unplaced, f"place each new module in a layer (LAYERS in {__file__}): {unplaced}"
    gone = sorted(set(LAYERS) - set(MODULES))
    assert not gone, f"LAYERS names modules that no longer exist: {gone}"
    covered = {file.relative_to(ROOT).as_posix() for file in MODULES.values()} | NOT_MODULES
    loose = sorted(
        file.relative_to(ROOT).as_posix()
        for folder in ("service", "contracts")
        for file in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in file.parts and file.relative_to(ROOT).as_posix() not in covered
    )
    assert not loose, f"Python files in no package of pyproject's [tool.setuptools] packages: {loose}"
    assert all((ROOT / path).is_file() for path in NOT_MODULES), NOT_MODULES


def test_each_import_goes_to_the_same_layer_or_below() -> None:
    upward = [i for i in IMPORTS if LAYERS[i.target] > LAYERS[i.source]]
    new = sorted(
        f"{_where(i)}  ({LAYER_NAMES[LAYERS[i.source]]} -> {LAYER_NAMES[LAYERS[i.target]]})"
        for i in upward
        if (i.source, i.target) not in KNOWN_UPWARD
    )
    assert not new, "imports that go up a layer:\n" + "\n".join(new)
    stale = sorted(set(KNOWN_UPWARD) - {(i.source, i.target) for i in upward})
    assert not stale, f"KNOWN_UPWARD lists edges that are gone (remove them): {stale}"


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _a_cycle(component: list[str], edges: set[tuple[str, str]]) -> list[str]:
    """One cycle through the component's first module, for the message."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}

    def walk(node: str) -> bool:
        for a, b in sorted(edges):
            if a == node and b in members:
                if b == start:
                    return True
                if b not in seen:
                    seen.add(b)
                    path.append(b)
                    if walk(b):
                        return True
                    path.pop()
        return False

    walk(start)
    return [*path, start]


def test_no_import_cycle_in_the_runtime() -> None:
    """Imports that run in this process: statements at any depth and
    import_module calls. A module only named in a string is a dependency
    (the layer rule reads it) but not an import of this process: the bench
    runs `python -m holdfast.cli` as a child, which the CLI loaded."""
    runtime = {(i.source, i.target) for i in IMPORTS if not i.typing_only and i.how != "string"}
    edges = runtime - set(KNOWN_CYCLES)
    cycles = [" -> ".join(_a_cycle(component, edges)) for component in _cycles(edges)]
    assert not cycles, "import cycles (even a lazy import is one):\n" + "\n".join(cycles)
    stale = sorted(e for e in KNOWN_CYCLES if e not in runtime or not _cycles(edges | {e}))
    assert not stale, f"KNOWN_CYCLES lists edges that close no cycle any more (remove them): {stale}"


def _words(name: str) -> Iterator[str]:
    for part in re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower().split("_"):
        if part:
            yield part


def names_an_app_noun(name: str) -> bool:
    return any(word in APP_NOUNS or (word.endswith("s") and word[:-1] in APP_NOUNS) for word in _words(name))


def _names(text: str) -> Iterator[str]:
    """Every identifier a module binds or uses, and the identifier-like words of
    its string literals (SQL, messages, metadata keys), docstrings excepted:
    prose may explain a design with an app's example, code may not name one."""
    tree = ast.parse(text)
    prose = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
        elif isinstance(node, ast.arg):
            yield node.arg
        elif isinstance(node, ast.keyword) and node.arg:
            yield node.arg
        elif isinstance(node, ast.alias):
            yield (node.asname or node.name).rpartition(".")[2]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            yield from re.findall(r"[A-Za-z_][A-Za-z0-9_]*", node.value)


def test_nothing_below_the_apps_names_an_app_noun() -> None:
    below = {module for module, layer in LAYERS.items() if layer < APPS and module in MODULES}
    found = {module: frozenset(n for n in _names(MODULES[module].read_text()) if names_an_app_noun(n)) for module in below}
    new = {m: sorted(names - KNOWN_NOUNS.get(m, frozenset())) for m, names in sorted(found.items())}
    new = {m: names for m, names in new.items() if names}
    assert not new, "app nouns below the apps layer:\n" + "\n".join(f"{m}: {names}" for m, names in new.items())
    stale = {m: sorted(names - found.get(m, frozenset())) for m, names in KNOWN_NOUNS.items()}
    stale = {m: names for m, names in stale.items() if names}
    assert not stale, f"KNOWN_NOUNS lists names that are gone (remove them): {stale}"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("sku_id", True), ("SKUS", True), ("take_stock", True), ("Reservation", True), ("StockReply", True),
     ("_stored_stocks", True), ("WAYBILL", True), ("carriers", True), ("entity_id", False), ("Stocking", False),
     ("risky", False), ("task", False)],
)
def test_app_nouns_are_words_of_a_name(name: str, expected: bool) -> None:
    assert names_an_app_noun(name) is expected


def test_core_backends_and_server_type_check() -> None:
    """mypy, strict, over every module of the three lower layers (the
    settings: pyproject's [tool.mypy]; how: tests/typecheck.py). `make test`
    runs it first too, so a type error fails before the long suite."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.typecheck"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
