"""holdfast as a team gets it: the wheel, installed (not editable) into a
fresh virtual environment, used from a folder outside this repository.

A test that only ever runs in the checkout hides packaging bugs: a module or
a data file the wheel leaves out, a path relative to the repository, a
second top-level package. Here the tutorial's service (examples/tables, its
sources only: no generated code) is linted, generated, served with `holdfast
serve --app`, called, journaled and replayed, and its own tests run with the
plugin, all with the wheel's `holdfast` and nothing of the checkout on the path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.process import ROOT, STOP_TIMEOUT_S, free_port

TABLES = ROOT / "examples" / "tables"
# What a team writes; what holdfast generates is made again in the project.
SOURCES = ("protos", "sla.toml", "tables.py", "book.py", "test_tables.py", "workload.py", "test_workload.py",
           "pyproject.toml")
INSTALL_TIMEOUT_S = 600  # a fresh venv takes every dependency from the package index
RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
    )
    assert built.returncode == 0, built.stderr
    (found,) = out.glob("holdfast-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    """A fresh virtual environment with the wheel (and pytest, for the plugin)."""
    folder = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=RUN_TIMEOUT_S)
    installed = subprocess.run(
        [str(folder / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
         str(wheel), "pytest>=8", "pytest-asyncio>=1.0"],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return folder


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tutorial's service as a team's own folder: its sources, no generated code."""
    folder = tmp_path_factory.mktemp("team") / "tables"
    folder.mkdir()
    for name in SOURCES:
        source = TABLES / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, folder / name)
    return folder


