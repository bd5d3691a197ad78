"""Runs the tables example until SIGTERM or SIGINT:

    python -m examples.tables.serve [--listen HOST:PORT] [--store URL] [--snapshot URL]
"""

from __future__ import annotations

import argparse
import asyncio

from service.framework import Config, serve

from .tables import Tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.tables.serve", description="Serve TableService.")
    parser.add_argument("--listen", default="127.0.0.1:50052")
    parser.add_argument("--store", default="sqlite:///./tables.db")
    parser.add_argument("--snapshot", default="memory://")
    args = parser.parse_args(argv)
    # services=() hosts none of holdfast's own services: TableService alone.
    config = Config(listen=args.listen, store=args.store, snapshot=args.snapshot, services=())
    asyncio.run(serve(config, services=[lambda engine: Tables(engine)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
