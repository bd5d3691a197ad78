"""Security over real gRPC: TLS and mutual TLS, bearer tokens with roles,
and backend passwords that never show, in any line a server prints or any
error a client receives (docs/security.md).

Certificates are made here with the `openssl` binary (a CA, a server
certificate for 127.0.0.1, client certificates from the trusted CA and from
another one); no Python dependency is needed for that.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from holdfast.fulfillment.v1 import fulfillment_pb2 as fpb
from holdfast.fulfillment.v1 import fulfillment_pb2_grpc as fpb_grpc
from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from google.rpc import error_details_pb2
from grpc_status import rpc_status

from holdfast import client, redaction, security
from holdfast.apps.fulfillment import Dispatch
from holdfast.apps.inventory import Inventory, InventoryReason
from holdfast.engine import Engine
from holdfast.outcome import DOMAIN, Reason
from holdfast.server import Config, start
from tests.process import ServerProcess, free_port, run_holdfast, start_server
from tests.support import BUILT_IN_APPS, failure_of

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")

ADMIN_TOKEN = "admin-token-0123456789abcdef"
CLIENT_TOKEN = "client-token-fedcba9876543210"
PASSWORD = "s3cret-Pa55word-7f1e"  # must never be printed
SKU = "sku-sec"

# -- certificates -----------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)


def _issue(folder: Path, ca: str, name: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)


@dataclass(frozen=True)
class Pki:
    folder: Path

    def __getitem__(self, name: str) -> str:
        return str(self.folder / name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """ca (trusted), server (127.0.0.1 and localhost), client (from ca),
    rogue-ca and intruder (a client certificate from rogue-ca)."""
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "ca")
    _ca(folder, "rogue-ca")
    _issue(folder, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _issue(folder, "ca", "client", "extendedKeyUsage=clientAuth\n")
    _issue(folder, "rogue-ca", "intruder", "extendedKeyUsage=clientAuth\n")
    return Pki(folder)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokens") / "tokens.toml"
    path.write_text(
        "# holdfast bearer tokens: the sha256 of each, never the token\n"
        f'[[token]]\nname = "ops"\nsha256 = "{security.token_hash(ADMIN_TOKEN)}"\nroles = ["admin"]\n\n'
        f'[[token]]\nname = "shop"\nsha256 = "{security.token_hash(CLIENT_TOKEN)}"\nroles = ["client"]\n'
    )
    return str(path)


def _config(tmp_path: Path, **kwargs) -> Config:
    return Config(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/holdfast.db", snapshot="memory://",
                  reaper_interval_ms=3_600_000, **{"apps": BUILT_IN_APPS, **kwargs})


def _ssl(pki: Pki, ca: str = "ca.pem", cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    return client.tls_credentials(pki[ca], pki[cert] if cert else "", pki[key] if key else "")


async def _stock(channel: grpc.aio.Channel, token: str | None = None) -> pb.StockReply:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    return await pb_grpc.InventoryServiceStub(channel).GetStock(pb.GetStockRequest(sku_id=SKU), timeout=10,
                                                                metadata=metadata)


# -- TLS ----------------------------------------------------------------------------------


async def test_a_tls_server_refuses_plaintext_and_serves_a_client_that_trusts_its_ca(pki, tmp_path):
    running = await start(_config(tmp_path, tls_cert=pki["server.pem"], tls_key=pki["server.key"]))
    target = f"127.0.0.1:{running.port}"
    try:
        async with grpc.aio.insecure_channel(target) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _stock(plain)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(target, _ssl(pki)) as secure:
            stub = pb_grpc.InventoryServiceStub(secure)
            put = await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=5, request_id="r1"), timeout=10)
            assert (put.total, put.available) == (5, 5)
            assert (await _stock(secure)).version == put.version
        # A client trusting another CA does not trust this server.
        async with grpc.aio.secure_channel(target, _ssl(pki, ca="rogue-ca.pem")) as doubtful:
            with pytest.raises(grpc.aio.AioRpcError) as untrusted:
                await _stock(doubtful)
            assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)


async def test_mutual_tls_refuses_no_certificate_and_an_untrusted_one_and_accepts_the_trusted(pki, tmp_path):
    running = await start(_config(tmp_path, tls_cert=pki["server.pem"], tls_key=pki["server.key"],
                                  tls_client_ca=pki["ca.pem"]))
    target = f"127.0.0.1:{running.port}"
    try:
        for credentials in (_ssl(pki), _ssl(pki, cert="intruder.pem", key="intruder.key")):
            async with grpc.aio.secure_channel(target, credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _stock(channel)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(target, _ssl(pki, cert="client.pem", key="client.key")) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await _stock(channel)  # through: the SKU is simply unknown
            assert failure_of(unknown.value).reason == InventoryReason.SKU_NOT_FOUND.name
    finally:
        await running.stop(0)


@pytest.mark.parametrize(
    "flags, words",
    [
        (("--tls-cert", "server.pem"), "--tls-cert needs --tls-key"),
        (("--tls-key", "server.key"), "--tls-key needs --tls-cert"),
        (("--tls-client-ca", "ca.pem"), "--tls-client-ca needs --tls-cert and --tls-key"),
        (("--tls-cert", "missing.pem", "--tls-key", "server.key"), "missing.pem: cannot read it"),
        (("--tls-cert", "server.pem", "--tls-key", "client.key"), "are not a PEM certificate and its"),
        (("--tls-cert", "server.pem", "--tls-key", "server.key", "--tls-client-ca", "server.ext"),
         "is not a PEM CA certificate"),
    ],
)
def test_serve_refuses_incomplete_or_unreadable_tls_files_in_one_line(pki, tmp_path, flags, words):
    args = [pki[flag] if not flag.startswith("--") else flag for flag in flags]
    done = run_holdfast("serve", "--listen", f"127.0.0.1:{free_port()}", "--store", f"sqlite:///{tmp_path}/h.db",
                        *args, timeout=60)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("holdfast: ") and words in lines[0], done.stderr
    assert not (tmp_path / "h.db").exists()  # refused before the store was opened


# -- tokens -------------------------------------------------------------------------------


async def _stock_seen_by_admin(target: str) -> bytes:
    async with client.aio_channel(target, token=ADMIN_TOKEN) as channel:
        stock = await pb_grpc.InventoryServiceStub(channel).GetStock(pb.GetStockRequest(sku_id=SKU), timeout=10)
        return stock.SerializeToString(deterministic=True)


def _refusal(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    found = failure_of(error)
    assert found.domain == DOMAIN
    return error.code(), found.reason


async def test_tokens_missing_wrong_and_underprivileged_are_refused_and_change_nothing(tmp_path, token_file):
    running = await start(_config(tmp_path, auth_tokens=token_file))
    target = f"127.0.0.1:{running.port}"
    try:
        async with client.aio_channel(target, token=ADMIN_TOKEN) as admin:
            await pb_grpc.InventoryServiceStub(admin).PutStock(
                pb.PutStockRequest(sku_id=SKU, total=10, request_id="restock-1"), timeout=10)
        before = await _stock_seen_by_admin(target)
        reserve = pb.ReserveRequest(order_id="o-1", sku_id=SKU, quantity=2, timestamp_ms=1)
        restock = pb.PutStockRequest(sku_id=SKU, total=1, request_id="restock-2")
        cases = [
            (None, "Reserve", reserve, grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHENTICATED),
            ("not-a-token-of-this-server", "Reserve", reserve, grpc.StatusCode.UNAUTHENTICATED,
             Reason.UNAUTHENTICATED),
            (CLIENT_TOKEN, "PutStock", restock, grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED),
            (None, "PutStock", restock, grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHENTICATED),
        ]
        for token, method, request, code, reason in cases:
            async with client.aio_channel(target, token=token) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await getattr(pb_grpc.InventoryServiceStub(channel), method)(request, timeout=10)
            assert _refusal(refused.value) == (code, reason.name), (token, method)
            assert await _stock_seen_by_admin(target) == before, (token, method)
        # A malformed header is UNAUTHENTICATED too, and names no token.
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as malformed:
                await pb_grpc.InventoryServiceStub(channel).Reserve(
                    reserve, timeout=10, metadata=(("authorization", f"Basic {CLIENT_TOKEN}"),))
        assert _refusal(malformed.value) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
        assert await _stock_seen_by_admin(target) == before
        # The client role reserves, reads, and calls the dispatch service.
        # The refused Reserves recorded nothing: the same call now runs
        # afresh (not a replay) and is the only reservation on the SKU.
        async with client.aio_channel(target, token=CLIENT_TOKEN) as channel:
            stub = pb_grpc.InventoryServiceStub(channel)
            call = stub.Reserve(reserve, timeout=10)
            hold = await call
            assert dict(await call.trailing_metadata())["holdfast-replayed"] == "false"
            assert (await stub.GetStock(pb.GetStockRequest(sku_id=SKU), timeout=10)).held == 2
            assert (await stub.GetReservation(pb.GetReservationRequest(reservation_id=hold.reservation_id),
                                              timeout=10)).state == pb.RESERVATION_STATE_RESERVED
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await fpb_grpc.DispatchServiceStub(channel).GetWaybill(fpb.GetWaybillRequest(waybill_id="wb_x"),
                                                                      timeout=10)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await running.stop(0)


async def test_health_and_reflection_answer_without_a_token(tmp_path, token_file):
    running = await start(_config(tmp_path, auth_tokens=token_file))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name async for answer in answers for s in answer.list_services_response.service}
            assert "holdfast.inventory.v1.InventoryService" in names
    finally:
        await running.stop(0)


class _OperatedDispatch(Dispatch):
    """Dispatch keeping one RPC of its own for operators: what a team's app
    declares with `admin_methods`, as inventory does PutStock."""

    admin_methods = ("GetWaybill",)


def _operated_dispatch(engine: Engine) -> Dispatch:
    return _OperatedDispatch.from_settings(engine, {})


def _error_info(error: grpc.aio.AioRpcError) -> tuple[str, str, dict[str, str]]:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason, info.domain, dict(info.metadata)
    raise AssertionError(f"no ErrorInfo in {error!r}")


async def test_an_apps_own_admin_method_is_refused_to_a_client_token_as_put_stock_is(tmp_path, token_file):
    running = await start(_config(tmp_path, auth_tokens=token_file, apps=("holdfast.apps.inventory:Inventory",)),
                          services=[_operated_dispatch])
    target = f"127.0.0.1:{running.port}"
    try:
        async with client.aio_channel(target, token=CLIENT_TOKEN) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as put:
                await pb_grpc.InventoryServiceStub(channel).PutStock(
                    pb.PutStockRequest(sku_id=SKU, total=1, request_id="r1"), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as own:
                await fpb_grpc.DispatchServiceStub(channel).GetWaybill(
                    fpb.GetWaybillRequest(waybill_id="wb_x"), timeout=10)
            # Its other RPCs stay the client's.
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await fpb_grpc.DispatchServiceStub(channel).Acknowledge(
                    fpb.AcknowledgeRequest(waybill_id="wb_x"), timeout=10)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert own.value.code() == put.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert _error_info(own.value) == _error_info(put.value) == (
            Reason.PERMISSION_DENIED.name, DOMAIN, {"token": "shop", "role": "admin"})
        assert own.value.details() == (
            "token 'shop' lacks the role 'admin' that holdfast.fulfillment.v1.DispatchService/GetWaybill needs")
        async with client.aio_channel(target, token=ADMIN_TOKEN) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as admitted:
                await fpb_grpc.DispatchServiceStub(channel).GetWaybill(
                    fpb.GetWaybillRequest(waybill_id="wb_x"), timeout=10)
            assert admitted.value.code() == grpc.StatusCode.NOT_FOUND  # through: the waybill is simply unknown
    finally:
        await running.stop(0)


class _Misspelt(Inventory):
    admin_methods = ("PutStocks",)


async def test_an_admin_method_its_app_does_not_have_stops_the_start(tmp_path):
    """A misspelt name would leave the RPC it meant open to every client."""
    with pytest.raises(ValueError, match=r"_Misspelt.admin_methods names 'PutStocks', an RPC"
                                         r" holdfast.inventory.v1.InventoryService does not have"):
        await start(_config(tmp_path, apps=()), services=[_Misspelt])


def test_the_journal_never_holds_the_token(tmp_path, token_file):
    """The journal records calls' metadata; the token is hidden from it."""
    journal = tmp_path / "calls.jsonl"
    server = start_server(f"sqlite:///{tmp_path}/h.db", extra=("--auth-tokens", token_file, "--journal", str(journal)))
    try:
        done = run_holdfast("stock", "put", SKU, "3", "--request-id", "r1", "--target", server.target,
                            "--token", ADMIN_TOKEN)
        assert done.returncode == 0, done
    finally:
        assert server.stop() == 0
        server.close()
    text = journal.read_text()
    assert '"kind":"call"' in text and ADMIN_TOKEN not in text and "authorization" not in text


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "no [[token]] table"),
        ('[[token]]\nname = "a"\nsha256 = "abc"\nroles = ["admin"]\n', "expected 64 hex digits"),
        (f'[[token]]\nname = "a"\nsha256 = "{"0" * 64}"\nroles = ["root"]\n', "unknown role 'root'"),
        (f'[[token]]\nname = "a"\nsha256 = "{"0" * 64}"\nroles = []\n', "non-empty list of roles"),
        (f'[[token]]\nname = "a"\nsha256 = "{"0" * 64}"\nroles = ["admin"]\ntoken = "x"\n', "unknown key"),
        (f'[[token]]\nname = "a"\nsha256 = "{"0" * 64}"\nroles = ["admin"]\n'
         f'[[token]]\nname = "a"\nsha256 = "{"1" * 64}"\nroles = ["admin"]\n', "two tokens have name 'a'"),
    ],
)
def test_a_bad_token_file_is_refused_naming_what_is_wrong(text, words):
    with pytest.raises(ValueError, match=None) as refused:
        security.parse_tokens(text, "tokens.toml")
    assert words in str(refused.value) and str(refused.value).startswith("tokens.toml")


