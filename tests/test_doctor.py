"""`holdfast doctor` (service/doctor.py): passes on the repository with the
embedded backends and with real PostgreSQL and Redis, and fails with a clear
row, quickly, on each thing it exists to catch. Broken toolchains are staged
by injecting `Packages`; a stale tree is a copy with a touched proto; an
unreachable dependency is a closed port on 127.0.0.1."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from holdfast.contracts import codegen
from holdfast import doctor
from holdfast.server import Config, start
from tests.process import free_port
from tests.support import BUILT_IN_APPS

FAIL_WITHIN_S = 5.0  # the bound the doctor promises for a failing check
CHECKS = ["grpc packages", "protobuf", "generated with", "generated code", "store", "snapshot"]


class Staged(doctor.Packages):
    """The installed packages, with some versions replaced."""

    def __init__(self, **versions: str) -> None:
        self.staged = {name.replace("_", "-"): version for name, version in versions.items()}

    def version(self, name: str) -> str | None:
        return self.staged.get(name, super().version(name))


def diagnose(capsys, *argv: str, **kwargs) -> tuple[int, dict[str, str]]:
    """Runs the doctor; returns its exit code and its printed rows by check name."""
    code = doctor.main(list(argv), **kwargs)
    out = capsys.readouterr().out
    *lines, summary = out.splitlines()
    rows = {}
    for line in lines:
        status = line.split()[0]
        assert status in ("ok", "FAIL"), line
        assert ("  fix: " in line) == (status == "FAIL"), f"a failure and only a failure names its fix: {line}"
        rows[next(name for name in CHECKS if line[6:].startswith(name + " "))] = line
    failed = sum(line.startswith("FAIL") for line in lines)
    assert summary == (f"{failed} of {len(lines)} checks failed" if failed else f"all {len(lines)} checks passed")
    return code, rows


def only_failure(rows: dict[str, str]) -> str:
    failed = [name for name, line in rows.items() if line.startswith("FAIL")]
    assert len(failed) == 1, "\n".join(rows.values())
    return rows[failed[0]]


def embedded(tmp_path: Path) -> list[str]:
    return ["--store", f"sqlite:///{tmp_path}/holdfast.db", "--snapshot", "memory://"]


# -- passing -------------------------------------------------------------------


def test_passes_on_the_repository_with_sqlite_and_memory(tmp_path, capsys):
    code, rows = diagnose(capsys, *embedded(tmp_path))
    assert code == 0, "\n".join(rows.values())
    assert list(rows) == CHECKS
    assert "SQLite " in rows["store"] and "no database yet" in rows["store"]
    assert not (tmp_path / "holdfast.db").exists()  # the doctor creates nothing


async def test_reads_the_schema_of_a_database_a_server_made(tmp_path, capsys):
    running = await start(Config(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/holdfast.db", apps=BUILT_IN_APPS))
    await running.stop(0)
    code, rows = diagnose(capsys, *embedded(tmp_path))
    assert code == 0 and f"holdfast schema {doctor.SCHEMA_VERSION}" in rows["store"]


def test_passes_with_postgres_and_redis(postgres_url, redis_url, capsys):
    code, rows = diagnose(capsys, "--store", postgres_url, "--snapshot", redis_url)
    assert code == 0, "\n".join(rows.values())
    assert "PostgreSQL " in rows["store"] and "no holdfast tables yet" in rows["store"]
    assert ": Redis " in rows["snapshot"]


def test_passes_with_a_redis_cluster(tmp_path, redis_cluster_url, capsys):
    code, rows = diagnose(capsys, "--store", f"sqlite:///{tmp_path}/h.db", "--snapshot", redis_cluster_url)
    assert code == 0, "\n".join(rows.values())
    assert ": Redis " in rows["snapshot"]


def test_urls_default_to_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOLDFAST_STORE", f"sqlite:///{tmp_path}/from-env.db")
    monkeypatch.setenv("HOLDFAST_SNAPSHOT", "memory://")
    code, rows = diagnose(capsys)
    assert code == 0 and "from-env.db" in rows["store"]


# -- failing, one row each -----------------------------------------------------------


def timed(capsys, *argv: str, **kwargs) -> tuple[int, dict[str, str]]:
    started = time.monotonic()
    result = diagnose(capsys, *argv, **kwargs)
    assert time.monotonic() - started < FAIL_WITHIN_S
    return result


def test_fails_on_grpcio_and_grpcio_tools_at_different_versions(tmp_path, capsys):
    installed = doctor.Packages().version("grpcio")
    code, rows = timed(capsys, *embedded(tmp_path), packages=Staged(grpcio_tools="1.80.0"))
    assert code == 1
    line = rows["grpc packages"]
    assert line.startswith("FAIL") and f"grpcio-tools not at grpcio's {installed}" in line
    assert "grpcio-tools 1.80.0" in line and "fix: pip install grpcio==1.80.0 grpcio-tools==1.80.0" in line
    # The stamp names the grpcio-tools that made the code, so that row fails too.
    assert rows["generated with"].startswith("FAIL") and "grpcio-tools 1.80.0 installed" in rows["generated with"]


def test_fails_on_a_missing_grpcio(tmp_path, capsys):
    code, rows = timed(capsys, *embedded(tmp_path), packages=Staged(grpcio=None))
    assert code == 1 and rows["grpc packages"].startswith("FAIL") and "grpcio missing" in rows["grpc packages"]


def test_fails_on_a_protobuf_older_than_the_generated_code(tmp_path, capsys):
    gencode = max(doctor._gencode_versions(codegen.GENERATED), key=doctor._release)
    code, rows = timed(capsys, *embedded(tmp_path), packages=Staged(protobuf="1.0.0"))
    assert code == 1
    assert rows["protobuf"].startswith("FAIL  protobuf        protobuf 1.0.0")
    assert f"made for protobuf {gencode} or newer" in rows["protobuf"]
    assert f"grpcio-tools {doctor.Packages().version('grpcio-tools')} needs protobuf" in rows["protobuf"]


def test_fails_on_a_stale_stamp(tmp_path, capsys):
    ignore = shutil.ignore_patterns("__pycache__")
    tree = doctor.Tree(tmp_path / "protos", tmp_path / "generated")
    shutil.copytree(codegen.PROTOS, tree.protos, ignore=ignore)
    shutil.copytree(codegen.GENERATED, tree.generated, ignore=ignore)
    code, rows = diagnose(capsys, *embedded(tmp_path), tree=tree)
    assert code == 0, "an untouched copy is fresh"

    touched = tree.protos / "holdfast/inventory/v1/inventory.proto"
    with touched.open("a") as proto:
        proto.write("// touched\n")
    code, rows = timed(capsys, *embedded(tmp_path), tree=tree)
    assert code == 1
    line = only_failure(rows)
    assert line.startswith("FAIL  generated code") and f"{touched}: changed" in line
    assert "fix: run `holdfast codegen`" in line


def test_fails_on_an_unreachable_postgres(capsys):
    port = free_port()
    code, rows = timed(capsys, "--store", f"postgresql://postgres@127.0.0.1:{port}/x", "--snapshot", "memory://")
    assert code == 1
    line = only_failure(rows)
    assert line.startswith("FAIL  store") and f"@127.0.0.1:{port}/x unreachable: " in line
    assert "fix: start the database" in line


def test_fails_on_an_unreachable_redis(tmp_path, capsys):
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, rows = timed(capsys, "--store", f"sqlite:///{tmp_path}/h.db", "--snapshot", url)
    assert code == 1
    line = only_failure(rows)
    assert line.startswith("FAIL  snapshot") and f"{url} unreachable" in line
    assert "fix: start Redis" in line


@pytest.mark.parametrize(
    ("store", "words"),
    [("mysql://x", "unsupported store URL"), ("sqlite:///{tmp}/no/such/folder/h.db", "is not a writable folder")],
)
def test_fails_on_a_store_url_serve_could_not_use(tmp_path, capsys, store, words):
    code, rows = timed(capsys, "--store", store.format(tmp=tmp_path), "--snapshot", "memory://")
    assert code == 1 and words in only_failure(rows)


def test_fails_on_a_database_with_a_newer_schema(tmp_path, capsys):
    with sqlite3.connect(tmp_path / "holdfast.db") as db:
        db.execute("CREATE TABLE holdfast_schema (version INTEGER NOT NULL)")
        db.execute("INSERT INTO holdfast_schema VALUES (99)")
    db.close()
    code, rows = timed(capsys, *embedded(tmp_path))
    assert code == 1
    line = only_failure(rows)
    assert "schema version 99 is newer" in line and "fix: upgrade holdfast" in line


def test_fails_on_a_bad_snapshot_url(tmp_path, capsys):
    code, rows = timed(capsys, "--store", f"sqlite:///{tmp_path}/h.db", "--snapshot", "memcached://x")
    assert code == 1 and "unsupported snapshot URL" in only_failure(rows)


# -- the pieces ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "specifiers", "ok"),
    [
        ("7.36.2", "<8.0.0,>=7.35.1", True),
        ("7.35.1", ">=7.35.1", True),
        ("7.35.0", ">=7.35.1", False),
        ("8.0.0", "<8.0.0", False),
        ("1.85.1", "==1.85.1", True),
        ("1.85", "==1.85.0", True),
        ("1.85.1", "!=1.85.1", False),
        ("7.36.2rc1", ">=7.36.2", True),
        ("1.0", "~=1.0", True),  # unread operators never raise a false alarm
    ],
)
def test_specifiers(version, specifiers, ok):
    assert doctor._satisfies(version, specifiers) is ok