def env() -> dict[str, str]:
    """No PYTHONPATH, no HOLDFAST_* settings: only the venv's own packages."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("HOLDFAST_", "PYTHON", "VIRTUAL_ENV"))}
    kept["PYTHONUNBUFFERED"] = "1"
    return kept


def run(venv: Path, command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / command), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env=env())


def test_the_distribution_installs_one_top_level_package_with_its_protos_and_types(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"holdfast"}
    for shipped in ("holdfast/py.typed", "holdfast/protos/holdfast/contract/v1/contract.proto",
                    "holdfast/protos/holdfast/inventory/v1/inventory.proto",
                    "holdfast/contract/v1/contract_pb2.py", "holdfast/inventory/v1/inventory_pb2.pyi",
                    "holdfast/generated/STAMP.json", "holdfast/generated/service_config.json",
                    "holdfast/contracts/sla.toml"):
        assert shipped in names, shipped


def test_import_holdfast_loads_no_app_and_edits_no_path(venv, tmp_path):
    code = (
        "import sys\n"
        "before = list(sys.path)\n"
        "import holdfast\n"
        "holdfast.Service, holdfast.Machine, holdfast.AppReason  # the public API, loaded on use\n"
        "apps = sorted(m for m in sys.modules if m.startswith(('holdfast.apps', 'holdfast.inventory', 'holdfast.fulfillment')))\n"
        "print(apps, sys.path == before)\n"
    )
    done = run(venv, "python", "-c", code, cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "[] True\n", "")
    fresh = run(venv, "python", "-c", "from holdfast.inventory.v1 import inventory_pb2; print(inventory_pb2.__name__)",
                cwd=tmp_path)
    assert (fresh.returncode, fresh.stdout) == (0, "holdfast.inventory.v1.inventory_pb2\n"), fresh.stderr


def test_doctor_passes_on_the_installed_package(venv, tmp_path):
    done = run(venv, "holdfast", "doctor", "--store", f"sqlite:///{tmp_path}/doctor.db", "--snapshot", "memory://",
               cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fresh, as installed" in done.stdout
    assert done.stdout.endswith("all 6 checks passed\n")


def test_a_teams_service_lints_generates_serves_journals_and_replays(venv, project, tmp_path):
    linted = run(venv, "holdfast", "lint", "protos", "--sla", "sla.toml", cwd=project)
    assert (linted.returncode, linted.stdout, linted.stderr) == (0, "", "")
    generated = run(venv, "holdfast", "codegen", "--protos", "protos", "--out", ".", cwd=project)
    assert generated.returncode == 0, generated.stderr
    assert "wrote restaurant/tables/v1/tables_pb2.py\n" in generated.stdout
    assert not (project / "holdfast").exists()  # the contract's module is the installed one
    fresh = run(venv, "holdfast", "lint", "protos", "--sla", "sla.toml", "--generated", ".", cwd=project)
    assert (fresh.returncode, fresh.stdout, fresh.stderr) == (0, "", "")
    for name in ("STAMP.json", "service_config.json", "restaurant/tables/v1/tables_pb2.py"):
        assert (project / name).read_bytes() == (TABLES / name).read_bytes(), f"{name} differs from the committed one"

    journal = tmp_path / "tables.jsonl"
    port = free_port()
    server = subprocess.Popen(
        [str(venv / "bin" / "holdfast"), "serve", "--app", "tables:Tables", "--listen", f"127.0.0.1:{port}",
         "--store", f"sqlite:///{tmp_path}/tables.db", "--journal", str(journal)],
        cwd=project, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
    )
    try:
        ready = server.stdout.readline()
        assert ready.startswith(f"holdfast serving restaurant.tables.v1.TableService on 127.0.0.1:{port} "), (
            ready + server.stderr.read() if server.poll() is not None else ready
        )
        slot_ms = 1_900_000_000_000
        for _ in range(2):
            booked = run(venv, "python", "book.py", f"127.0.0.1:{port}", "table-4", str(slot_ms), "2", "Ada", cwd=project)
            assert booked.returncode == 0, booked.stderr
            assert ": BOOKED table table-4 for 2 (Ada)" in booked.stdout
        assert refusal_of_an_unknown_booking(venv, project, port) == (
            "NOT_FOUND", "tables.restaurant.example", "BOOKING_NOT_FOUND",
        )
        server.send_signal(signal.SIGTERM)
        assert server.wait(STOP_TIMEOUT_S) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()
        server.stderr.close()

    calls = [line for line in map(json.loads, journal.read_text().splitlines()) if line["kind"] == "call"]
    assert [call["method"].rsplit("/", 1)[1] for call in calls] == ["Book", "Book", "Seat"]
    replayed = run(venv, "holdfast", "replay", str(journal), cwd=project)
    assert (replayed.returncode, replayed.stderr) == (0, ""), replayed.stdout
    assert replayed.stdout == f"replayed 3 calls and 0 timeouts from {journal} against a fresh embedded instance: identical\n"

    empty = tmp_path / "empty.jsonl"
    empty.write_text(journal.read_text().splitlines()[0] + "\n")  # the start line alone
    refused = run(venv, "holdfast", "replay", str(empty), cwd=project)
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr == f"holdfast replay: {empty} holds no calls: nothing to replay, so nothing was compared\n"


def refusal_of_an_unknown_booking(venv: Path, project: Path, port: int) -> tuple[str, str, str]:
    code = (
        "import grpc, holdfast\n"
        "from restaurant.tables.v1 import tables_pb2 as pb, tables_pb2_grpc as pb_grpc\n"
        f"with grpc.insecure_channel('127.0.0.1:{port}') as channel:\n"
        "    try:\n"
        "        pb_grpc.TableServiceStub(channel).Seat(pb.SeatRequest(booking_id='bk_nobody'), timeout=10)\n"
        "    except grpc.RpcError as error:\n"
        "        said = holdfast.refusal(error)\n"
        "        print(said.code.name, said.domain, said.reason)\n"
    )
    done = run(venv, "python", "-c", code, cwd=project)
    assert done.returncode == 0, done.stderr
    return tuple(done.stdout.split())


def test_the_teams_own_tests_pass_with_the_installed_plugin(venv, project):
    generated = run(venv, "holdfast", "codegen", "--protos", "protos", "--out", ".", cwd=project)
    assert generated.returncode == 0, generated.stderr
    done = run(venv, "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_doctor_finds_a_changed_installed_module_and_says_reinstall(venv, tmp_path):
    (site,) = (venv / "lib").glob("python3.*/site-packages")
    module = site / "holdfast" / "inventory" / "v1" / "inventory_pb2.py"
    original = module.read_bytes()
    module.write_bytes(original + b"# edited in site-packages\n")
    try:
        done = run(venv, "holdfast", "doctor", "--store", f"sqlite:///{tmp_path}/doctor.db", "--snapshot", "memory://",
                   cwd=tmp_path)
    finally:
        module.write_bytes(original)
    assert done.returncode == 1
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("FAIL  generated code")]
    assert f"{module}: changed since the last `holdfast codegen`" in row
    assert row.endswith("fix: reinstall holdfast (pip install --force-reinstall --no-deps holdfast): the installed copy was changed")
