"""`holdfast doctor`: a preflight before `holdfast serve`, one row per check.

What breaks a deployment is rarely the code: grpcio upgraded without
grpcio-tools, a protobuf runtime older than the generated code, generated
code older than its protos, a database or Redis the instance cannot reach.
Each of these would otherwise surface as an import error or a refused call
in production; here each is a row with what was found and how to fix it:

    ok    grpc packages    grpcio 1.85.1, grpcio-tools 1.85.1, ...
    FAIL  store            postgresql://127.0.0.1:1/x unreachable: ...  fix: ...

Checks run in the order a server starts: packages, generated code, store,
snapshot. Exit 0 only when every row is ok, 1 otherwise (2 for bad flags).
Every network check is bounded (a few seconds), so the doctor answers even
when a dependency does not.

Everything it reads is injected (`Packages` for installed versions, the
proto and generated folders), so a test can stage a broken toolchain or a
stale tree without touching the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sqlite3
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from holdfast.contracts import codegen
from holdfast.backends import open_store
from holdfast.store import SCHEMA_VERSION

GRPC_PACKAGES = ("grpcio", "grpcio-tools", "grpcio-status", "grpcio-health-checking", "grpcio-reflection")
PROBE_TIMEOUT_S = 5.0  # a dependency that takes longer than this to answer is down, for a preflight
CONNECT_TIMEOUT_S = 2  # libpq's connect_timeout: whole seconds, 2 at least
_GENCODE = re.compile(r"^# Protobuf Python Version: (\S+)$", re.MULTILINE)
_SPECIFIER = re.compile(r"^\s*(==|!=|<=|>=|<|>)\s*([0-9][0-9.]*)\s*$")


@dataclass(frozen=True, slots=True)
class Row:
    """One check's verdict; `fix` says what to do when it failed."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


