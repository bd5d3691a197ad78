"""`python -m contracts.lint_bench`: `holdfast lint` over a large tree, next to protoc alone.

Generates SERVICES files of one service with RPCS contracted RPCs each (half
of them read-only) in a temporary folder, then times, best of --repeat:

1. grpcio-tools alone compiling the tree into a descriptor set, with the
   flags lint uses (source info, imports) — the floor lint cannot go under;
2. `holdfast lint` over the same tree, clean (compile included);
3. `holdfast lint` with a finding on every RPC (an SLA registry that lacks
   the entry every contract names), the worst case for locating findings.

A benchmark, not a test: it prints numbers and asserts only the exit statuses.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from holdfast.contracts import lint, tree

RPC = """\
  rpc {name}({name}Request) returns (Reply) {{
{level}    option (holdfast.contract.v1.contract) = {{
      timeout_ms: {timeout}
{key}      retry: {{ max_attempts: 3 fixed_delay_ms: 100 retryable_codes: ["UNAVAILABLE"] }}
{lock}      sla: "{sla}"
    }};
  }}
"""


def write_tree(root: Path, services: int, rpcs: int) -> None:
    """The tree: bench/sNNN/v1/service.proto, one service each."""
    for s in range(services):
        package = f"bench.s{s:03d}.v1"
        body, messages = [], []
        for r in range(rpcs):
            read = r % 2 == 1
            name = f"{'Get' if read else 'Put'}Item{r}"
            body.append(RPC.format(
                name=name,
                level="    option idempotency_level = NO_SIDE_EFFECTS;\n" if read else "",
                timeout=500 if read else 2000,
                key="" if read else '      idempotency_key: ["item_id", "request_id"]\n',
                lock="" if read else "      lock_ttl_ms: 1000\n",
                sla="bench-read" if read else "bench-write",
            ))
            messages.append(f"message {name}Request {{\n  string item_id = 1;\n  string request_id = 2;\n  int64 quantity = 3;\n}}\n")
        folder = root / "bench" / f"s{s:03d}" / "v1"
        folder.mkdir(parents=True)
        (folder / "service.proto").write_text(
            f'syntax = "proto3";\n\npackage {package};\n\nimport "holdfast/contract/v1/contract.proto";\n\n'
            f"service Service{s:03d} {{\n" + "\n".join(body) + "}\n\n" + "\n".join(messages)
            + "message Reply {\n  string item_id = 1;\n  uint64 version = 2;\n}\n"
        )


def protoc_alone(root: Path, out: Path) -> Callable[[], None]:
    from grpc_tools import protoc

    files = sorted(str(p) for p in root.rglob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{root}", f"-I{tree.contract_include()}", f"-I{well_known}", "--include_source_info",
            "--include_imports", f"--descriptor_set_out={out}", *files]

    def run() -> None:
        assert protoc.main(args) == 0, "protoc failed"

    return run


def lint_run(root: Path, sla: Path, config: Path, status: int) -> Callable[[], None]:
    def run() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            got = lint.main([str(root), "--sla", str(sla), "--config", str(config)])
        assert got == status, f"holdfast lint exited {got}, expected {status}"

    return run


def best(run: Callable[[], None], repeat: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times), times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contracts.lint_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=500)
    parser.add_argument("--rpcs", type=int, default=10, help="RPCs per service")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="holdfast-lint-bench-") as scratch:
        base = Path(scratch)
        root = base / "protos"
        write_tree(root, args.services, args.rpcs)
        sla, missing, config = base / "sla.toml", base / "sla-missing.toml", base / "config.toml"
        sla.write_text("[bench-read]\ntimeout_ms_max = 1000\nbudget_ms = 2000\n\n[bench-write]\ntimeout_ms_max = 3000\nbudget_ms = 8000\n")
        missing.write_text("[other]\ntimeout_ms_max = 1000\nbudget_ms = 2000\n")
        config.write_text("[tool.holdfast.lint]\n")
        total = args.services * args.rpcs
        size = sum(p.stat().st_size for p in root.rglob("*.proto"))
        print(f"tree: {args.services} services x {args.rpcs} RPCs = {total} RPCs in {args.services} files ({size // 1024} KiB)")
        runs = [
            ("grpcio-tools alone (descriptor set, source info)", protoc_alone(root, base / "alone.pb")),
            ("holdfast lint, clean tree", lint_run(root, sla, config, 0)),
            (f"holdfast lint, a finding on each of the {total} RPCs", lint_run(root, missing, config, 1)),
        ]
        cwd = os.getcwd()
        os.chdir(base)  # paths in findings relative to the tree, as a CI job would print them
        try:
            for label, run in runs:
                fastest, times = best(run, args.repeat)
                print(f"{label:<60} {fastest:7.3f} s  (best of {args.repeat}: {', '.join(f'{t:.3f}' for t in times)})")
        finally:
            os.chdir(cwd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
