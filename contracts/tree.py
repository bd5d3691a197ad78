"""The compiled tree: what every lint rule reads of the .proto files.

protoc compiles the linted files once into a descriptor set with source
info (`compile_tree`). The descriptors are what the gateway enforces
(contracts/contract.py reads the same option); the source info gives every
declaration a file, a line and a column (`Site`), so a finding points where
the contract is written. Locations and file text are read only for files
that have a finding.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    unknown_fields,
)

CONTRACT_OPTION = "(holdfast.contract.v1.contract)"
_CONTRACT_PACKAGE, _CONTRACT_NAME = "holdfast.contract.v1", "contract"
_METHOD_OPTIONS = ".google.protobuf.MethodOptions"


def contract_include() -> Path:
    """The folder that holds holdfast/contract/v1/contract.proto (shipped as
    the `holdfast.protos` package data): always importable, like
    google/protobuf/*, so a team's protos need no copy of the contract."""
    from holdfast.contracts import codegen

    return codegen.PROTOS


IGNORE_COMMENT = re.compile(r"holdfast:lint:ignore\s+([A-Z][A-Z0-9_]*)")
_LITERAL = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'')
_KEY_LIST = re.compile(r"(?<![\w.])idempotency_key\s*:\s*(\[[^\]]*\]|" + _LITERAL.pattern + ")")
_TAB_WIDTH = 8  # protoc's tokenizer counts a tab as reaching the next multiple of 8

# descriptor.proto field numbers: the steps of a source-info location path.
_FILE_PACKAGE, _FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 2, 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_NAME, _SERVICE_METHOD, _METHOD_OPTIONS_FIELD, _ENUM_VALUE = 1, 2, 4, 2
_NO_SIDE_EFFECTS = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
_FieldProto = descriptor_pb2.FieldDescriptorProto
_NOT_SCALAR = frozenset({_FieldProto.TYPE_MESSAGE, _FieldProto.TYPE_GROUP})


class LintError(Exception):
    """A usage or I/O problem: `holdfast lint` exits 2 with this one-line reason."""


class CompileError(LintError):
    """protoc refused the tree; the text is protoc's own message, paths made relative."""




@dataclass(frozen=True, slots=True)
class Site:
    """Where a finding points (1-based line and column, in characters), and the
    rule IDs waived there by `holdfast:lint:ignore` comments on its declarations."""

    file: Path
    line: int
    col: int
    waived: frozenset[str] = frozenset()


# -- the compiled tree ----------------------------------------------------------------


class Source:
    """One compiled .proto file. `file` is where protoc read it; `home` is where
    findings point (the same file, or for an --against revision, the path the
    file has in the working tree)."""

    __slots__ = ("_lines", "_locations", "_under", "file", "home", "name", "proto", "target")

    def __init__(self, proto: descriptor_pb2.FileDescriptorProto, file: Path | None, home: Path, target: bool) -> None:
        self.name, self.proto, self.file, self.home, self.target = proto.name, proto, file, home, target
        self._locations: dict[tuple[int, ...], list[tuple[tuple[int, ...], str]]] | None = None
        self._under: dict[int, dict[tuple[int, ...], list[tuple[tuple[int, ...], str]]]] = {}
        self._lines: list[str] | None = None

    @property
    def locations(self) -> dict[tuple[int, ...], list[tuple[tuple[int, ...], str]]]:
        """Source-info (span, leading comment) pairs by location path, built on
        first use: only files with a finding pay for it, which keeps a clean
        run over a large tree as fast as protoc."""
        if self._locations is None:
            index: dict[tuple[int, ...], list[tuple[tuple[int, ...], str]]] = {}
            for loc in self.proto.source_code_info.location:
                index.setdefault(tuple(loc.path), []).append((tuple(loc.span), loc.leading_comments))
            self._locations = index
        return self._locations

    def under(self, path: tuple[int, ...]) -> list[tuple[tuple[int, ...], str]]:
        """Locations at `path` or inside it (an index per path length, so each
        lookup is a dict hit even with a finding on every RPC)."""
        depth = len(path)
        index = self._under.get(depth)
        if index is None:
            index = {}
            for key, locs in self.locations.items():
                if len(key) >= depth:
                    index.setdefault(key[:depth], []).extend(locs)
            self._under[depth] = index
        return index.get(path, [])

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            try:
                self._lines = self.file.read_text(encoding="utf-8").split("\n") if self.file else []
            except OSError:
                self._lines = []
        return self._lines

    def waived(self, path: tuple[int, ...], subtree: bool = False) -> frozenset[str]:
        """Rule IDs named by ignore comments leading the declaration at `path`
        (and, with `subtree`, any declaration inside it, e.g. each option statement)."""
        found = self.under(path) if subtree else self.locations.get(path, [])
        return frozenset(rule for _, leading in found if leading for rule in IGNORE_COMMENT.findall(leading))

    def site(self, path: tuple[int, ...], waived: frozenset[str] = frozenset()) -> Site | None:
        """The start of the first declaration at `path` or inside it."""
        locs = self.locations.get(path) or self.under(path)
        if not locs:
            return None
        span = min(span for span, _ in locs)
        return Site(self.home, *self.position(span[0], span[1]), waived)

    def position(self, line: int, protoc_col: int) -> tuple[int, int]:
        """protoc's 0-based (line, column) as 1-based (line, character column)."""
        return line + 1, self._char(line, protoc_col) + 1

    def find(self, span: tuple[int, ...], finder) -> tuple[int, int] | None:
        """Runs `finder(text) -> offset | None` over the text of a span and
        returns the 1-based (line, column) of the offset it found."""
        lines = self.lines
        first, last = span[0], span[2] if len(span) == 4 else span[0]
        if last >= len(lines):
            return None
        start, end = self._char(first, span[1]), self._char(last, span[-1])
        text = lines[first][start:] if first != last else lines[first][start:end]
        if first != last:
            text = "\n".join([text, *lines[first + 1 : last], lines[last][:end]])
        offset = finder(text)
        if offset is None:
            return None
        before = text[:offset]
        newlines = before.count("\n")
        col = start + len(before) if not newlines else len(before) - before.rfind("\n") - 1
        return first + newlines + 1, col + 1

    def _char(self, line: int, protoc_col: int) -> int:
        text = self.lines[line] if line < len(self.lines) else ""
        if "\t" not in text and text.isascii():
            return protoc_col
        col = 0
        for index, char in enumerate(text):
            if col >= protoc_col:
                return index
            col = col + _TAB_WIDTH - col % _TAB_WIDTH if char == "\t" else col + len(char.encode())
        return len(text)


@dataclass(frozen=True, slots=True)
class ContractOption:
    """An RPC's `(holdfast.contract.v1.contract)` option, as plain values."""

    timeout_ms: int
    idempotency_key: tuple[str, ...]
    max_attempts: int
    fixed_delay_ms: int
    lock_ttl_ms: int
    sla: str
    on_duplicate: int = 0  # the OnDuplicate number, as written (proto3 enums are open)


@dataclass(frozen=True, slots=True)
class Message:
    """A message of the tree (targets and imports), by full name, with where it is declared."""

    source: Source
    path: tuple[int, ...]
    full_name: str
    fields: dict[str, tuple[int, _FieldProto]]  # name -> (index, field)

    def field_site_waived(self, name: str) -> frozenset[str]:
        index, _ = self.fields[name]
        return self.source.waived(self.path + (_MESSAGE_FIELD, index))


@dataclass(frozen=True, slots=True)
class Rpc:
    """One RPC of a linted file, with its contract (None when it declares none)."""

    source: Source
    path: tuple[int, ...]
    service: str
    name: str
    request: str
    read_only: bool
    contract: ContractOption | None
    option_number: int
    option_fields: dict[str, int]

    @property
    def method(self) -> str:
        """The name fault files and messages use: `pkg.Service/Method`."""
        return f"{self.service}/{self.name}"

    def site(self) -> Site:
        """The RPC's name."""
        waived = self.source.waived(self.path)
        return self.source.site(self.path + (_NAME,), waived) or self.source.site(self.path, waived)

    def option_site(self, field: str, index: int | None = None, waived: frozenset[str] = frozenset()) -> Site:
        """Where the contract sets `field` (its `index`-th entry when repeated):
        the field's own option statement, else the field inside the aggregate
        `{ … }` value, else the option statement, else the RPC's name. Ignore
        comments on the RPC and on each contract option statement apply."""
        source, option = self.source, self.path + (_METHOD_OPTIONS_FIELD, self.option_number)
        waived = waived | source.waived(self.path) | source.waived(option, subtree=True)
        number = self.option_fields.get(field)
        if number is not None:
            exact = option + (number,) + (() if index is None else (index,))
            found = source.site(exact, waived)
            if found:
                return found
            finder = _key_literal(index) if field == "idempotency_key" and index is not None else _field_token(field)
            for span, _ in source.locations.get(option, []):
                hit = source.find(span, finder)
                if hit:
                    return Site(source.home, *hit, waived)
        found = source.site(option, waived)
        if found:
            return found
        name = self.site()
        return Site(name.file, name.line, name.col, waived | name.waived)


def _field_token(name: str):
    pattern = re.compile(r"(?<![\w.])" + re.escape(name) + r"\s*[:{]")

    def find(text: str) -> int | None:
        match = pattern.search(text)
        return match.start() if match else None

    return find


def _key_literal(index: int):
    """Finds the `index`-th name of `idempotency_key` in text format, written
    as a list (`["a", "b"]`) or as repeated `idempotency_key: "a"` entries."""

    def find(text: str) -> int | None:
        seen = 0
        for entry in _KEY_LIST.finditer(text):
            for literal in _LITERAL.finditer(entry.group(1)):
                if seen == index:
                    return entry.start(1) + literal.start()
                seen += 1
        return None

    return find


@dataclass(frozen=True, slots=True)
class Enum:
    """An enum of a linted file: values by name as (number, index)."""

    source: Source
    path: tuple[int, ...]
    full_name: str
    values: dict[str, tuple[int, int]]

    def value_site(self, name: str) -> Site:
        """The value's declaration; ignore comments on it or on the enum apply."""
        path = self.path + (_ENUM_VALUE, self.values[name][1])
        waived = self.source.waived(self.path) | self.source.waived(path)
        return self.source.site(path, waived) or Site(self.source.home, 1, 1, waived)


class Tree:
    """A compiled tree: the linted files' RPCs and services, their enums, and
    every message (imports included) by full name.

    RPCs are read up front (every rule needs them); messages and enums are
    indexed when first asked for, because a nested walk over every message
    of a large tree costs more than all the rules of a clean run."""

    def __init__(self, sources: dict[str, Source]) -> None:
        self.sources = sources
        self.services: dict[str, tuple[Source, tuple[int, ...]]] = {}
        self.rpcs: list[Rpc] = []
        self._messages: dict[str, Message | None] = {}
        self._top: dict[str, tuple[Source, int]] = {}
        self._nested: dict[str, tuple[Source, tuple[int, ...], descriptor_pb2.DescriptorProto]] | None = None
        self._enums: list[Enum] | None = None
        decode, number, fields = _contract_reader(source.proto for source in sources.values())
        for source in sources.values():
            prefix = f"{source.proto.package}." if source.proto.package else ""
            for index, message in enumerate(source.proto.message_type):
                self._top[prefix + message.name] = (source, index)
            if source.target:
                self._rpcs(source, prefix, decode, number, fields)

    def message(self, name: str) -> Message | None:
        """The message with full name `name` (no leading dot), or None."""
        if name in self._messages:
            return self._messages[name]
        if name in self._top:
            source, index = self._top[name]
            path, proto = (_FILE_MESSAGE, index), source.proto.message_type[index]
        else:
            found = self._walk_nested().get(name)
            if found is None:
                self._messages[name] = None
                return None
            source, path, proto = found
        fields = {field.name: (i, field) for i, field in enumerate(proto.field)}
        self._messages[name] = Message(source, path, name, fields)
        return self._messages[name]

    def _walk_nested(self) -> dict:
        if self._nested is None:
            self._nested = {}
            for name, (source, index) in self._top.items():
                self._nest(source, name, (_FILE_MESSAGE, index), source.proto.message_type[index])
        return self._nested

    def _nest(self, source: Source, name: str, path: tuple[int, ...], proto: descriptor_pb2.DescriptorProto) -> None:
        for index, nested in enumerate(proto.nested_type):
            here = path + (_MESSAGE_NESTED, index)
            self._nested[f"{name}.{nested.name}"] = (source, here, nested)
            self._nest(source, f"{name}.{nested.name}", here, nested)

    @property
    def enums(self) -> list[Enum]:
        """Every enum of the linted files, nested ones included."""
        if self._enums is None:
            self._enums = []
            for source in self.sources.values():
                if source.target:
                    prefix = f"{source.proto.package}." if source.proto.package else ""
                    self._add_enums(source, prefix, source.proto.message_type, source.proto.enum_type, (), top=True)
        return self._enums

    def _add_enums(self, source: Source, prefix: str, messages, enums, path: tuple[int, ...], top: bool) -> None:
        message_step, enum_step = (_FILE_MESSAGE, _FILE_ENUM) if top else (_MESSAGE_NESTED, _MESSAGE_ENUM)
        for index, enum in enumerate(enums):
            values = {value.name: (value.number, i) for i, value in enumerate(enum.value)}
            self._enums.append(Enum(source, path + (enum_step, index), prefix + enum.name, values))
        for index, message in enumerate(messages):
            here = path + (message_step, index)
            self._add_enums(source, f"{prefix}{message.name}.", message.nested_type, message.enum_type, here, top=False)

    def _rpcs(self, source: Source, prefix: str, decode, number: int, fields: dict[str, int]) -> None:
        for s_index, service in enumerate(source.proto.service):
            s_path, s_name = (_FILE_SERVICE, s_index), prefix + service.name
            self.services[s_name] = (source, s_path)
            for m_index, method in enumerate(service.method):
                options = method.options if method.HasField("options") else None
                raw = _extension_bytes(options, number) if options is not None and decode else None
                self.rpcs.append(Rpc(
                    source=source,
                    path=s_path + (_SERVICE_METHOD, m_index),
                    service=s_name,
                    name=method.name,
                    request=method.input_type.lstrip("."),
                    read_only=options is not None and options.idempotency_level == _NO_SIDE_EFFECTS,
                    contract=None if raw is None else decode(raw),
                    option_number=number,
                    option_fields=fields,
                ))

    def removed_site(self, container: str, kind: str, file_name: str, home: Path) -> Site:
        """Where to report something deleted from `container` (a service or
        enum full name): the container if it is still here, else the file's
        package statement, else line 1 of the file's old path."""
        if kind == "service" and container in self.services:
            source, path = self.services[container]
            return source.site(path + (_NAME,), source.waived(path)) or Site(source.home, 1, 1)
        for enum in self.enums if kind == "enum" else ():
            if enum.full_name == container:
                return enum.source.site(enum.path + (_NAME,), enum.source.waived(enum.path)) or Site(enum.source.home, 1, 1)
        source = self.sources.get(file_name)
        if source is not None and source.target:
            return source.site((_FILE_PACKAGE,)) or Site(source.home, 1, 1)
        return Site(home, 1, 1)


def _contract_reader(protos: Iterable[descriptor_pb2.FileDescriptorProto]):
    """A decoder for the contract option built from the linted tree's own
    contract.proto (not the generated code, whose freshness is itself a rule),
    with the option's field number and the Contract message's field numbers."""
    by_name = {proto.name: proto for proto in protos}
    for proto in by_name.values():
        if proto.package != _CONTRACT_PACKAGE:
            continue
        for extension in proto.extension:
            if extension.name == _CONTRACT_NAME and extension.extendee == _METHOD_OPTIONS:
                pool = descriptor_pool.DescriptorPool()
                _add_with_dependencies(pool, proto.name, by_name, set())
                message = pool.FindMessageTypeByName(extension.type_name.lstrip("."))
                fields = {field.name: field.number for field in message.fields}
                return _decoder(message_factory.GetMessageClass(message)), extension.number, fields
    return None, 0, {}


def _decoder(message_class: type) -> Callable[[bytes], ContractOption]:
    def decode(raw: bytes) -> ContractOption:
        return _contract_option(message_class.FromString(raw))

    return decode


def _add_with_dependencies(pool, name: str, by_name: dict, added: set[str]) -> None:
    if name in added:
        return
    added.add(name)
    for dependency in by_name[name].dependency:
        _add_with_dependencies(pool, dependency, by_name, added)
    pool.Add(by_name[name])


def _extension_bytes(options: descriptor_pb2.MethodOptions, number: int) -> bytes | None:
    """The option's encoded value: an unknown field to descriptor_pb2, unless
    this process also imported the generated contract_pb2, which registers it."""
    for field, value in options.ListFields():
        if field.is_extension and field.number == number:
            return value.SerializeToString()
    chunks = [f.data for f in unknown_fields.UnknownFieldSet(options) if f.field_number == number and f.wire_type == 2]
    return b"".join(chunks) if chunks else None


def _contract_option(raw) -> ContractOption:
    retry = getattr(raw, "retry", None)
    return ContractOption(
        timeout_ms=getattr(raw, "timeout_ms", 0),
        idempotency_key=tuple(getattr(raw, "idempotency_key", ())),
        max_attempts=getattr(retry, "max_attempts", 0),
        fixed_delay_ms=getattr(retry, "fixed_delay_ms", 0),
        lock_ttl_ms=getattr(raw, "lock_ttl_ms", 0),
        sla=getattr(raw, "sla", ""),
        on_duplicate=getattr(raw, "on_duplicate", 0),
    )


def field_type(field: _FieldProto) -> str:
    """A field's type as written in a .proto: `string`, `int64`, `pkg.Message`."""
    if field.type_name:
        return field.type_name.lstrip(".")
    return _FieldProto.Type.Name(field.type).removeprefix("TYPE_").lower()


def is_scalar(field: _FieldProto) -> bool:
    """Scalars as contracts/contract.py counts them: every type but message and group."""
    return field.type not in _NOT_SCALAR


def is_repeated(field: _FieldProto) -> bool:
    return field.label == _FieldProto.LABEL_REPEATED


# -- compiling ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Input:
    """One .proto to lint: its import name, where it is read from, and where
    findings point. Files it imports are compiled too but not linted."""

    name: str
    file: Path
    home: Path


def compile_tree(includes: Sequence[Path], inputs: Sequence[Input], homes: dict[Path, Path], cwd: Path) -> Tree:
    """One protoc run over every input, with source info and imports.

    `homes` maps each include folder to the folder findings should name for
    its files (itself, or for a checked-out revision, the working-tree root).
    """
    from grpc_tools import protoc

    well_known = Path(protoc.__file__).parent / "_proto"
    folders = [folder for folder in dict.fromkeys([*includes, contract_include(), well_known]) if folder.is_dir()]
    if not inputs:
        return Tree({})
    with tempfile.TemporaryDirectory(prefix="holdfast-lint-") as scratch:
        out = Path(scratch) / "tree.pb"
        args = ["protoc", *[f"-I{folder}" for folder in folders], "--include_source_info", "--include_imports",
                f"--descriptor_set_out={out}", *[str(i.file) for i in inputs]]
        status, errors = _run_protoc(protoc, args)
        if status != 0:
            raise CompileError(_relative_errors(errors, inputs, homes, cwd) or "protoc failed without a message")
        data = out.read_bytes()
    by_name = {i.name: i for i in inputs}
    sources: dict[str, Source] = {}
    for proto in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        given = by_name.get(proto.name)
        if given is not None:
            sources[proto.name] = Source(proto, given.file, given.home, True)
            continue
        folder = next((folder for folder in folders if (folder / proto.name).is_file()), None)
        file = folder / proto.name if folder else None
        home = homes[folder] / proto.name if folder in homes else (file or Path(proto.name))
        sources[proto.name] = Source(proto, file, home, False)
    return Tree(sources)


def _run_protoc(protoc, args: list[str]) -> tuple[int, str]:
    """protoc in this process (no interpreter start-up per run); its messages
    go to file descriptor 2, so that is where they are caught."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            status = protoc.main(args)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        return status, caught.read().decode("utf-8", "replace")


def _relative_errors(errors: str, inputs: Sequence[Input], homes: dict[Path, Path], cwd: Path) -> str:
    """protoc names files by import name; findings and errors name them by path."""
    homes_of = {i.name: i.home for i in inputs} | {str(i.file): i.home for i in inputs}
    lines = []
    for line in errors.strip().splitlines():
        name, colon, rest = line.partition(":")
        if colon and name in homes_of:
            line = f"{display(homes_of[name], cwd)}:{rest}"
        for folder, home in homes.items():
            line = line.replace(f"{folder}{os.sep}", f"{display(home, cwd)}/".removeprefix("./"))
        lines.append(line)
    return "\n".join(lines)


@functools.lru_cache(maxsize=4096)
def display(path: Path, cwd: Path) -> str:
    """A path as findings print it: relative to the current directory, like buf."""
    return Path(os.path.relpath(path, cwd)).as_posix()
