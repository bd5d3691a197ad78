"""`holdfast lint [PATHS…]`: the contracts' rules over compiled descriptors, like `buf lint`.

The tree is compiled once, by protoc, into a descriptor set with source info:
the descriptors are what the gateway enforces (contracts/contract.py reads the
same option), and the source info gives every declaration a file, a line and a
column, so a finding points where the contract is written. Every rule is then
a cheap pass over plain data (contracts/rules.py, contracts/breaking.py);
source locations and file text are only read for files that have a finding.

Output is one line per finding, `path:line:col: RULE_ID message`, sorted by
path, line, column and rule; paths are relative to the current directory.
Exit 0 clean, 1 findings, 2 usage or I/O error (a proto that does not compile
is reported with protoc's own message).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from holdfast.contracts import breaking, rules
from holdfast.contracts.context import DEFAULT_SLA, Context, load_faults, load_registry, read_toml, registry_at
from holdfast.contracts.tree import CompileError, Input, LintError, Tree, compile_tree, display

DEFAULT_PATHS = ("protos",)
FORMATS = ("text", "json", "github")
CONFIG_SECTION = ("tool", "holdfast", "lint")
CONFIG_KEYS = frozenset({"use", "except", "ignore"})
_PACKAGE_LINE = re.compile(r"^\s*package\s+([\w.]+)\s*;", re.MULTILINE)


# -- what a run reports ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Finding:
    """One line of output. Field order is the sort order: path, line, col, rule."""

    path: str
    line: int
    col: int
    rule: str
    message: str

    def text(self) -> str:
        return f"{self.path}:{self.line}:{self.col}: {self.rule} {self.message}"


# -- configuration --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    """`[tool.holdfast.lint]`, like buf's: `use` rule IDs or categories (empty:
    every rule), `except` IDs or categories, `ignore` paths (relative to the
    config file's folder) whose files are neither linted nor reported."""

    file: Path | None = None
    use: tuple[str, ...] = ()
    except_: tuple[str, ...] = ()
    ignore: tuple[Path, ...] = ()

    def ignored(self, path: Path) -> bool:
        return any(path == folder or folder in path.parents for folder in self.ignore)


def load_config(file: Path | None, cwd: Path) -> Config:
    """--config FILE, else ./pyproject.toml when there is one; no section means defaults."""
    if file is None:
        file = cwd / "pyproject.toml"
        if not file.is_file():
            return Config()
    section: object = read_toml(file, cwd, "config file")
    for key in CONFIG_SECTION:
        section = section.get(key, {}) if isinstance(section, dict) else None
    where = f"{display(file, cwd)}: [{'.'.join(CONFIG_SECTION)}]"
    if not isinstance(section, dict):
        raise LintError(f"{where} is not a table")
    unknown = sorted(section.keys() - CONFIG_KEYS)
    if unknown:
        raise LintError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(CONFIG_KEYS))})")
    values = {}
    for key in CONFIG_KEYS:
        value = section.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise LintError(f"{where}: {key} must be a list of strings, got {value!r}")
        values[key] = tuple(value)
    base = file.parent
    return Config(file, values["use"], values["except"], tuple(Path(os.path.abspath(base / p)) for p in values["ignore"]))


# -- a run ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """The command line, parsed."""

    paths: tuple[str, ...] = DEFAULT_PATHS
    format: str = "text"
    faults: tuple[str, ...] = ()
    against: str | None = None
    sla: str | None = None
    config: str | None = None
    generated: str | None = None


def lint(options: Options, cwd: Path | None = None) -> list[Finding]:
    """Compiles the tree (and the --against revision), runs the selected
    rules, drops waived and ignored findings, and sorts the rest."""
    cwd = Path.cwd() if cwd is None else cwd
    config = load_config(_absolute(options.config, cwd) if options.config else None, cwd)
    selected = select(config, [*rules.RULES, *breaking.RULES], cwd)
    selection = [_absolute(p, cwd) for p in options.paths]
    roots, inputs = _inputs(selection, config, cwd)
    tree = compile_tree(roots, inputs, {root: root for root in roots}, cwd)
    sla_file = _absolute(options.sla, cwd) if options.sla else DEFAULT_SLA
    sla = load_registry(sla_file, cwd)
    faults = tuple(fault for name in options.faults for fault in load_faults(_absolute(name, cwd), cwd))
    generated = _generated(options.generated, roots, selection, cwd)
    checkout = tempfile.TemporaryDirectory(prefix="holdfast-lint-against-") if options.against else contextlib.nullcontext()
    with checkout as scratch:
        against = against_sla = None
        if options.against is not None:
            against, top = _against(options.against, roots, selection, config, Path(scratch), cwd)
            against_sla = registry_at(options.against, sla_file, top, cwd)
        context = Context(tree, sla, faults, generated, cwd, against, options.against or "", against_sla)
        found: set[Finding] = set()
        for rule in selected:
            for site, message in rule.check(context):
                if rule.id not in site.waived and not config.ignored(site.file):
                    found.add(Finding(display(site.file, cwd), site.line, site.col, rule.id, message))
    return sorted(found)