# -- credentials: merged, redacted, never printed -----------------------------------------


@pytest.mark.parametrize(
    "url, redacted, secrets",
    [
        ("postgresql://holdfast:pw@db:5432/h", "postgresql://holdfast:***@db:5432/h", ("pw",)),
        ("postgresql://holdfast@db:5432/h", "postgresql://holdfast@db:5432/h", ()),
        ("redis://:p%40ss@cache:6379/0", "redis://:***@cache:6379/0", ("p%40ss", "p@ss")),
        ("redis://user:a:b@cache/0", "redis://user:***@cache/0", ("a:b",)),
        ("postgresql://u:pw@[::1:5432/h", "postgresql://u:***@[::1:5432/h", ("pw",)),  # malformed, still found
        ("postgresql://u:pw@h1:1,h2:2/db?sslmode=require", "postgresql://u:***@h1:1,h2:2/db?sslmode=require", ("pw",)),
        ("postgresql://h/db?user=u@x", "postgresql://h/db?user=u@x", ()),  # an @ after the host is no user part
        ("sqlite:///./holdfast.db", "sqlite:///./holdfast.db", ()),
    ],
)
def test_urls_are_redacted_however_they_are_written(url, redacted, secrets):
    assert redaction.redact_url(url) == redacted
    assert redaction.secrets_of(url) == secrets


