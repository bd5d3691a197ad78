"""The examples (examples/) and their tutorials (docs/): built on the public
API alone, quoted verbatim by the tutorial, and run the way it says.

The examples' own tests (examples/*/test_*.py) are collected with these:
pyproject.toml's pytest `testpaths` names both folders.
"""

from __future__ import annotations

import ast
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import holdfast
from holdfast import derive_id, idempotency_key
from tests.process import ROOT, START_TIMEOUT_S, STOP_TIMEOUT_S, child_env, free_port, holdfast_command, run_holdfast

EXAMPLES = ROOT / "examples"
TUTORIAL = ROOT / "docs" / "build-a-service.md"
TABLES = EXAMPLES / "tables"
# What an example may import of holdfast: the public API, and holdfast's
# contract option (which a team's generated modules import).
# holdfast.workload is the simulation's public module (`holdfast simulate --app`),
# as the pytest plugin is the tests': a team's workload imports it.
PUBLIC = frozenset({"holdfast", "holdfast.contract.v1", "holdfast.workload"})
HOLDFAST_PACKAGES = frozenset({"holdfast", "tests"})
# A fenced block quoted from a file: the line `<!-- from PATH -->`, then the block.
QUOTE = re.compile(r"^<!-- from (?P<path>\S+) -->\n```[\w-]*\n(?P<text>.*?)^```$", re.MULTILINE | re.DOTALL)
PYTHON_BLOCK = re.compile(r"^```python\n", re.MULTILINE)