def select(config: Config, rules: Sequence, cwd: Path) -> list:
    """The rules `use` enables minus those `except` names; unknown names are errors,
    so a typo in the config cannot silently switch a rule off."""
    names = {rule.id for rule in rules} | {rule.category for rule in rules}
    for name in (*config.use, *config.except_):
        if name not in names:
            where = display(config.file, cwd) if config.file else "config"
            raise LintError(f"{where}: unknown rule or category {name!r} in [{'.'.join(CONFIG_SECTION)}]")
    chosen = [r for r in rules if not config.use or r.id in config.use or r.category in config.use]
    return [r for r in chosen if r.id not in config.except_ and r.category not in config.except_]


def _absolute(path: str, cwd: Path) -> Path:
    return Path(os.path.abspath(cwd / path))


def _inputs(selection: list[Path], config: Config, cwd: Path) -> tuple[list[Path], list[Input]]:
    """Include roots and the files to lint. A folder is a root (import names
    are relative to it); a single file's root is the folder its package
    names (buf's package-directory layout), else the file's folder."""
    roots: list[Path] = []
    inputs: dict[Path, Input] = {}
    for path in selection:
        if path.is_dir():
            files = sorted(path.rglob("*.proto"))
            if not files:
                raise LintError(f"{display(path, cwd)}: no .proto files")
            root = path
        elif path.is_file() and path.suffix == ".proto":
            files, root = [path], next((r for r in selection if r.is_dir() and r in path.parents), None)
            root = root or _package_root(path)
        elif path.exists():
            raise LintError(f"{display(path, cwd)}: neither a folder nor a .proto file")
        else:
            raise LintError(f"{display(path, cwd)}: no such file or folder")
        roots.append(root)
        for file in files:
            if not config.ignored(file) and file not in inputs:
                inputs[file] = Input(file.relative_to(root).as_posix(), file, file)
    return list(dict.fromkeys(roots)), list(inputs.values())


def _package_root(file: Path) -> Path:
    try:
        match = _PACKAGE_LINE.search(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise LintError(f"{file}: cannot read: {error.strerror or error}") from None
    parts = tuple(match.group(1).split(".")) if match else ()
    folder = file.parent
    if parts and folder.parts[-len(parts):] == parts:
        return folder.parents[len(parts) - 1]
    return folder


def _generated(option: str | None, roots: list[Path], selection: list[Path], cwd: Path) -> tuple[Path, Path] | None:
    """(protos, generated folder) whose stamp GENERATED_CODE_FRESH checks:
    --generated DIR against the one folder linted, or by default the
    project's own service/generated/ when its protos/ is linted."""
    from holdfast.contracts import codegen

    folders = [p for p in selection if p.is_dir()]
    if option is not None:
        if len(folders) != 1:
            raise LintError("--generated needs exactly one folder PATH, the protos the code was generated from")
        return folders[0], _absolute(option, cwd)
    if any(folder.resolve() == codegen.PROTOS.resolve() for folder in folders):
        return codegen.PROTOS, codegen.GENERATED
    return None


def _against(ref: str, roots: list[Path], selection: list[Path], config: Config, scratch: Path, cwd: Path) -> tuple[Tree, Path]:
    """The tree as it was at `ref`: each root checked out of git (`git
    archive`) into a scratch folder and compiled the same way. Its files
    point (`home`) at their working-tree paths, so removals can be named.
    Returns the tree and the repository's top folder."""
    top = Path(_git(["rev-parse", "--show-toplevel"], roots[0], f"{display(roots[0], cwd)} is not in a git repository"))
    _git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], top, f"--against {ref}: unknown git revision")
    homes: dict[Path, Path] = {}
    inputs: list[Input] = []
    for index, root in enumerate(roots):
        relative = os.path.relpath(root.resolve(), top.resolve())
        if relative.startswith(".."):
            raise LintError(f"{display(root, cwd)} is outside the git repository {top}")
        old_root = scratch / str(index) / relative
        old_root.mkdir(parents=True, exist_ok=True)
        homes[old_root] = root
        exists = subprocess.run(["git", "cat-file", "-e", f"{ref}:{'' if relative == '.' else relative}"],
                                cwd=top, capture_output=True, check=False).returncode == 0
        if not exists:
            continue
        archive = subprocess.run(["git", "archive", "--format=tar", ref, "--", relative], cwd=top, capture_output=True, check=False)
        if archive.returncode != 0:
            raise LintError(f"git archive {ref} -- {relative}: {archive.stderr.decode(errors='replace').strip()}")
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(scratch / str(index), filter="data")
        for file in sorted(old_root.rglob("*.proto")):
            name = file.relative_to(old_root).as_posix()
            home = root / name
            chosen = any(home == p or p in home.parents for p in selection)
            if chosen and not config.ignored(home):
                inputs.append(Input(name, file, home))
    try:
        return compile_tree(list(homes), inputs, homes, cwd), top
    except CompileError as error:
        raise CompileError(f"at {ref}: {error}") from None


