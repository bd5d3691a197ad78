"""`holdfast`: the server, code generation, and a small client for the tour."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import traceback
import uuid

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from holdfast.gateway import CONTEXT_ID, REPLAYED

DEFAULT_TARGET = "127.0.0.1:50051"
# holdfast.graph.Format's values; spelled here so building the parser imports no machine.
GRAPH_FORMATS = ("mermaid", "svg", "png")
# holdfast's own services, by the names `holdfast serve --services` takes.
# The tools are the only layer that names an app: the server hosts what it
# is given (Config.apps is empty by default), so `holdfast serve` hands it
# these when none is named, and the commands below are handed them too.
BUILT_IN = {"inventory": "holdfast.apps.inventory:Inventory", "fulfillment": "holdfast.apps.fulfillment:Dispatch"}
SERVICES = tuple(BUILT_IN)
# The apps `holdfast simulate --app` takes by name (each names its own
# workload: Service.workload), and the one it runs when none is named.
SIMULATED = {"inventory": BUILT_IN["inventory"], "dispatch": BUILT_IN["fulfillment"]}
SIMULATED_BY_DEFAULT = "inventory"

# Subcommands whose module parses its own arguments: name -> (module, summary).
DELEGATED = {
    "bench": ("holdfast.bench", "measure Reserve throughput against a bare gRPC echo baseline"),
    "lint": ("holdfast.contracts.lint", "check the contracts in .proto files (and breaking changes --against a git ref)"),
    "doctor": ("holdfast.doctor", "preflight: versions, generated code, store and snapshot reachable"),
    "replay": ("holdfast.replay", "replay a journal and compare every answer byte for byte"),
    "simulate": ("holdfast.simulate", "seeded simulation with injected faults against an auditor model"),
    "stats": ("holdfast.stats", "print a running server's metrics as a table"),
}
# What a delegated command's `main` is handed beside its arguments: the
# built-in apps, for the testing layer's commands, which name none.
HANDED: dict[str, dict[str, object]] = {
    # A journal of format 1 names no apps: it was recorded hosting these.
    "replay": {"default_apps": tuple(BUILT_IN.values())},
    "simulate": {"built_in": SIMULATED, "default_app": SIMULATED_BY_DEFAULT},
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in DELEGATED:  # these commands own their own arguments
        module = importlib.import_module(DELEGATED[argv[0]][0])
        return module.main(argv[1:], **HANDED.get(argv[0], {}))
    args = _parser().parse_args(argv)
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="holdfast", description="Deterministic reservation services.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run holdfast's inventory and fulfillment services, or your own (--app)")
    serve.add_argument("--listen", default=os.environ.get("HOLDFAST_LISTEN", "127.0.0.1:50051"))
    serve.add_argument("--store", default=os.environ.get("HOLDFAST_STORE", "sqlite:///./holdfast.db"))
    serve.add_argument("--snapshot", default=os.environ.get("HOLDFAST_SNAPSHOT", "memory://"))
    serve.add_argument("--store-pool", type=_positive, default=1, help="writer connections to a PostgreSQL store")
    serve.add_argument(
        "--metrics-listen", default=os.environ.get("HOLDFAST_METRICS_LISTEN", ""), help="HOST:PORT to serve Prometheus /metrics"
    )
    serve.add_argument("--hold-default-ms", type=_positive, default=15 * 60 * 1000, help="hold when a Reserve asks for 0")
    serve.add_argument(
        "--retention-ms", type=_not_negative, default=24 * 60 * 60 * 1000,
        help="keep settled entities and outcome records this long, then prune them (default 24 h; 0 keeps all)",
    )
    serve.add_argument(
        "--tombstone-ms", type=_not_negative, default=24 * 60 * 60 * 1000,
        help="after pruning, answer a key IDEMPOTENCY_KEY_EXPIRED this long before it counts as new (default 24 h)",
    )
    serve.add_argument(
        "--faults", default=os.environ.get("HOLDFAST_FAULTS", ""), help="TOML fault injection file (chaos runs and tests)"
    )
    serve.add_argument(
        "--journal", default=os.environ.get("HOLDFAST_JOURNAL", ""), help="append every call to this JSON-lines journal"
    )
    serve.add_argument(
        "--otlp-endpoint", default=os.environ.get("HOLDFAST_OTLP_ENDPOINT", ""), metavar="HOST:PORT",
        help="export OpenTelemetry traces of every call over OTLP/gRPC to this receiver (needs pip install 'holdfast[otel]')",
    )
    serve.add_argument(
        "--metrics-port", type=_positive, default=None, help="serve Prometheus /metrics on 127.0.0.1:PORT"
    )
    serve.add_argument(
        "--workers", type=_positive, default=os.environ.get("HOLDFAST_WORKERS", "1"),
        help="server processes sharing the port (SO_REUSEPORT); more than 1 needs a postgresql:// store"
        " and a redis:// snapshot, and worker i serves /metrics on the metrics port + i - 1",
    )
    serve.add_argument(
        "--services", type=_services, default=_services(os.environ["HOLDFAST_SERVICES"]) if os.environ.get("HOLDFAST_SERVICES") else None,
        help=f"the built-in services to host, sharing the store and the snapshot (default {','.join(SERVICES)},"
        " or none when --app is given)",
    )
    serve.add_argument(
        "--app", action="append", default=[], metavar="MODULE:ATTR", dest="apps",
        help="a service of your own to host: a holdfast.Service subclass or a factory engine -> Service,"
        " imported from the current folder as `python -m` would (repeatable)",
    )
    serve.add_argument(
        "--setting", action="append", default=[], metavar="NAME=VALUE", dest="settings", type=_setting,
        help="a setting your apps read when they are made (Service.from_settings); VALUE is JSON"
        " (a number, true, \"text\") or else text (repeatable)",
    )
    serve.add_argument(
        "--carrier-failure-rate", type=float, default=0.0,
        help="share of dispatch attempts the simulated carrier refuses (0..1, default 0)",
    )
    serve.add_argument(
        "--carrier-latency-ms", type=int, default=0, help="mean latency of the simulated carrier (default 0)"
    )
    _security(serve)
    _limits(serve)
    serve.set_defaults(run=_serve)

    for name, (_, summary) in DELEGATED.items():
        commands.add_parser(name, add_help=False, help=summary)

    verify = commands.add_parser(
        "verify", help="check a store's books and its snapshot, read-only (exit 1 naming each finding)"
    )
    verify.set_defaults(run=lambda a: __import__("holdfast.verify", fromlist=["command"]).command(a, BUILT_IN))
    __import__("holdfast.verify", fromlist=["add_arguments"]).add_arguments(verify, BUILT_IN)

    codegen = commands.add_parser("codegen", help="generate code from protos/ (or --check its freshness)")
    codegen.add_argument("--check", action="store_true", help="exit 1, naming stale files, if the stamp does not match")
    codegen.add_argument(
        "--protos", metavar="DIR", default=None,
        help="your proto root (holdfast's protos/ is on the include path too); needs --out; default: holdfast's protos/",
    )
    codegen.add_argument(
        "--out", metavar="DIR", default=None, help="the one folder the code goes into; default: service/generated"
    )
    codegen.set_defaults(
        run=lambda a: __import__("holdfast.contracts.codegen", fromlist=["main"]).main(a.check, a.protos, a.out)
    )

    graph = commands.add_parser("graph", help="draw a service's state machine (mermaid text, svg or png)")
    graph.add_argument(
        "machine", help="inventory, fulfillment, or your own as package.module:ATTRIBUTE (a holdfast.Machine)"
    )
    graph.add_argument("--format", choices=GRAPH_FORMATS, default=GRAPH_FORMATS[0], help="svg and png need Graphviz")
    graph.add_argument("--output", default=None, metavar="FILE", help="write the diagram here instead of stdout")
    graph.set_defaults(run=_graph)

    stock = commands.add_parser("stock", help="put or get a SKU's stock").add_subparsers(dest="verb", required=True)
    put = _client(stock.add_parser("put", help="set a SKU's total stock"))
    put.add_argument("sku_id")
    put.add_argument("total", type=int)
    put.add_argument("--request-id", default=None, help="idempotency key part (default: a fresh one)")
    put.set_defaults(run=_put_stock)
    get_stock = _client(stock.add_parser("get", help="read a SKU's stock"))
    get_stock.add_argument("sku_id")
    get_stock.set_defaults(run=lambda a: _call(a, "GetStock", pb.GetStockRequest(sku_id=a.sku_id)))

    reserve = _client(commands.add_parser("reserve", help="hold stock for an order"))
    reserve.add_argument("order_id")
    reserve.add_argument("sku_id")
    reserve.add_argument("quantity", type=int)
    reserve.add_argument("--timestamp-ms", type=int, default=None, help="key part; repeat it to replay (default: now)")
    reserve.add_argument("--hold-ms", type=int, default=0, help="0 means the server's default hold")
    reserve.set_defaults(run=_reserve)

    confirm = _client(commands.add_parser("confirm", help="turn a hold into a sale"))
    confirm.add_argument("reservation_id")
    confirm.add_argument("--expected-version", type=int, default=0)
    confirm.set_defaults(
        run=lambda a: _call(a, "Confirm", pb.ConfirmRequest(reservation_id=a.reservation_id, expected_version=a.expected_version))
    )

    release = _client(commands.add_parser("release", help="give a hold back"))
    release.add_argument("reservation_id")
    release.add_argument("--reason", default="")
    release.set_defaults(run=lambda a: _call(a, "Release", pb.ReleaseRequest(reservation_id=a.reservation_id, reason=a.reason)))

    get = _client(commands.add_parser("get", help="read a reservation"))
    get.add_argument("reservation_id")
    get.set_defaults(run=lambda a: _call(a, "GetReservation", pb.GetReservationRequest(reservation_id=a.reservation_id)))
    return parser


def _security(serve: argparse.ArgumentParser) -> None:
    """`holdfast serve`'s TLS, token and backend credential flags (docs/security.md)."""
    env = os.environ.get
    group = serve.add_argument_group("security (docs/security.md)")
    group.add_argument("--tls-cert", metavar="FILE", default=env("HOLDFAST_TLS_CERT", ""),
                       help="serve TLS with this PEM certificate (chain); needs --tls-key")
    group.add_argument("--tls-key", metavar="FILE", default=env("HOLDFAST_TLS_KEY", ""),
                       help="the certificate's PEM private key (unencrypted)")
    group.add_argument("--tls-client-ca", metavar="FILE", default=env("HOLDFAST_TLS_CLIENT_CA", ""),
                       help="mutual TLS: require client certificates issued by this PEM CA")
    group.add_argument("--auth-tokens", metavar="FILE", default=env("HOLDFAST_AUTH_TOKENS", ""),
                       help="require bearer tokens: a TOML file of [[token]] name, sha256, roles")
    group.add_argument("--store-password-file", metavar="FILE", default=env("HOLDFAST_STORE_PASSWORD_FILE", ""),
                       help="the store's password, merged into --store (or HOLDFAST_STORE_PASSWORD)")
    group.add_argument("--snapshot-password-file", metavar="FILE",
                       default=env("HOLDFAST_SNAPSHOT_PASSWORD_FILE", ""),
                       help="the snapshot's password, merged into --snapshot (or HOLDFAST_SNAPSHOT_PASSWORD)")


