"""The gateway's key derivation is a promise: stored outcomes and reservation
ids were derived with it, so a new holdfast must derive the very same bytes."""

from __future__ import annotations

import pytest

from holdfast.call import idempotency_key
from holdfast.apps.inventory import reservation_id

INVENTORY = "/holdfast.inventory.v1.InventoryService/"


@pytest.mark.parametrize(
    ("method", "values", "key_hex"),
    [
        ("Reserve", ("order-1", "sku-ß", 1700000000000), "50ba43377af71d1aefe55d2c97c5f8a8c815be59e382bad5ec141ae4e843cc0f"),
        ("Confirm", ("rsv_0123",), "e777b3d27cd2b4bb2d1cb87678f0ffe7f03e993cc542297bc897275a990d675a"),
    ],
)
def test_idempotency_key_derivation_never_changes(method, values, key_hex):
    assert idempotency_key(INVENTORY + method, values).hex() == key_hex


def test_reservation_id_is_derived_from_the_reserve_key():
    key = bytes.fromhex("50ba43377af71d1aefe55d2c97c5f8a8c815be59e382bad5ec141ae4e843cc0f")
    assert reservation_id(key) == "rsv_50ba43377af71d1aefe55d2c"