def _git(args: list[str], cwd: Path, reason: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as error:
        raise LintError(f"cannot run git: {error.strerror or error}") from None
    if done.returncode != 0:
        raise LintError(reason)
    return done.stdout.strip()


# -- the command line -------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, not argparse's usage block
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="holdfast lint",
        description="Check the contracts of .proto files (and, --against a git ref, breaking changes).",
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", default=list(DEFAULT_PATHS),
                        help="proto root folders (import names are relative to them) or .proto files; default: protos")
    parser.add_argument("--format", choices=FORMATS, default="text", help="text (path:line:col: ID message), json lines, or github annotations")
    parser.add_argument("--faults", action="append", default=[], metavar="FILE", help="a fault file whose delays to check (repeatable)")
    parser.add_argument("--against", metavar="GIT_REF", help="also report changes that break replay or clients since this revision")
    parser.add_argument("--sla", metavar="FILE", help=f"SLA registry (default: {display(DEFAULT_SLA, Path.cwd())})")
    parser.add_argument("--config", metavar="FILE", help="TOML file with [tool.holdfast.lint] (default: ./pyproject.toml)")
    parser.add_argument("--generated", metavar="DIR", help="generated code whose stamp to check against the one PATH (default: service/generated for the project's protos)")
    parser.add_argument("--list-rules", action="store_true", help="print each rule's ID, category and purpose, then exit")
    return parser


def rule_table() -> str:
    """`--list-rules`: the registry itself, one rule a line."""
    every = [*rules.RULES, *breaking.RULES]
    width = max(len(rule.id) for rule in every)
    return "".join(f"{rule.id:<{width}}  {rule.category:<9}  {rule.purpose}\n" for rule in every)


def render(findings: Sequence[Finding], format: str) -> str:
    """The findings in one of FORMATS, one line each (empty when clean)."""
    if format == "json":
        return "".join(json.dumps({"path": f.path, "line": f.line, "column": f.col, "rule": f.rule, "message": f.message}) + "\n" for f in findings)
    if format == "github":
        return "".join(
            f"::error file={_property(f.path)},line={f.line},col={f.col},title={_property(f.rule)}::{_data(f.message)}\n"
            for f in findings
        )
    return "".join(f.text() + "\n" for f in findings)


def _data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _property(text: str) -> str:
    return _data(text).replace(":", "%3A").replace(",", "%2C")


def main(argv: list[str] | None = None) -> int:
    """`holdfast lint …`: exit 0 clean, 1 findings, 2 usage or I/O error."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except _UsageError as error:
        print(f"holdfast lint: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help
        return int(done.code or 0)
    if args.list_rules:
        sys.stdout.write(rule_table())
        return 0
    options = Options(tuple(args.paths), args.format, tuple(args.faults), args.against, args.sla, args.config, args.generated)
    try:
        findings = lint(options)
    except CompileError as error:
        print(error, file=sys.stderr)
        return 2
    except LintError as error:
        print(f"holdfast lint: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"holdfast lint: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 2
    sys.stdout.write(render(findings, args.format))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