@pytest.mark.parametrize(
    "url, password, merged",
    [
        ("postgresql://holdfast@db:5432/h", "p@ss:w/rd", "postgresql://holdfast:p%40ss%3Aw%2Frd@db:5432/h"),
        ("redis://cache:6379/0", "pw", "redis://:pw@cache:6379/0"),
        ("redis://default@cache:6379/0", "pw", "redis://default:pw@cache:6379/0"),
        ("redis://cache:6379/0", "", "redis://cache:6379/0"),
    ],
)
def test_a_password_is_merged_into_its_url_percent_encoded(url, password, merged):
    assert security.with_password(url, password) == merged


def test_a_password_given_twice_is_refused(tmp_path):
    file = tmp_path / "pw"
    file.write_text("b\n")
    with pytest.raises(ValueError, match="given twice"):
        security.password_for("store", "postgresql://u:a@db/h", password_file=str(file))
    with pytest.raises(ValueError, match="given twice"):
        security.password_for("store", "postgresql://u@db/h", password="a", password_file=str(file))
    assert security.password_for("store", "postgresql://u@db/h", password_file=str(file)) == "b"


def test_the_log_filter_scrubs_messages_arguments_and_tracebacks():
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("holdfast.test_security")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        security.guard_logs([PASSWORD], logger)
        security.guard_logs([PASSWORD], logger)  # again: replaces, does not stack
        assert sum(isinstance(f, security.RedactingFilter) for f in handler.filters) == 1
        logger.warning("connecting to %s failed", f"postgresql://u:{PASSWORD}@db/h")
        try:
            raise RuntimeError(f"bad URI: postgresql://u:{PASSWORD}@[db")
        except RuntimeError:
            logger.exception("a store batch failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert PASSWORD not in text and text.count("***") == 2 and "RuntimeError" in text, text


async def test_a_password_file_reaches_a_redis_that_requires_it(tmp_path, private_redis):
    """The merged URL is the one used: with the file, the snapshot is
    trusted; without it, Redis refuses and the snapshot degrades."""
    private_redis.client().config_set("requirepass", PASSWORD)
    password_file = tmp_path / "redis-password"
    password_file.write_text(PASSWORD + "\n")
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    for extra, degraded in ((("--snapshot-password-file", str(password_file)), False), ((), True)):
        server = start_server(f"sqlite:///{tmp_path}/h-{degraded}.db", snapshot=url, extra=extra)
        try:
            async with grpc.aio.insecure_channel(server.target) as channel:
                await pb_grpc.InventoryServiceStub(channel).PutStock(
                    pb.PutStockRequest(sku_id=SKU, total=2, request_id="r1"), timeout=10)
        finally:
            server.stop()
            server.close()
        log = server.stdout.text() + server.stderr.text()
        assert ("degraded" in log) == degraded, server.output()
        assert PASSWORD not in log




def _refused_start(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return run_holdfast("serve", "--listen", f"127.0.0.1:{free_port()}", *args, timeout=60)


def _closed_port() -> int:
    return free_port()  # bound by nobody: every connection to it is refused


def test_a_store_that_cannot_be_reached_never_prints_its_password(tmp_path):
    password_file = tmp_path / "pg-password"
    password_file.write_text(PASSWORD + "\n")
    attempts = [
        ("--store", f"postgresql://holdfast:{PASSWORD}@127.0.0.1:{_closed_port()}/holdfast"),
        ("--store", f"postgresql://holdfast@127.0.0.1:{_closed_port()}/holdfast",
         "--store-password-file", str(password_file)),
        # Malformed: psycopg quotes such a URL whole in its error.
        ("--store", f"postgresql://holdfast:{PASSWORD}@[::1:{_closed_port()}/holdfast"),
        ("--store", f"postgresql://holdfast:{PASSWORD}%zz@127.0.0.1:{_closed_port()}/holdfast"),
        ("--store", f"mysql://holdfast:{PASSWORD}@127.0.0.1/holdfast"),
        ("--store", f"sqlite:///{tmp_path}/h.db", "--snapshot", f"redis://:{PASSWORD}@127.0.0.1:port/0"),
        ("--store", f"postgresql://holdfast:{PASSWORD}@127.0.0.1:1/x", "--store-password-file", str(password_file)),
    ]
    for args in attempts:
        done = _refused_start(*args, tmp_path=tmp_path)
        assert done.returncode == 2, (args, done)
        assert done.stderr.startswith("holdfast: "), done.stderr
        assert PASSWORD not in done.stdout + done.stderr, (args, done.stdout, done.stderr)


async def test_a_snapshot_that_cannot_be_reached_never_prints_its_password(tmp_path):
    """Redis down from the start: the server serves on the store alone, and
    neither its log nor any answer shows the password (from the URL, or from
    a file)."""
    password_file = tmp_path / "redis-password"
    password_file.write_text(PASSWORD + "\n")
    for extra in ((f"redis://:{PASSWORD}@127.0.0.1:{_closed_port()}/0",),
                  (f"redis://default@127.0.0.1:{_closed_port()}/0", "--snapshot-password-file", str(password_file))):
        server = ServerProcess(f"sqlite:///{tmp_path}/h-{len(extra)}.db", snapshot=extra[0], extra=extra[1:])
        try:
            line = server.wait_ready()
            assert PASSWORD not in line and "***" not in line, line
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = pb_grpc.InventoryServiceStub(channel)
                await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=2, request_id="r1"), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Confirm(pb.ConfirmRequest(reservation_id="rsv_missing"), timeout=10)
                _assert_no_password_in(refused.value)
            assert server.stderr.wait_for(lambda l: "degraded" in l, timeout=10), server.output()
        finally:
            server.stop()
            server.close()
        assert PASSWORD not in server.stdout.text() + server.stderr.text(), server.output()


async def test_a_store_that_goes_away_answers_without_its_password(tmp_path, private_postgres):
    """The store dies under a running server: clients get UNAVAILABLE with
    the store's error, which names the store but not its password."""
    url = private_postgres.url_for("postgres").replace("postgres@", f"postgres:{PASSWORD}@", 1)
    server = start_server(url)
    try:
        assert PASSWORD not in server.ready_line
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.InventoryServiceStub(channel)
            await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=2, request_id="r1"), timeout=10)
            private_postgres.stop(mode="immediate")
            errors = []
            for n in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=3, request_id=f"r{n + 2}"), timeout=10)
                errors.append(refused.value)
            assert any(_refusal(e) == (grpc.StatusCode.UNAVAILABLE, Reason.DEPENDENCY_UNAVAILABLE.name)
                       for e in errors), errors
            for error in errors:
                _assert_no_password_in(error)
    finally:
        server.stop()
        server.close()
    assert PASSWORD not in server.stdout.text() + server.stderr.text(), server.output()