class Packages:
    """Installed distributions, as importlib.metadata sees them. Tests pass a
    subclass to stage version mismatches without reinstalling anything."""

    def version(self, name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    def requires(self, name: str) -> list[str]:
        try:
            return metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            return []


@dataclass(frozen=True, slots=True)
class Tree:
    """Where the protos and the generated code are (the repository's by default)."""

    protos: Path = codegen.PROTOS
    generated: Path = codegen.GENERATED


# -- the checks, in start-up order ---------------------------------------------------


def check_grpc_packages(packages: Packages) -> Row:
    """grpcio and its companions move together (pyproject pins them so):
    grpcio-tools generated the code grpcio runs, and a mixed set loads fine
    and then fails on the first call that uses the odd one out."""
    found = {name: packages.version(name) for name in GRPC_PACKAGES}
    detail = ", ".join(f"{name} {found[name] or 'missing'}" for name in GRPC_PACKAGES)
    grpcio = found["grpcio"]
    odd = [name for name, version in found.items() if version != grpcio]
    if grpcio is not None and not odd:
        return Row("grpc packages", True, detail)
    target = found["grpcio-tools"] or grpcio or "VERSION"
    pins = " ".join(f"{name}=={target}" for name in GRPC_PACKAGES)
    if grpcio is None:
        return Row("grpc packages", False, detail, f"pip install {pins}")
    return Row("grpc packages", False, f"{', '.join(odd)} not at grpcio's {grpcio}: {detail}", f"pip install {pins}")


def check_protobuf(packages: Packages, tree: Tree) -> Row:
    """The protobuf runtime must satisfy grpcio-tools' requirement and be no
    older than the generated code (protobuf refuses to import it otherwise)."""
    runtime = packages.version("protobuf")
    if runtime is None:
        return Row("protobuf", False, "protobuf is not installed", "pip install -e . (pyproject pins protobuf)")
    problems: list[str] = []
    needs = [req for req in packages.requires("grpcio-tools") if _requirement_name(req) == "protobuf" and ";" not in req]
    for requirement in needs:
        if not _satisfies(runtime, requirement[len("protobuf"):]):
            problems.append(f"grpcio-tools {packages.version('grpcio-tools')} needs {requirement}")
    gencode = _gencode_versions(tree.generated)
    newest = max(gencode, key=_release, default=None)
    if newest is not None and _release(runtime) < _release(newest):
        problems.append(f"the generated code was made for protobuf {newest} or newer")
    seen = f"protobuf {runtime}" + (f", generated code for {newest}" if newest else "")
    if not problems:
        return Row("protobuf", True, seen + (f", {'; '.join(needs)} for grpcio-tools" if needs else ""))
    return Row("protobuf", False, f"{seen}: {'; '.join(problems)}", "pip install -e . (pyproject pins a matching protobuf)")


def check_stamp_toolchain(packages: Packages, tree: Tree) -> Row:
    """The generated code's stamp names the grpcio-tools and protobuf that
    made it; running with others is running code nobody generated."""
    try:
        stamp = json.loads((tree.generated / codegen.STAMP_NAME).read_text())
    except (OSError, ValueError) as error:
        return Row("generated with", False, f"cannot read the stamp: {error}", _regenerate())
    wrong = []
    for key, name in (("grpcio_tools", "grpcio-tools"), ("protobuf", "protobuf")):
        installed = packages.version(name)
        if stamp.get(key) != installed:
            wrong.append(f"{name} {installed or 'missing'} installed, code generated with {stamp.get(key)}")
    made = f"grpcio-tools {stamp.get('grpcio_tools')}, protobuf {stamp.get('protobuf')}"
    if not wrong:
        return Row("generated with", True, f"{made} (the installed ones)")
    fix = f"pip install grpcio-tools=={stamp.get('grpcio_tools')} protobuf=={stamp.get('protobuf')}"
    if codegen.is_checkout():
        fix += " (or run `holdfast codegen` with the installed ones and commit service/generated/)"
    return Row("generated with", False, "; ".join(wrong), fix)


def check_codegen(tree: Tree) -> Row:
    """contracts.codegen.check: the stamp matches every proto and generated
    file. Installed from the wheel, that is the shipped sources and modules
    against the hashes shipped with them; in a checkout, the working tree."""
    stale = codegen.check(protos=tree.protos, out=tree.generated)
    where = "in the checkout" if codegen.is_checkout() else "as installed"
    if not stale:
        return Row("generated code", True, f"fresh, {where} ({tree.generated})")
    more = f" (and {len(stale.reasons) - 1} more)" if len(stale.reasons) > 1 else ""
    return Row("generated code", False, f"stale: {stale.reasons[0]}{more}", _regenerate())


def _regenerate() -> str:
    """What fixes holdfast's own generated code: regenerating it in a
    checkout; installed, it is the wheel's, so reinstalling it."""
    if codegen.is_checkout():
        return "run `holdfast codegen` and commit service/generated/"
    return "reinstall holdfast (pip install --force-reinstall --no-deps holdfast): the installed copy was changed"


def check_store(url: str) -> Row:
    """The store of record answers, with its server version and holdfast schema."""
    try:
        store = open_store(url)
    except ValueError as error:
        return Row("store", False, str(error), "pass --store sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    from holdfast.sqlite import SqliteStore

    where = store.describe()
    probe = _sqlite if isinstance(store, SqliteStore) else _postgres
    try:
        detail = probe(store)
    except _StoreProblem as problem:
        return Row("store", False, f"{where}: {problem}", problem.fix)
    except Exception as error:  # noqa: BLE001 - any driver error is the row's answer
        fix = "start the database, or point --store / HOLDFAST_STORE at a reachable one"
        return Row("store", False, f"{where} unreachable: {_one_line(error)}", fix)
    return Row("store", True, f"{where}: {detail}")


def check_snapshot(url: str) -> Row:
    """The snapshot answers, with Redis' version (every node of a cluster)."""
    from holdfast.backends import open_snapshot
    from holdfast.memory_snapshot import MemorySnapshot

    try:
        snapshot = open_snapshot(url)
    except ValueError as error:
        return Row("snapshot", False, str(error), "pass --snapshot memory:// or redis://HOST:PORT[/DB]")
    where = snapshot.describe()
    if isinstance(snapshot, MemorySnapshot):
        return Row("snapshot", True, f"{where}: in-process map (one instance only)")
    try:
        versions = asyncio.run(asyncio.wait_for(_redis_versions(snapshot), PROBE_TIMEOUT_S))
    except Exception as error:  # noqa: BLE001 - any client error is the row's answer
        fix = "start Redis, or point --snapshot / HOLDFAST_SNAPSHOT at a reachable one (memory:// for one instance)"
        return Row("snapshot", False, f"{where} unreachable: {_one_line(error) or type(error).__name__}", fix)
    return Row("snapshot", True, f"{where}: Redis {', '.join(sorted(set(versions)))}")


# -- running and printing ------------------------------------------------------------


def run(store: str, snapshot: str, packages: Packages | None = None, tree: Tree | None = None) -> list[Row]:
    """Every check's row, in start-up order."""
    packages = packages or Packages()
    tree = tree or Tree()
    checks: list[Callable[[], Row]] = [
        lambda: check_grpc_packages(packages),
        lambda: check_protobuf(packages, tree),
        lambda: check_stamp_toolchain(packages, tree),
        lambda: check_codegen(tree),
        lambda: check_store(store),
        lambda: check_snapshot(snapshot),
    ]
    return [check() for check in checks]


def render(rows: Sequence[Row]) -> str:
    """One line per row: name, ok/FAIL, detail, and the fix of a failure."""
    width = max(len(row.name) for row in rows)
    lines = []
    for row in rows:
        line = f"{'ok' if row.ok else 'FAIL':<4}  {row.name:<{width}}  {row.detail}"
        lines.append(line if row.ok else f"{line}  fix: {row.fix}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, packages: Packages | None = None, tree: Tree | None = None) -> int:
    """`holdfast doctor [--store URL] [--snapshot URL]`: exit 0 when every check passes."""
    from holdfast.server import Config

    parser = argparse.ArgumentParser(prog="holdfast doctor", description="Preflight: versions, generated code, store, snapshot.")
    parser.add_argument("--store", default=os.environ.get("HOLDFAST_STORE", Config().store), help="store URL as for serve")
    parser.add_argument("--snapshot", default=os.environ.get("HOLDFAST_SNAPSHOT", Config().snapshot), help="snapshot URL as for serve")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rows = run(args.store, args.snapshot, packages, tree)
    print(render(rows))
    failed = sum(not row.ok for row in rows)
    print(f"{failed} of {len(rows)} checks failed" if failed else f"all {len(rows)} checks passed")
    return 1 if failed else 0


# -- probes ------------------------------------------------------------------------------


class _StoreProblem(Exception):
    """The store answered, but something about it is wrong."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


def _sqlite(store) -> str:
    """Opened read-only: the doctor never creates or migrates the file."""
    path = Path(store.path)
    version = f"SQLite {sqlite3.sqlite_version}"
    if not path.exists():
        folder = path.resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise _StoreProblem(f"{folder} is not a writable folder", "create the folder, or pick another --store path")
        return f"{version}; no database yet, `holdfast serve` creates it in {folder}"
    with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=PROBE_TIMEOUT_S) as db:
        return f"{version}; {_schema(db.execute)}"


def _postgres(store) -> str:
    import psycopg

    options = f"-c statement_timeout={int(PROBE_TIMEOUT_S * 1000)}"
    with psycopg.connect(store.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, options=options) as db:
        version = db.execute("SHOW server_version").fetchone()[0]
        return f"PostgreSQL {version}; {_schema(db.execute)}"


def _schema(execute) -> str:
    """The holdfast schema stamped in the database; newer than ours is refused
    at start-up, so it is a failure here too."""
    try:
        found = execute("SELECT max(version) FROM holdfast_schema").fetchone()[0]
    except Exception:  # noqa: BLE001 - no table yet: a database holdfast never opened
        return "no holdfast tables yet"
    if found is not None and found > SCHEMA_VERSION:
        raise _StoreProblem(f"schema version {found} is newer than this holdfast's {SCHEMA_VERSION}", "upgrade holdfast")
    return f"holdfast schema {found}"


async def _redis_versions(snapshot) -> list[str]:
    """INFO server of the one Redis, or of every node of a cluster."""
    try:
        info = await snapshot.client.info("server")
    finally:
        await snapshot.client.aclose()
    if "redis_version" in info:
        return [str(info["redis_version"])]
    return [str(node["redis_version"]) for node in info.values()]


# -- small helpers ----------------------------------------------------------------------


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower()


def _satisfies(version: str, specifiers: str) -> bool:
    """`version` against comma-separated `<`, `<=`, `>`, `>=`, `==`, `!=`
    release specifiers (all pyproject and grpcio-tools use); an operator this
    does not read counts as satisfied rather than a false alarm."""
    have = _release(version)
    for part in specifiers.split(","):
        match = _SPECIFIER.match(part)
        if match is None:
            continue
        op, want = match[1], _release(match[2])
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        ok = {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
        if not ok:
            return False
    return True


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "7.36.2rc1" -> (7, 36, 2)."""
    numbers = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        numbers.append(int(digits[0]))
        if digits[0] != piece:
            break
    return tuple(numbers)


def _gencode_versions(generated: Path) -> list[str]:
    found = []
    for path in sorted(generated.rglob("*_pb2.py")):
        match = _GENCODE.search(path.read_text(encoding="utf-8", errors="replace")[:2000])
        if match:
            found.append(match[1])
    return found


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300]


if __name__ == "__main__":
    sys.exit(main())
