"""Code generation from `protos/` into the one generated folder, with a stamp.

The generated code is committed so that installing holdfast needs no protoc.
A team's own protos go the same way (`holdfast codegen --protos DIR --out
DIR`): compiled with holdfast's `protos/` on the include path, so that
`import "holdfast/contract/v1/contract.proto";` resolves, and only the team's
files generated into their folder (the contract's module is holdfast's own).
Next to the stubs goes the gRPC service config (contracts.service_config), so
clients get each contract's deadline and retries from the same compilation.
The stamp records what produced it (the sha256 of every proto source and of
every generated file, and the grpcio-tools and protobuf versions), so stale or
hand-edited code is found by `holdfast codegen --check` instead of surprising
someone at import time.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable


def _package_folder(name: str) -> Path:
    """The folder of an installed (or editable) package, found without
    importing it: a wheel puts it in site-packages, a checkout in the
    fixed folders that pyproject's package-dir maps."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not a package"
    return Path(next(iter(spec.submodule_search_locations))).resolve()


# holdfast's own .proto sources (protos/, shipped as `holdfast.protos`): the
# include folder every team's protos get, so `import
# "holdfast/contract/v1/contract.proto";` resolves with no flag.
PROTOS = Path(str(importlib.resources.files("holdfast.protos")))
# Where holdfast's stamp and service config live (service/generated/).
GENERATED = _package_folder("holdfast.generated")
# The import root of holdfast's generated modules: the folder holding
# `holdfast/contract/v1/contract_pb2.py`. In a checkout it is GENERATED;
# installed from the wheel it is site-packages, since each proto package is a
# real subpackage of `holdfast` at its proto path.
OWN_CODE = _package_folder("holdfast.contract.v1").parents[2]
STAMP_NAME = "STAMP.json"
SERVICE_CONFIG_NAME = "service_config.json"
# A tree that holds this file is holdfast's own; any other imports it from PROTOS.
CONTRACT_PROTO = Path("holdfast/contract/v1/contract.proto")
_OUTPUT_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def is_checkout() -> bool:
    """True when holdfast runs from its own repository (an editable
    install), where its generated code can be written; False installed."""
    return OWN_CODE == GENERATED


@dataclass(frozen=True, slots=True)
class Staleness:
    """Why generated code does not match its sources; empty means fresh."""

    files: tuple[str, ...]
    reasons: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.reasons)


def proto_sources(protos: Path = PROTOS) -> list[Path]:
    return sorted(protos.rglob("*.proto"))


def is_own_tree(protos: Path) -> bool:
    """True for holdfast's own protos (or a copy): they hold the contract
    option themselves; any other tree imports it from holdfast's."""
    return (protos / CONTRACT_PROTO).is_file()


def outputs(protos: Path) -> list[str]:
    """The modules protoc writes for `protos`, relative to the import root:
    `a/b/c.proto` gives `a/b/c_pb2.py`, its `.pyi` and `a/b/c_pb2_grpc.py`.
    Named from the sources, never found by walking the output folder, which
    for a team is often its project root (its own code, its virtualenv)."""
    names: list[str] = []
    for source in proto_sources(protos):
        stem = source.relative_to(protos).with_suffix("").as_posix()
        names.extend(stem + suffix for suffix in _OUTPUT_SUFFIXES)
    return names


def command(protos: Path, out: Path, shown: Callable[[Path], str] = str) -> str:
    """The command that regenerates `out` from `protos`, as advice to print."""
    if protos.resolve() == PROTOS.resolve() and out.resolve() == GENERATED:
        return "holdfast codegen"
    return f"holdfast codegen --protos {shown(protos)} --out {shown(out)}"