def _assert_no_password_in(error: grpc.aio.AioRpcError) -> None:
    """Not in the message, nor in any trailer (the google.rpc.Status bytes included)."""
    found = [(error.details() or "").encode()]
    found += [v if isinstance(v, bytes) else v.encode() for _, v in error.trailing_metadata() or ()]
    assert all(PASSWORD.encode() not in text for text in found), found


# -- the CLI client against TLS and tokens ------------------------------------------------


def test_the_cli_client_speaks_tls_and_tokens(pki, tmp_path, token_file):
    server = start_server(f"sqlite:///{tmp_path}/h.db", extra=(
        "--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"], "--auth-tokens", token_file))
    try:
        assert "TLS" in server.ready_line and "bearer tokens" in server.ready_line
        tls = ("--target", server.target, "--tls-ca", pki["ca.pem"])
        done = run_holdfast("stock", "put", SKU, "10", "--request-id", "r1", *tls, "--token", ADMIN_TOKEN)
        assert done.returncode == 0 and done.stdout.startswith(f"{SKU}: total 10"), done
        done = run_holdfast("reserve", "o-1", SKU, "3", "--timestamp-ms", "1", *tls, "--token", CLIENT_TOKEN)
        assert done.returncode == 0 and " RESERVED 3 x " in done.stdout, done
        done = run_holdfast("stock", "put", SKU, "1", "--request-id", "r2", *tls, "--token", CLIENT_TOKEN, "--json")
        assert done.returncode == 1 and '"reason": "PERMISSION_DENIED"' in done.stdout, done
        done = run_holdfast("stock", "get", SKU, *tls)
        assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr, done
        done = run_holdfast("stock", "get", SKU, "--target", server.target, "--token", CLIENT_TOKEN)
        assert done.returncode == 1 and "UNAVAILABLE" in done.stderr, done  # plaintext to a TLS server
        done = run_holdfast("stock", "get", SKU, *tls, "--token", CLIENT_TOKEN)
        assert done.returncode == 0 and "held 3" in done.stdout, done
        done = run_holdfast("stock", "get", SKU, *tls, "--tls-cert", pki["client.pem"])
        assert done.returncode == 2 and "--tls-key" in done.stderr, done
    finally:
        server.close()