def holdfast_imports(source: str) -> set[str]:
    """The modules of holdfast's own packages that `source` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in HOLDFAST_PACKAGES:  # from holdfast import Service, store
                found.update(node.module if alias.name in getattr(holdfast, "__all__", ()) and node.module == "holdfast"
                             else f"{node.module}.{alias.name}" for alias in node.names)
            elif node.module.split(".")[0] in HOLDFAST_PACKAGES:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] in HOLDFAST_PACKAGES)
    return found


def example_modules() -> list[Path]:
    """Every Python file of the examples, generated code included."""
    return sorted(p for p in EXAMPLES.rglob("*.py") if "__pycache__" not in p.parts)


# -- the examples use the public API and nothing else of holdfast's -------------------------


@pytest.mark.parametrize(("source", "imported"), [
    ("from holdfast import Service, Change", {"holdfast"}),
    ("from holdfast.framework import Service", {"holdfast.framework"}),
    ("from holdfast import framework", {"holdfast.framework"}),
    ("from holdfast.contract.v1 import contract_pb2", {"holdfast.contract.v1"}),
    ("from holdfast import store, engine", {"holdfast.store", "holdfast.engine"}),
    ("from holdfast.store import Entity", {"holdfast.store"}),
    ("import holdfast.gateway.sub as g", {"holdfast.gateway.sub"}),
    ("from holdfast.contracts.contract import Contract", {"holdfast.contracts.contract"}),
    ("from tests.process import ROOT", {"tests.process"}),
    ("from .tables import Tables\nfrom tables import Tables", set()),
    ("import servicex\nfrom restaurant.tables.v1 import tables_pb2", set()),
    ("def f():\n    from holdfast.engine import Engine", {"holdfast.engine"}),
])
def test_the_import_check_sees_every_spelling(source, imported):
    assert holdfast_imports(source) == imported


def test_the_examples_are_there():
    names = {p.relative_to(EXAMPLES).as_posix() for p in example_modules()}
    assert {"tables/tables.py", "tables/book.py", "tables/test_tables.py",
            "tables/restaurant/tables/v1/tables_pb2.py"} <= names


@pytest.mark.parametrize("path", example_modules(), ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_the_examples_import_only_the_public_api(path: Path):
    imported = holdfast_imports(path.read_text())
    assert imported <= PUBLIC, f"{path.relative_to(ROOT)} imports {sorted(imported - PUBLIC)}"


# -- the tutorial quotes the example as it is ---------------------------------------------------


def quotes() -> list[tuple[str, str]]:
    return [(m["path"], m["text"]) for m in QUOTE.finditer(TUTORIAL.read_text())]


def test_the_tutorial_quotes_the_example_and_every_python_block_is_a_quote():
    text = TUTORIAL.read_text()
    quoted = quotes()
    assert len(quoted) >= 10
    python_quotes = [m for m in QUOTE.finditer(text) if m.group(0).split("\n")[1] == "```python"]
    assert len(PYTHON_BLOCK.findall(text)) == len(python_quotes), "a ```python block without `<!-- from PATH -->`"
    assert {path for path, _ in quoted} == {
        "examples/tables/protos/restaurant/tables/v1/tables.proto",
        "examples/tables/sla.toml",
        "examples/tables/tables.py",
        "examples/tables/test_tables.py",
        "service/apps/inventory_store.py",  # a table of an app's own, as the inventory declares its stock
    }


@pytest.mark.parametrize(("path", "block"), quotes(), ids=[f"{p}-{i}" for i, (p, _) in enumerate(quotes())])
def test_each_quote_is_verbatim_in_its_file(path: str, block: str):
    assert block.strip(), f"an empty quote of {path}"
    assert block in (ROOT / path).read_text(), f"docs/build-a-service.md quotes {path} as it no longer is:\n{block}"


def test_the_tutorials_diagram_is_the_machine_drawn():
    diagram = TUTORIAL.read_text().split("```mermaid\n", 1)[1].split("```", 1)[0]
    done = run_holdfast("graph", "tables:BOOKING", cwd=TABLES)
    assert done.returncode == 0, done.stderr
    assert diagram == done.stdout


def test_the_readme_links_the_tutorial():
    assert "(docs/build-a-service.md)" in (ROOT / "README.md").read_text()


# -- run as the tutorial runs it ------------------------------------------------------------------


def test_the_example_serves_books_replays_and_stops(tmp_path):
    port = free_port()
    store = f"sqlite:///{tmp_path}/tables.db"
    journal = tmp_path / "tables.jsonl"
    server = subprocess.Popen(
        [*holdfast_command(), "serve", "--app", "tables:Tables", "--listen", f"127.0.0.1:{port}",
         "--store", store, "--journal", str(journal)],
        cwd=TABLES, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
    )
    watchdog = threading.Timer(START_TIMEOUT_S + STOP_TIMEOUT_S + 60, server.kill)
    watchdog.start()
    try:
        ready = server.stdout.readline()
        assert ready == (
            f"holdfast serving restaurant.tables.v1.TableService on 127.0.0.1:{port}"
            f" (store {store}, snapshot memory://)\n"
        ), ready
        hour_ms = 60 * 60 * 1000
        slot_ms = (time.time_ns() // 1_000_000 // hour_ms + 24) * hour_ms  # a whole hour, tomorrow
        booking_id = derive_id("bk", idempotency_key("/restaurant.tables.v1.TableService/Book", ("table-4", slot_ms)))
        line = (f"{booking_id}: BOOKED table table-4 for 2 (Ada) at {slot_ms} ms,"
                f" no-show at {slot_ms + 15 * 60 * 1000} ms (version 1)\n")
        for _ in range(2):  # the second is replayed: the same answer
            done = book(port, "table-4", slot_ms, 2, "Ada")
            assert (done.returncode, done.stdout, done.stderr) == (0, line, "")
        done = book(port, "table-4", slot_ms, 4, "Grace")
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr == "Book failed: ALREADY_EXISTS: this idempotency key was used with another request\n"

        server.send_signal(signal.SIGTERM)
        assert server.wait(STOP_TIMEOUT_S) == 0
        assert server.stdout.read() == "holdfast stopped\n"

        # Its journal holds the three Book calls and replays them, byte for byte, on a fresh instance.
        replayed = run_holdfast("replay", str(journal), cwd=TABLES)
        assert (replayed.returncode, replayed.stderr) == (0, ""), replayed.stdout
        assert replayed.stdout == (
            f"replayed 3 calls and 0 timeouts from {journal} against a fresh embedded instance: identical\n"
        )
    finally:
        watchdog.cancel()
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()
        server.stderr.close()


def book(port: int, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "book.py", f"127.0.0.1:{port}", *map(str, args)],
        cwd=TABLES, capture_output=True, text=True, timeout=60, env=child_env(),
    )


def test_replay_refuses_a_journal_with_no_calls(tmp_path):
    journal = tmp_path / "empty.jsonl"
    journal.write_text('{"kind":"start","format":2,"services":[],"apps":["tables:Tables"],"hosted":[]}\n')
    done = run_holdfast("replay", str(journal), cwd=TABLES)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"holdfast replay: {journal} holds no calls: nothing to replay, so nothing was compared\n"


def test_replay_names_the_app_it_cannot_host(tmp_path):
    """From a folder where the journal's app does not import, replay says so
    and sends nothing (exit 2), rather than answering every call UNIMPLEMENTED."""
    journal = tmp_path / "tables.jsonl"
    call = {"kind": "call", "method": "/restaurant.tables.v1.TableService/GetBooking", "time_ms": 1,
            "request": "", "code": "INVALID_ARGUMENT"}
    journal.write_text(
        '{"kind":"start","format":2,"services":[],"apps":["tables:Tables"],'
        '"hosted":["restaurant.tables.v1.TableService"]}\n' + json.dumps(call) + "\n"
    )
    done = run_holdfast("replay", str(journal), cwd=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("holdfast replay: cannot host what the journal was recorded with: cannot load 'tables:Tables'")
