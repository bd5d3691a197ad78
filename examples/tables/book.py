"""Books a table on a running TableService and prints the reply:

    python book.py TARGET TABLE_ID SLOT_START_MS PARTY_SIZE GUEST
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

import holdfast
from restaurant.tables.v1 import tables_pb2 as pb
from restaurant.tables.v1 import tables_pb2_grpc as pb_grpc

# The contracts' deadlines and retries, as `holdfast codegen` wrote them for
# gRPC. holdfast.channel applies them; passed to grpcio as the raw
# `grpc.service_config` option, the deadlines would fire a second or two early.
SERVICE_CONFIG = Path(__file__).resolve().parent / "service_config.json"


def main(argv: list[str] | None = None) -> int:
    target, table_id, slot_start_ms, party_size, guest = sys.argv[1:] if argv is None else argv
    with holdfast.channel(target, service_config=SERVICE_CONFIG) as channel:
        request = pb.BookRequest(table_id=table_id, slot_start_ms=int(slot_start_ms),
                                 party_size=int(party_size), guest=guest)
        try:
            reply = pb_grpc.TableServiceStub(channel).Book(request)
        except grpc.RpcError as error:
            print(f"Book failed: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    state = pb.BookingState.Name(reply.state).removeprefix("BOOKING_STATE_")
    print(f"{reply.booking_id}: {state} table {reply.table_id} for {reply.party_size} ({reply.guest})"
          f" at {reply.slot_start_ms} ms, no-show at {reply.no_show_at_ms} ms (version {reply.version})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
