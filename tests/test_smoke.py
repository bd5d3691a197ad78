import service.generated  # noqa: F401
from holdfast.inventory.v1 import inventory_pb2 as pb

from tests.support import failure_of, raw_call
import grpc, pytest


async def test_put_then_reserve_holds_stock(stub, channel):
    await stub.PutStock(pb.PutStockRequest(sku_id="s", total=5, request_id="r1"))
    reply, trailing = await raw_call(channel, "Reserve", pb.ReserveRequest(order_id="o", sku_id="s", quantity=2, timestamp_ms=1))
    again, trailing2 = await raw_call(channel, "Reserve", pb.ReserveRequest(order_id="o", sku_id="s", quantity=2, timestamp_ms=1))
    assert reply == again and trailing2["holdfast-replayed"] == "true"
    stock = await stub.GetStock(pb.GetStockRequest(sku_id="s"))
    assert (stock.available, stock.held) == (3, 2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Reserve(pb.ReserveRequest(order_id="o", sku_id="s", quantity=3, timestamp_ms=1))
    assert failure_of(err.value).reason == "IDEMPOTENCY_KEY_REUSED"
