"""What one lint run reads besides the tree: the SLA registry
(contracts/sla.toml or --sla), the fault files (--faults), and the `Context`
that hands all of it to every rule.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from holdfast.contracts.tree import IGNORE_COMMENT, LintError, Site, Tree, display

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_SLA = PACKAGE_DIR / "sla.toml"


# -- the SLA registry and fault files --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sla:
    """One SLA entry: `timeout_ms_max` bounds one attempt, `budget_ms` all of them."""

    name: str
    timeout_ms_max: int
    budget_ms: int


@dataclass(frozen=True, slots=True)
class Registry:
    file: Path
    entries: dict[str, Sla]


def load_registry(file: Path, cwd: Path) -> Registry:
    """contracts/sla.toml (or --sla): a table per entry with two integers."""
    return _registry(read_toml(file, cwd, "SLA registry"), file, display(file, cwd))


def registry_at(ref: str, file: Path, top: Path, cwd: Path) -> Registry | None:
    """The SLA registry as it was at `ref`: the promise clients sized their
    deadlines by. None when the registry is not in the protos' repository
    `top`, or not in that revision."""
    relative = os.path.relpath(file.resolve(), top.resolve())
    if relative.startswith(".."):
        return None
    shown = subprocess.run(["git", "show", f"{ref}:{Path(relative).as_posix()}"], cwd=top, capture_output=True, check=False)
    if shown.returncode != 0:
        return None
    try:
        document = tomllib.loads(shown.stdout.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise LintError(f"{display(file, cwd)} at {ref}: not valid TOML: {error}") from None
    return _registry(document, file, f"{display(file, cwd)} at {ref}")


def _registry(document: dict, file: Path, label: str) -> Registry:
    entries: dict[str, Sla] = {}
    for name, table in document.items():
        where = f'{label}: ["{name}"]'
        if not isinstance(table, dict):
            raise LintError(f"{where} is not a table with timeout_ms_max and budget_ms")
        for key in ("timeout_ms_max", "budget_ms"):
            if isinstance(table.get(key), bool) or not isinstance(table.get(key), int):
                raise LintError(f"{where}: {key} must be an integer, got {table.get(key)!r}")
        entries[name] = Sla(name, table["timeout_ms_max"], table["budget_ms"])
    return Registry(file, entries)


@dataclass(frozen=True, slots=True)
class Fault:
    """One table of a fault file: the method it names and its delay, if any."""

    file: Path
    method: str
    delay_ms: int | None
    site: Site
    delay_site: Site | None


_TOML_HEADER = re.compile(r"^\s*\[\s*(\"(?:[^\"\\]|\\.)*\"|'[^']*'|[A-Za-z0-9_.\-]+)\s*\]")
_TOML_DELAY = re.compile(r"^\s*(delay_ms)\s*=")


def load_faults(file: Path, cwd: Path) -> list[Fault]:
    """A fault file (service/faults.py's format): one table per method, keyed
    `"pkg.Service/Method"`. Only what lint checks is validated here; the
    server validates the rest when it loads the file."""
    document = read_toml(file, cwd, "fault file")
    headers, delays = _toml_positions(file)
    faults: list[Fault] = []
    for method, table in document.items():
        where = f'{display(file, cwd)}: ["{method}"]'
        if not isinstance(table, dict):
            raise LintError(f'{where} is not a table of fault settings (delay_ms, status, probability, seed)')
        delay = table.get("delay_ms")
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int) or delay < 0):
            raise LintError(f"{where}: delay_ms must be an integer of 0 or more, got {delay!r}")
        line, col, waived = headers.get(method, (1, 1, frozenset()))
        site = Site(file, line, col, waived)
        delay_site = Site(file, *delays[method][:2], waived | delays[method][2]) if method in delays else site
        faults.append(Fault(file, method, delay, site, delay_site))
    return faults


def _toml_positions(file: Path) -> tuple[dict, dict]:
    """tomllib keeps no positions, so each table header and its delay_ms key
    are found by line; `# holdfast:lint:ignore ID` comments just above apply."""
    headers: dict[str, tuple[int, int, frozenset[str]]] = {}
    delays: dict[str, tuple[int, int, frozenset[str]]] = {}
    current, pending = None, set()
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip().startswith("#"):
            pending.update(IGNORE_COMMENT.findall(line))
            continue
        header, delay = _TOML_HEADER.match(line), _TOML_DELAY.match(line)
        if header:
            raw = header.group(1)
            current = tomllib.loads(f"k = {raw}")["k"] if raw[0] in "\"'" else raw
            headers.setdefault(current, (number, line.index("[") + 1, frozenset(pending)))
        elif delay and current is not None:
            delays.setdefault(current, (number, delay.start(1) + 1, frozenset(pending)))
        pending = set()
    return headers, delays


def read_toml(file: Path, cwd: Path, what: str) -> dict:
    try:
        with file.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise LintError(f"{display(file, cwd)}: no such {what}") from None
    except OSError as error:
        raise LintError(f"{display(file, cwd)}: cannot read {what}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise LintError(f"{display(file, cwd)}: not valid TOML: {error}") from None


# -- a run ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Context:
    """Everything a rule reads. `against` is the tree at `ref` (--against), else None."""

    tree: Tree
    sla: Registry
    faults: tuple[Fault, ...]
    generated: tuple[Path, Path] | None
    cwd: Path
    against: Tree | None = None
    ref: str = ""
    against_sla: Registry | None = None  # the registry at `ref`, when it is in the repository

    def display(self, path: Path) -> str:
        return display(path, self.cwd)
