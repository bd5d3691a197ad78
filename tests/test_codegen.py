"""Generated code and its freshness stamp: `holdfast codegen --check` on the
repository, and `contracts.codegen.check` / `generate` on copies in a temporary
folder (the real tree is only ever read)."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from holdfast.contracts import codegen
from holdfast import cli
from tests.process import ROOT, run_holdfast

INVENTORY = Path("holdfast/inventory/v1/inventory.proto")
INVENTORY_PB2 = Path("holdfast/inventory/v1/inventory_pb2.py")


@pytest.fixture
def copies(tmp_path) -> tuple[Path, Path]:
    """Copies of protos/ and service/generated/ (without bytecode caches)."""
    protos, out = tmp_path / "protos", tmp_path / "generated"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(codegen.PROTOS, protos, ignore=ignore)
    shutil.copytree(codegen.GENERATED, out, ignore=ignore)
    return protos, out


def test_the_committed_code_is_fresh():
    stale = codegen.check()
    assert not stale, "\n".join(stale.reasons)
    assert stale.files == () and stale.reasons == ()


def test_cli_check_passes_on_the_repository_and_prints_fresh():
    done = run_holdfast("codegen", "--check", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "fresh" in done.stdout
    assert "stale" not in done.stderr


def test_cli_check_does_not_depend_on_the_working_directory(tmp_path):
    done = run_holdfast("codegen", "--check", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "fresh" in done.stdout


def test_an_untouched_copy_is_fresh(copies):
    protos, out = copies
    assert not codegen.check(protos=protos, out=out)


def test_a_touched_proto_is_stale_and_named(copies):
    protos, out = copies
    with (protos / INVENTORY).open("a") as proto:
        proto.write("// touched\n")
    stale = codegen.check(protos=protos, out=out)
    assert stale
    assert stale.files == (str(protos / INVENTORY),)
    assert len(stale.reasons) == 1
    assert str(protos / INVENTORY) in stale.reasons[0] and "changed" in stale.reasons[0]


def test_cli_check_exits_1_naming_a_touched_proto(copies, monkeypatch, capsys):
    """`holdfast codegen --check` (in process, its check pointed at the copies)."""
    protos, out = copies
    monkeypatch.setattr(codegen, "check", functools.partial(codegen.check, protos=protos, out=out))
    assert cli.main(["codegen", "--check"]) == 0
    assert "fresh" in capsys.readouterr().out

    with (protos / INVENTORY).open("a") as proto:
        proto.write("// touched\n")
    assert cli.main(["codegen", "--check"]) == 1
    printed = capsys.readouterr()
    assert "fresh" not in printed.out
    assert str(protos / INVENTORY) in printed.err
    assert printed.err.startswith("stale: ")


def test_a_new_or_removed_proto_is_stale(copies):
    protos, out = copies
    extra = protos / "holdfast/inventory/v1/extra.proto"
    extra.write_text('syntax = "proto3";\npackage holdfast.inventory.v1;\n')
    stale = codegen.check(protos=protos, out=out)
    assert stale.files == (str(extra),) and "added" in stale.reasons[0]

    extra.unlink()
    (protos / INVENTORY).unlink()
    stale = codegen.check(protos=protos, out=out)
    assert stale.files == (str(protos / INVENTORY),) and "removed" in stale.reasons[0]


def test_a_missing_stamp_is_stale(copies):
    protos, out = copies
    (out / codegen.STAMP_NAME).unlink()
    stale = codegen.check(protos=protos, out=out)
    assert stale and stale.files == (str(out / codegen.STAMP_NAME),)


def test_generate_makes_a_touched_copy_fresh_again(copies):
    protos, out = copies
    with (protos / INVENTORY).open("a") as proto:
        proto.write("// touched\n")
    assert codegen.check(protos=protos, out=out)

    written = codegen.generate(protos=protos, out=out)
    assert out / INVENTORY_PB2 in written
    assert all(path.is_relative_to(out) for path in written)
    stale = codegen.check(protos=protos, out=out)
    assert not stale, "\n".join(stale.reasons)
    # A comment changes no generated code.
    assert (out / INVENTORY_PB2).read_bytes() == (codegen.GENERATED / INVENTORY_PB2).read_bytes()


def test_generating_from_the_same_sources_reproduces_the_committed_code(copies):
    protos, out = copies
    codegen.generate(protos=protos, out=out)
    assert not codegen.check(protos=protos, out=out)
    for path in sorted(codegen.GENERATED.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            relative = path.relative_to(codegen.GENERATED)
            assert (out / relative).read_bytes() == path.read_bytes(), f"{relative} differs when regenerated"


def test_a_hand_edited_generated_file_is_stale(copies):
    protos, out = copies
    codegen.generate(protos=protos, out=out)
    assert not codegen.check(protos=protos, out=out)

    with (out / INVENTORY_PB2).open("a") as generated:
        generated.write("# edited by hand\n")
    stale = codegen.check(protos=protos, out=out)
    assert stale
    assert stale.files == (str(out / INVENTORY_PB2),)
    assert "changed" in stale.reasons[0]


def test_a_stray_module_beside_the_generated_ones_is_stale(copies):
    protos, out = copies
    stray = out / "holdfast/inventory/v1/stray_pb2.py"
    stray.write_text("# not generated\n")
    stale = codegen.check(protos=protos, out=out)
    assert stale.files == (str(stray),) and "added" in stale.reasons[0]


def test_the_real_tree_is_untouched_by_these_tests():
    # check() on the repository stays fresh after the copies were regenerated and edited.
    assert not codegen.check()
    assert codegen.PROTOS == ROOT / "protos" and codegen.GENERATED == ROOT / "service" / "generated"
    assert codegen.OWN_CODE == codegen.GENERATED and codegen.is_checkout()


# -- a team's own protos: --protos DIR --out DIR ------------------------------------

EXAMPLE = ROOT / "examples" / "tables"
TABLES = Path("restaurant/tables/v1/tables.proto")
TABLES_PB2 = Path("restaurant/tables/v1/tables_pb2.py")


@pytest.fixture
def team(tmp_path) -> tuple[Path, Path]:
    """A copy of the tables example's protos, and a folder to generate into."""
    protos = tmp_path / "protos"
    shutil.copytree(EXAMPLE / "protos", protos, ignore=shutil.ignore_patterns("__pycache__"))
    return protos, tmp_path / "generated"