def _limits(serve: argparse.ArgumentParser) -> None:
    from holdfast.limits import Limits  # light: grpc and protobuf, already imported here

    env, default = os.environ.get, Limits()
    group = serve.add_argument_group("limits under load (docs/security.md)")
    group.add_argument("--max-concurrent-rpcs", metavar="N", type=_positive,
                       default=env("HOLDFAST_MAX_CONCURRENT_RPCS", str(default.max_concurrent_rpcs)),
                       help=f"calls worked on at once; more are refused RESOURCE_EXHAUSTED/OVERLOADED"
                       f" with a retry pushback (default {default.max_concurrent_rpcs})")
    group.add_argument("--max-message-bytes", metavar="N", type=_positive,
                       default=env("HOLDFAST_MAX_MESSAGE_BYTES", str(default.max_message_bytes)),
                       help=f"largest request or reply; larger are refused RESOURCE_EXHAUSTED"
                       f" (default {default.max_message_bytes})")
    group.add_argument("--retry-pushback-ms", metavar="MS", type=_positive,
                       default=env("HOLDFAST_RETRY_PUSHBACK_MS", str(default.retry_pushback_ms)),
                       help=f"how long a refused client is told to wait, +-50%% jitter"
                       f" (default {default.retry_pushback_ms})")