def generate(protos: Path = PROTOS, out: Path = GENERATED) -> list[Path]:
    """Compile every proto under `protos` into `out` (the import root: a
    proto package `a.b.v1` becomes the Python package `a.b.v1` there), write
    the service config from the descriptors just compiled, then the stamp."""
    from grpc_tools import protoc

    from holdfast.contracts import service_config

    sources = proto_sources(protos)
    if not sources:
        raise FileNotFoundError(f"no .proto files under {protos}")
    _remove_previous(protos, out)
    out.mkdir(parents=True, exist_ok=True)
    includes = [protos] if is_own_tree(protos) else [protos, PROTOS]
    well_known = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="holdfast-codegen-") as scratch:
        descriptors = Path(scratch) / "descriptors.pb"
        args = [
            "grpc_tools.protoc",
            *[f"-I{folder}" for folder in includes],
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            f"--descriptor_set_out={descriptors}",
            "--include_imports",
            *[str(s) for s in sources],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; its message is above")
        names = [s.relative_to(protos).as_posix() for s in sources]
        config = service_config.from_descriptor_set(descriptors.read_bytes(), names)
    (out / SERVICE_CONFIG_NAME).write_text(service_config.dumps(config))
    written = [out / name for name in outputs(protos)]
    packages = _write_packages(out, written)
    stamp = _stamp(protos, out, out)
    (out / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return sorted([*written, *packages, out / SERVICE_CONFIG_NAME])


def check(protos: Path = PROTOS, out: Path = GENERATED) -> Staleness:
    """Compare the stamp with the sources, the outputs and the toolchain.
    For holdfast's own tree installed from the wheel, the modules are read
    where the wheel put them (OWN_CODE), the stamp where it always is."""
    path = out / STAMP_NAME
    if not path.exists():
        return Staleness((str(path),), (f"{path}: no stamp; run `{command(protos, out)}`",))
    recorded = json.loads(path.read_text())
    code = OWN_CODE if out.resolve() == GENERATED else out
    current = _stamp(protos, out, code, recorded.get("generated", {}))
    files: list[str] = []
    reasons: list[str] = []
    for key in ("grpcio_tools", "protobuf"):
        if recorded.get(key) != current[key]:
            reasons.append(f"{key} is {current[key]}, code was generated with {recorded.get(key)}")
    for kind, base in (("protos", protos), ("generated", code)):
        old, new = recorded.get(kind, {}), current[kind]
        for name in sorted(old.keys() | new.keys()):
            if old.get(name) == new.get(name):
                continue
            where = out / name if name == SERVICE_CONFIG_NAME else base / name
            files.append(str(where))
            what = "added" if name not in old else "removed" if name not in new else "changed"
            reasons.append(f"{where}: {what} since the last `holdfast codegen`")
    return Staleness(tuple(files), tuple(reasons))


def _remove_previous(protos: Path, out: Path) -> None:
    """Delete the modules a run over `protos` would not write again (and
    the ones it will rewrite): those the last stamp named, and stray protoc
    output beside them; nothing else in `out` is touched."""
    try:
        recorded = json.loads((out / STAMP_NAME).read_text()).get("generated", {})
    except (OSError, ValueError):
        recorded = {}
    for name in _modules(protos, out, recorded):
        (out / name).unlink()


def _write_packages(out: Path, modules: list[Path]) -> list[Path]:
    """An empty `__init__.py` in every folder between `out` and a generated
    module that lacks one, so each proto package is a regular package (type
    checkers follow it); `out` itself is the import root, not a package."""
    made = []
    for module in modules:
        parts = module.parent.relative_to(out).parts
        for depth in range(1, len(parts) + 1):
            init = out.joinpath(*parts[:depth], "__init__.py")
            if not init.exists():
                init.touch()
            made.append(init)
    return sorted(set(made))


def _stamp(protos: Path, out: Path, code: Path, recorded: Iterable[str] = ()) -> dict[str, Any]:
    generated = {name: _sha256(code / name) for name in _modules(protos, code, recorded)}
    if (out / SERVICE_CONFIG_NAME).is_file():
        generated[SERVICE_CONFIG_NAME] = _sha256(out / SERVICE_CONFIG_NAME)
    return {
        "grpcio_tools": metadata.version("grpcio-tools"),
        "protobuf": metadata.version("protobuf"),
        "protos": {str(p.relative_to(protos)): _sha256(p) for p in proto_sources(protos)},
        "generated": generated,
    }


def _modules(protos: Path, code: Path, recorded: Iterable[str] = ()) -> list[str]:
    """The generated modules present under `code`: those the sources name,
    those the last stamp named, and any other protoc output in their
    folders (a stray module, or one left by a proto since removed)."""
    named = {*outputs(protos), *(name for name in recorded if name.endswith(_OUTPUT_SUFFIXES))}
    folders = {PurePosixPath(name).parent for name in named}
    strays = {
        (folder / found.name).as_posix()
        for folder in folders if (code / folder).is_dir()
        for found in (code / folder).iterdir() if found.name.endswith(_OUTPUT_SUFFIXES)
    }
    return sorted(name for name in named | strays if (code / name).is_file())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(check_only: bool, protos: str | None = None, out: str | None = None) -> int:
    """`holdfast codegen [--protos DIR] [--out DIR] [--check]`: exit 0 fresh
    or written, 1 stale, 2 usage error. Without options, holdfast's own
    `protos/` and `service/generated/` (writable only in its checkout)."""
    if protos is not None and out is None:
        # The default out is holdfast's own generated tree: never overwrite it with a team's protos.
        print("holdfast codegen: --protos needs --out, the folder to generate into", file=sys.stderr)
        return 2
    folders = {name: Path(os.path.abspath(value)) for name, value in (("protos", protos), ("out", out)) if value}
    if not folders and not check_only and not is_checkout():
        print("holdfast codegen: holdfast's own code is generated in its checkout and shipped in the wheel;"
              " for your protos: holdfast codegen --protos DIR --out DIR", file=sys.stderr)
        return 2
    if "protos" in folders and not proto_sources(folders["protos"]):
        print(f"holdfast codegen: no .proto files under {_shown(folders['protos'])}", file=sys.stderr)
        return 2
    if not check_only:
        for path in generate(**folders):
            print(f"wrote {_shown(path)}")
        return 0
    stale = check(**folders)
    for reason in stale.reasons:
        print(f"stale: {reason}", file=sys.stderr)
    if not stale:
        print(f"generated code is fresh ({_shown(folders.get('out', GENERATED))})")
    return 1 if stale else 0


def _shown(path: Path) -> str:
    """A path as printed: relative to the working directory when inside it,
    else to the folder holding holdfast's own tree, else absolute."""
    for base in (Path.cwd(), OWN_CODE.parent):
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return str(path)
