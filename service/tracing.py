"""OpenTelemetry traces of the calls: `holdfast serve --otlp-endpoint HOST:PORT`.

Off by default, and optional: the packages come with `pip install
'holdfast[otel]'`, and this module imports them only when tracing is
turned on (`install`), so a server without them runs as before.

Each call to a hosted service is one span, opened by
opentelemetry-instrumentation-grpc's aio server interceptor (the outermost
interceptor, so the span covers every layer, a refusal by tokens or limits
too), whose parent is the client's W3C trace context (`traceparent` in the
call's metadata) when it sent one. The gateway names on it the call's
`holdfast.context_id` (the `holdfast-context-id` trailer), `holdfast.method`,
`holdfast.reason` (the outcome's reason, or OK) and `holdfast.replayed`. The
engine's phases are its children (holdfast.spans): `holdfast.snapshot.read`,
`holdfast.store.transact` (the store transaction, which a batch may share
with other calls' moves) and `holdfast.snapshot.advance`, each also naming
the context id. Moves outside a call (the reaper's, recovery's) and the
health and reflection services are not traced.

Spans leave in batches (BatchSpanProcessor) over OTLP/gRPC to the endpoint,
plain text for HOST:PORT or http://HOST:PORT, TLS for https://HOST:PORT. The
SDK's OTEL_* variables apply as usual (OTEL_SERVICE_NAME, default
"holdfast"; OTEL_TRACES_SAMPLER; OTEL_BSP_*; OTEL_EXPORTER_OTLP_HEADERS).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc

from holdfast import spans
from holdfast.call import Call, current_call
from holdfast.outcome import Outcome

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

T = TypeVar("T")

# What `install` imports, and the package each comes from.
_NEEDED = {
    "opentelemetry.trace": "opentelemetry-api",
    "opentelemetry.sdk.trace": "opentelemetry-sdk",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter": "opentelemetry-exporter-otlp-proto-grpc",
    "opentelemetry.instrumentation.grpc": "opentelemetry-instrumentation-grpc",
}


class TracingUnavailable(ValueError):
    """Tracing was asked for but OpenTelemetry is not installed: `holdfast
    serve` exits 2 with this message."""


def available() -> str | None:
    """None when every package tracing needs imports; else what to install."""
    missing = []
    for module, package in _NEEDED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if not missing:
        return None
    return f"--otlp-endpoint needs OpenTelemetry ({', '.join(missing)} missing): pip install 'holdfast[otel]'"


class _Otel:
    """holdfast.spans' Tracer over an OpenTelemetry tracer provider."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace

        self.provider = provider
        self._trace = trace
        self._tracer = provider.get_tracer("holdfast")

    def phase(self, name: str, work: Awaitable[T]) -> Awaitable[T]:
        return self._phase(name, work)

    async def _phase(self, name: str, work: Awaitable[T]) -> T:
        if not self._trace.get_current_span().is_recording():
            return await work  # no call's span (a move of time) or one not sampled: no orphan phases
        with self._tracer.start_as_current_span(name) as span:
            try:
                span.set_attribute(spans.CONTEXT_ID, current_call().context_id)
            except LookupError:  # a move under a traced span but outside a call: nothing to name
                pass
            return await work

    def answered(self, method: str, call: Call | None, outcome: Outcome) -> None:
        span = self._trace.get_current_span()
        if not span.is_recording():
            return
        span.set_attribute(spans.METHOD, method)
        span.set_attribute(spans.REASON, "OK" if outcome.reason is None else outcome.reason.name)
        span.set_attribute(spans.REPLAYED, outcome.replayed)
        if call is not None:
            span.set_attribute(spans.CONTEXT_ID, call.context_id)


_installed: _Otel | None = None


def install(endpoint: str, services: Sequence[str]) -> grpc.aio.ServerInterceptor:
    """Starts exporting to `endpoint` and sets holdfast.spans' tracer;
    returns the server interceptor that opens each call's span, for the
    calls to `services` (full proto names). TracingUnavailable when
    OpenTelemetry is not installed. One per process: a second install
    replaces the first (after flushing it)."""
    global _installed
    missing = available()
    if missing is not None:
        raise TracingUnavailable(missing)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "holdfast"}))
    provider = TracerProvider(resource=resource)
    # HOST:PORT, as every holdfast address is given, is plain text; a URL says for itself.
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    # The hosted services' calls only: not health checks, not reflection.
    hosted = filters.any_of(*(filters.service_name(name) for name in services))
    # The instrumentation's factory is unannotated; what it returns is a grpc.aio.ServerInterceptor.
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=provider, filter_=hosted
    )
    shutdown()
    _installed = _Otel(provider)
    spans.tracer = _installed
    return interceptor


def force_flush(timeout_ms: int = 30_000) -> bool:
    """Exports every span ended so far; False when they did not all leave in
    time (or tracing is off)."""
    return _installed is not None and _installed.provider.force_flush(timeout_ms)


def shutdown() -> None:
    """Flushes and stops the exporter, and turns the hooks off. At exit the
    SDK does this by itself; a process that starts servers one after another
    (tests) calls it after each."""
    global _installed
    spans.tracer = None
    if _installed is not None:
        installed, _installed = _installed, None
        installed.provider.shutdown()