def _services(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(names) - set(SERVICES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"must be some of {','.join(SERVICES)}, got {text!r}")
    return tuple(dict.fromkeys(names))


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _client(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    env = os.environ.get
    parser.add_argument("--target", default=env("HOLDFAST_TARGET", DEFAULT_TARGET))
    parser.add_argument("--json", action="store_true", help="print the reply (or error) as JSON")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--tls-ca", metavar="FILE", default=env("HOLDFAST_TLS_CA", ""),
                        help="connect with TLS, trusting this PEM CA")
    parser.add_argument("--tls-cert", metavar="FILE", default=env("HOLDFAST_CLIENT_TLS_CERT", ""),
                        help="mutual TLS: this client's PEM certificate (needs --tls-key and --tls-ca)")
    parser.add_argument("--tls-key", metavar="FILE", default=env("HOLDFAST_CLIENT_TLS_KEY", ""),
                        help="the client certificate's PEM private key")
    parser.add_argument("--token", default=env("HOLDFAST_TOKEN", ""),
                        help="bearer token (prefer HOLDFAST_TOKEN: a flag shows in the process list)")
    return parser


def _setting(text: str) -> tuple[str, object]:
    name, equals, value = text.partition("=")
    if not equals or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME an identifier, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def _apps(args: argparse.Namespace) -> tuple[str, ...]:
    """The built-in services `--services` names (all of them unless only
    `--app` is given), then the team's own."""
    names = args.services if args.services is not None else () if args.apps else SERVICES
    return (*(BUILT_IN[name] for name in names), *args.apps)


def _serve(args: argparse.Namespace) -> int:
    from holdfast.loop import run
    from holdfast.limits import Limits
    from holdfast.redaction import scrub
    from holdfast.retention import Policy
    from holdfast.server import Config, check, secrets, serve
    from holdfast.store import StoreUnavailable

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The built-in apps' own flags are settings like any app's.
    settings = {"hold_default_ms": args.hold_default_ms, "carrier_failure_rate": args.carrier_failure_rate,
                "carrier_latency_ms": args.carrier_latency_ms, **dict(args.settings)}
    try:
        limits = Limits(args.max_concurrent_rpcs, args.max_message_bytes, args.retry_pushback_ms)
    except ValueError as error:
        print(f"holdfast: {error}", file=sys.stderr)
        return 2
    config = Config(listen=args.listen, store=args.store, snapshot=args.snapshot, store_pool=args.store_pool,
                    metrics_listen=args.metrics_listen or (f"127.0.0.1:{args.metrics_port}" if args.metrics_port else ""),
                    faults=args.faults, journal=args.journal, apps=_apps(args), settings=settings,
                    tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                    auth_tokens=args.auth_tokens,
                    store_password=os.environ.get("HOLDFAST_STORE_PASSWORD", ""),
                    store_password_file=args.store_password_file,
                    snapshot_password=os.environ.get("HOLDFAST_SNAPSHOT_PASSWORD", ""),
                    snapshot_password_file=args.snapshot_password_file, limits=limits,
                    retention=Policy(args.retention_ms, args.tombstone_ms), otlp_endpoint=args.otlp_endpoint)
    if args.apps:
        _importable_from_here()
    try:
        check(config)  # the apps and the files, before a worker spawns or a backend opens
        if args.workers > 1:
            from holdfast.workers import supervise

            return supervise(config, args.workers)
        run(serve(config))
    except (OSError, ValueError, StoreUnavailable) as error:
        # Backends scrub their own errors; this is the second line of defence.
        print(f"holdfast: {scrub(str(error), secrets(config))}", file=sys.stderr)
        return 2
    except Exception:  # a bug: its traceback, as Python would print it, without the passwords
        print(scrub(traceback.format_exc(), secrets(config)), end="", file=sys.stderr)
        return 1
    return 0


def _graph(args: argparse.Namespace) -> int:
    from holdfast.graph import MACHINES, GraphvizMissing, draw

    try:
        machine = _machine(args.machine, MACHINES)
    except LookupError as error:
        print(f"holdfast graph: {error}", file=sys.stderr)
        return 2
    try:
        drawn = draw(machine, args.format)
    except GraphvizMissing as error:
        print(f"holdfast graph: {error}", file=sys.stderr)
        return 2
    data = drawn.encode() if isinstance(drawn, str) else drawn
    if args.output:
        try:
            with open(args.output, "wb") as file:
                file.write(data)
        except OSError as error:
            print(f"holdfast graph: {error}", file=sys.stderr)
            return 2
    elif isinstance(drawn, bytes) and sys.stdout.isatty():
        print(f"holdfast graph: {args.format} is binary; write it with --output FILE", file=sys.stderr)
        return 2
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


def _machine(name: str, known: dict) -> object:
    """A machine by name (`inventory`, `fulfillment`), or a team's own as
    `package.module:ATTRIBUTE` naming a `holdfast.Machine`."""
    from holdfast import Machine

    if ":" not in name:
        if name not in known:
            raise LookupError(f"no machine {name!r}; known: {', '.join(sorted(known))}, or MODULE:ATTRIBUTE")
        return known[name]
    module_name, _, attribute = name.partition(":")
    _importable_from_here()
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise LookupError(f"cannot load {name!r}: {error}") from None
    if not isinstance(found, Machine):
        raise LookupError(f"{name!r} is a {type(found).__name__}, not a holdfast.Machine")
    return found


def _importable_from_here() -> None:
    from holdfast.server import importable_from_here

    importable_from_here()


def _put_stock(args: argparse.Namespace) -> int:
    request_id = args.request_id or uuid.uuid4().hex
    return _call(args, "PutStock", pb.PutStockRequest(sku_id=args.sku_id, total=args.total, request_id=request_id))


def _reserve(args: argparse.Namespace) -> int:
    import time

    timestamp_ms = args.timestamp_ms if args.timestamp_ms is not None else time.time_ns() // 1_000_000
    request = pb.ReserveRequest(
        order_id=args.order_id, sku_id=args.sku_id, quantity=args.quantity, timestamp_ms=timestamp_ms, hold_ms=args.hold_ms
    )
    return _call(args, "Reserve", request)


def _call(args: argparse.Namespace, method: str, request) -> int:
    from holdfast import client

    try:
        credentials = client.tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except (OSError, ValueError) as error:
        print(f"holdfast: {error}", file=sys.stderr)
        return 2
    with client.channel(args.target, credentials=credentials, token=args.token or None) as channel:
        stub = getattr(pb_grpc.InventoryServiceStub(channel), method)
        try:
            reply, call = stub.with_call(request, timeout=args.timeout_s)
        except grpc.RpcError as error:
            return _print_error(args, method, error)
    trailing = dict(call.trailing_metadata() or ())
    replayed = trailing.get(REPLAYED) == "true"
    if args.json:
        body = json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)
        print(json.dumps({"method": method, "reply": body, "replayed": replayed, "context_id": trailing.get(CONTEXT_ID)}))
    else:
        print(_line(reply) + ("  (replayed)" if replayed else ""))
    return 0


def _line(reply) -> str:
    if isinstance(reply, pb.StockReply):
        return (
            f"{reply.sku_id}: total {reply.total}, available {reply.available}, held {reply.held},"
            f" sold {reply.sold} (version {reply.version})"
        )
    state = pb.ReservationState.Name(reply.state).removeprefix("RESERVATION_STATE_")
    return (
        f"{reply.reservation_id}: {state} {reply.quantity} x {reply.sku_id} for order {reply.order_id}"
        f" (version {reply.version}, expires at {reply.expires_at_ms} ms)"
    )


def _print_error(args: argparse.Namespace, method: str, error: grpc.RpcError) -> int:
    reason, violations = error.code().name, []
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [(v.field, v.description) for v in bad.field_violations]
    if args.json:
        print(json.dumps({"method": method, "status": error.code().name, "reason": reason, "message": error.details(),
                          "field_violations": [{"field": f, "description": d} for f, d in violations]}))
    else:
        print(f"{method} failed: {reason}: {error.details()}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