def test_a_teams_protos_generate_only_their_own_files(team):
    protos, out = team
    written = codegen.generate(protos=protos, out=out)
    assert [path.relative_to(out).as_posix() for path in written] == [
        "restaurant/__init__.py",
        "restaurant/tables/__init__.py",
        "restaurant/tables/v1/__init__.py",
        "restaurant/tables/v1/tables_pb2.py",
        "restaurant/tables/v1/tables_pb2.pyi",
        "restaurant/tables/v1/tables_pb2_grpc.py",
        "service_config.json",
    ]
    # holdfast.contract.v1 is holdfast's own, installed with it; `out` is an import root, not a package.
    assert not (out / "holdfast").exists()
    assert not (out / "__init__.py").exists()
    assert not codegen.check(protos=protos, out=out)


def test_generating_into_a_projects_root_touches_nothing_else(team):
    """`--out .` in a team's project: its own modules, its virtualenv's
    protoc output and a file beside the protos stay as they were."""
    protos, root = team[0], team[0].parent
    (root / "app.py").write_text("# the team's own\n")
    venv = root / ".venv/lib/site-packages/other/v1"
    venv.mkdir(parents=True)
    (venv / "other_pb2.py").write_text("# someone else's generated code\n")
    (root / "restaurant").mkdir()
    (root / "restaurant/__init__.py").write_text('"""The team package."""\n')
    codegen.generate(protos=protos, out=root)
    codegen.generate(protos=protos, out=root)  # again: removes and rewrites its own modules only
    assert (root / "app.py").read_text() == "# the team's own\n"
    assert (venv / "other_pb2.py").read_text() == "# someone else's generated code\n"
    assert (root / "restaurant/__init__.py").read_text() == '"""The team package."""\n'
    assert not codegen.check(protos=protos, out=root)


def test_the_examples_committed_code_is_what_codegen_makes(team):
    protos, out = team
    codegen.generate(protos=protos, out=out)
    made = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert [p.as_posix() for p in made] == [
        "STAMP.json", "restaurant/__init__.py", "restaurant/tables/__init__.py", "restaurant/tables/v1/__init__.py",
        "restaurant/tables/v1/tables_pb2.py", "restaurant/tables/v1/tables_pb2.pyi",
        "restaurant/tables/v1/tables_pb2_grpc.py", "service_config.json",
    ]
    for relative in made:
        assert (out / relative).read_bytes() == (EXAMPLE / relative).read_bytes(), f"{relative} differs when regenerated"


def test_a_teams_generated_package_imports_in_a_fresh_interpreter(team):
    """From its import root, with nothing imported first: its modules import
    holdfast's contract option, installed with holdfast; no sys.path edit."""
    protos, out = team
    codegen.generate(protos=protos, out=out)
    code = (
        "import sys\n"
        "before = list(sys.path)\n"
        "from restaurant.tables.v1 import tables_pb2, tables_pb2_grpc\n"
        "assert sys.path == before\n"
        "from holdfast.contract.v1 import contract_pb2\n"
        "method = tables_pb2.DESCRIPTOR.services_by_name['TableService'].methods_by_name['Book']\n"
        "print(list(method.GetOptions().Extensions[contract_pb2.contract].idempotency_key))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "['table_id', 'slot_start_ms']\n"


def test_cli_checks_the_example_with_protos_and_out():
    done = run_holdfast(
        "codegen", "--protos", "protos", "--out", ".", "--check", cwd=EXAMPLE
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "generated code is fresh (.)\n"


def test_cli_generates_and_checks_a_teams_tree(team, capsys, monkeypatch):
    protos, out = team
    monkeypatch.chdir(protos.parent)
    args = ["codegen", "--protos", "protos", "--out", "generated"]
    assert cli.main(args) == 0
    assert "wrote generated/restaurant/tables/v1/tables_pb2.py\n" in capsys.readouterr().out
    assert cli.main([*args, "--check"]) == 0
    assert capsys.readouterr().out == "generated code is fresh (generated)\n"

    with (protos / TABLES).open("a") as proto:
        proto.write("// touched\n")
    assert cli.main([*args, "--check"]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err == f"stale: {protos / TABLES}: changed since the last `holdfast codegen`\n"
    # The default tree is untouched by all of this.
    assert not codegen.check()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--protos", "protos"], "holdfast codegen: --protos needs --out, the folder to generate into\n"),
        (["--protos", "empty", "--out", "generated"], "holdfast codegen: no .proto files under empty\n"),
        (["--protos", "missing", "--out", "generated", "--check"], "holdfast codegen: no .proto files under missing\n"),
    ],
)
def test_cli_usage_errors_exit_2_and_write_nothing(team, capsys, monkeypatch, args, message):
    protos, out = team
    (protos.parent / "empty").mkdir()
    monkeypatch.chdir(protos.parent)
    assert cli.main(["codegen", *args]) == 2
    assert capsys.readouterr().err == message
    assert not out.exists()
    assert not codegen.check()
