"""`python -m tests.typecheck`: mypy over the core, backends and server layers.

mypy cannot follow setuptools' package-dir mapping (holdfast is service/,
holdfast.contracts is contracts/, holdfast.contract.v1 is
service/generated/holdfast/contract/v1/, ...), nor the editable install's
import hook. So the distribution's layout is staged as a tree of symlinks,
build/typecheck/holdfast/..., exactly as a wheel would install it (the
packages and folders read from pyproject.toml), and mypy runs there with
pyproject's [tool.mypy] settings. Its messages name the checkout's files
again (service/store.py, not build/typecheck/holdfast/store.py).

Which modules are checked comes from tests/test_layers.py's LAYERS: every
module of the core, backends and server layers. The modules they import
from other layers (the KNOWN_UPWARD edges) are read for their types but not
reported on (follow_imports = "silent").

Exit status is mypy's: 0 clean, 1 errors, 2 usage.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

from tests.test_layers import LAYERS, MODULES, ROOT, SERVER, _package_folders

STAGE = ROOT / "build" / "typecheck"


def stage() -> dict[Path, Path]:
    """Links every .py, .pyi and py.typed of the distribution into STAGE at
    its import path; returns staged path -> checkout path."""
    if STAGE.exists():
        shutil.rmtree(STAGE)
    staged: dict[Path, Path] = {}
    for package, folder in _package_folders().items():
        target = STAGE.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for file in sorted(folder.iterdir()):
            if file.is_file() and (file.suffix in (".py", ".pyi") or file.name == "py.typed"):
                link = target / file.name
                link.symlink_to(os.path.relpath(file, target))
                staged[link] = file
    return staged


def checked() -> list[str]:
    """The modules mypy reports on: core, backends and server."""
    return sorted(module for module, layer in LAYERS.items() if layer <= SERVER and module in MODULES)


def main(argv: list[str] | None = None) -> int:
    from mypy import api

    started = time.monotonic()
    modules = checked()
    # pyproject's mypy_path is the staged tree, so `-m holdfast.x` finds the
    # layout a wheel installs; the checkout's service/ is never read under
    # another name.
    args = ["--config-file", str(ROOT / "pyproject.toml"), *(argv or [])]
    for module in modules:
        args += ["-m", module]
    STAGE.parent.mkdir(parents=True, exist_ok=True)
    with open(STAGE.parent / "typecheck.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one run at a time restages the tree
        staged = stage()
        out, err, status = api.run(args)
    # Staged paths back to the checkout's, so an editor jumps to the real file.
    by_text = {str(link.relative_to(ROOT)): str(file.relative_to(ROOT)) for link, file in staged.items()}
    lines = []
    for line in out.splitlines():
        path, colon, rest = line.partition(":")
        lines.append(f"{by_text.get(path, path)}{colon}{rest}")
    sys.stdout.write("\n".join(lines) + ("\n" if lines else ""))
    sys.stdout.flush()
    sys.stderr.write(err)
    print(f"typecheck: {len(modules)} modules (core, backends, server) in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
