"""Security of `holdfast serve`: secrets kept out of every line it prints,
backend credentials, TLS, and bearer tokens with roles.

In the order a server meets them at start-up and then per call:

1. **Redaction.** A password may reach the server inside a store or
   snapshot URL, and drivers quote URLs in their errors (psycopg puts the
   whole URI, password included, in the message of a malformed one). The
   start-up line, `describe()`, every error the backends raise and every log
   line go through `redact_url` / `scrub`; `RedactingFilter` scrubs whatever
   reaches the log handlers anyway.
2. **Credentials.** A backend's password comes from its URL, from the
   environment (`HOLDFAST_STORE_PASSWORD`, `HOLDFAST_SNAPSHOT_PASSWORD`) or
   from a file (`--store-password-file`, `--snapshot-password-file`; one
   trailing newline is stripped), and is merged into the URL at start
   (`with_password`). Two sources for one password is an error, not a guess.
3. **TLS.** `server_credentials` reads the certificate, its key and, for
   mutual TLS, the CA that client certificates must chain to. The files are
   checked with the standard library's `ssl` before gRPC sees them, so a
   wrong file stops the start with a one-line reason rather than failing
   each handshake later.
4. **Tokens.** A TOML file of `[[token]]` tables (`load_tokens`): a name, the
   sha256 of the token (the file holds no token, so it is no secret), and
   roles. `admin` may call every method; `client` every method but those
   the hosted apps keep for `admin` (`Service.admin_methods`, such as
   inventory's `PutStock`; the server hands them to `Policy`).
5. **Per call.** `Authenticator` is the outermost server interceptor: a call
   without a known token is answered UNAUTHENTICATED, one whose token lacks
   the method's role PERMISSION_DENIED, before any other layer sees it (no
   request is even parsed). Health checks and reflection stay open:
   orchestrators probe them without credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import ssl
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, cast
from urllib.parse import quote

import grpc

from holdfast import metrics
from holdfast.gateway import STATUS_DETAILS, AioBehavior, Context, Continuation, Handler
from holdfast.outcome import Reason, failure
from holdfast.redaction import redact_url, scrub, url_password, userinfo

# -- 1. redaction ------------------------------------------------------------------------
#
# The text functions are core (holdfast.redaction): the stores and snapshots
# below this layer scrub their own errors. They are named here too, as the
# redaction half of what `holdfast serve` does with secrets.


class RedactingFilter(logging.Filter):
    """A log handler filter that formats each record and scrubs the secrets
    out of its message and traceback: the last line of defence, for an error
    that quotes a password wherever it was logged from."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        record.msg, record.args = scrub(message, self.secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None  # the text above, scrubbed, is what gets printed
        if record.exc_text:
            record.exc_text = scrub(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info, self.secrets)
        return True


def guard_logs(secrets: Iterable[str], logger: logging.Logger | None = None) -> None:
    """Puts one `RedactingFilter` for `secrets` on every handler of `logger`
    (the root logger by default), replacing one put there before."""
    logger = logger or logging.getLogger()
    guard = RedactingFilter(secrets)
    for handler in logger.handlers:
        for old in [f for f in handler.filters if isinstance(f, RedactingFilter)]:
            handler.removeFilter(old)
        handler.addFilter(guard)


# -- 2. credentials ----------------------------------------------------------------------


def read_password_file(path: str, what: str) -> str:
    """A password file's content without its trailing newline (editors and
    `echo` add one; a password never ends in one)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise OSError(f"cannot read {what} password file {path}: {getattr(error, 'strerror', None) or error}") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ValueError(f"{what} password file {path} is empty")
    return password


def password_for(what: str, url: str, password: str = "", password_file: str = "") -> str:
    """The password given for `url` apart from it (environment or file), ""
    when none; two sources of one password is an error."""
    sources = [name for name, given in (("the URL", url_password(url)), ("the environment", password),
                                        ("a password file", password_file)) if given]
    if len(sources) > 1:
        raise ValueError(f"the {what} password is given twice ({' and '.join(sources)}); give it once")
    if password_file:
        return read_password_file(password_file, what)
    return password


def with_password(url: str, password: str) -> str:
    """`url` with `password` (percent-encoded) in its user part; `url` as it
    is when `password` is empty. The URL must hold no password yet."""
    if not password:
        return url
    assert url_password(url) is None, "a password given twice is refused by password_for"
    scheme_end = url.find("://")
    if scheme_end < 0:
        raise ValueError(f"cannot add a password to {redact_url(url)!r}: it is not a URL (scheme://host...)")
    start = scheme_end + 3
    span = userinfo(url)
    user = "" if span is None else url[span[0] : span[1]]
    rest = url[start:] if span is None else url[span[1] + 1 :]
    return f"{url[:start]}{user}:{quote(password, safe='')}@{rest}"


# -- 3. TLS --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: the server's certificate chain and key, and for mutual TLS
    the CA bundle that client certificates must chain to."""

    cert: str = ""
    key: str = ""
    client_ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.client_ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Checked and read: raises OSError (a file cannot be read) or
        ValueError (a flag without its partner, a file that is not the PEM
        it should be), each with a one-line reason."""
        if not self.cert or not self.key:
            given, missing = ("--tls-cert", "--tls-key") if self.cert else ("--tls-key", "--tls-cert")
            if self.cert or self.key:
                raise ValueError(f"{given} needs {missing} too")
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        cert, key = _read(self.cert, "--tls-cert"), _read(self.key, "--tls-key")
        ca = _read(self.client_ca, "--tls-client-ca") if self.client_ca else None
        _check_pem(self.cert, self.key, self.client_ca)
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise OSError(f"{flag} {path}: cannot read it: {error.strerror or error}") from None


def _check_pem(cert: str, key: str, client_ca: str) -> None:
    """What gRPC would only find out at the first handshake (or never say):
    the key does not match the certificate, a file is not PEM."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key would prompt for its passphrase; gRPC cannot use one anyway.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as error:
        raise ValueError(
            f"--tls-cert {cert} and --tls-key {key} are not a PEM certificate and its unencrypted private key"
            f" ({error.reason or error})"
        ) from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as error:
            raise ValueError(f"--tls-client-ca {client_ca} is not a PEM CA certificate ({error.reason or error})") from None


# -- 4. tokens -----------------------------------------------------------------------------

ADMIN, CLIENT = "admin", "client"
ROLES = (ADMIN, CLIENT)
_TOKEN_KEYS = frozenset({"name", "sha256", "roles"})
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Token:
    """One entry of a token file: who (`name`), the token's sha256 (lower-case
    hex of the UTF-8 token), and its roles."""

    name: str
    sha256: str
    roles: frozenset[str]


def token_hash(token: str) -> str:
    """What a token file holds for `token`: `printf %s TOKEN | sha256sum`."""
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: str | Path) -> tuple[Token, ...]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise OSError(f"cannot read token file {path}: {getattr(error, 'strerror', None) or error}") from None
    return parse_tokens(text, str(path))


def parse_tokens(text: str, source: str) -> tuple[Token, ...]:
    """Validates a token file; every error names `source` and the entry."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source}: not valid TOML: {error}") from None
    extra = sorted(document.keys() - {"token"})
    if extra:
        raise ValueError(f"{source}: unknown table or key {extra[0]!r} (expected [[token]] tables)")
    entries = document.get("token", [])
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: no [[token]] table; an empty token file would refuse every call")
    tokens = [_token(source, n, entry) for n, entry in enumerate(entries, 1)]
    for field_name in ("name", "sha256"):
        seen: set[str] = set()
        for token in tokens:
            value = getattr(token, field_name)
            if value in seen:
                raise ValueError(f"{source}: two tokens have {field_name} {value!r}")
            seen.add(value)
    return tuple(tokens)


def _token(source: str, n: int, entry: object) -> Token:
    where = f"{source}: [[token]] #{n}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a table")
    unknown = sorted(entry.keys() - _TOKEN_KEYS)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (expected name, sha256, roles)")
    name, digest, roles = entry.get("name"), entry.get("sha256"), entry.get("roles")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: expected a non-empty string")
    where = f"{source}: token {name!r}"
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest.lower()):
        raise ValueError(f"{where}.sha256: expected 64 hex digits, the sha256 of the token (printf %s TOKEN | sha256sum)")
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
        raise ValueError(f"{where}.roles: expected a non-empty list of roles ({', '.join(ROLES)})")
    unknown_roles = sorted(set(roles) - set(ROLES))
    if unknown_roles:
        raise ValueError(f"{where}.roles: unknown role {unknown_roles[0]!r} (known: {', '.join(ROLES)})")
    return Token(name, digest.lower(), frozenset(roles))


# -- 5. per call: which role a method needs, and the interceptor ---------------------------

# Open without a token: orchestrators probe health, tools list services.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
AUTHORIZATION = "authorization"
_BEARER = "bearer "


@dataclass(frozen=True, slots=True)
class Policy:
    """The role each method needs: `admin` for `admin_methods` (gRPC paths,
    which the server gathers from the hosted apps' `Service.admin_methods`),
    `client` for every other method (reads included); `admin` may call
    everything. This layer names no app's methods: by default none is
    admin-only."""

    admin_methods: Collection[str] = frozenset()

    def role(self, method: str) -> str:
        return ADMIN if method in self.admin_methods else CLIENT

    def allows(self, roles: Collection[str], method: str) -> bool:
        return ADMIN in roles or self.role(method) in roles


class Authenticator(grpc.aio.ServerInterceptor):
    """Outermost interceptor: admits a call only with a known bearer token
    (metadata `authorization: Bearer TOKEN`) whose roles allow the method.
    A refused call is answered here, its request not even parsed; an admitted
    one goes on with the token hidden from every inner layer (the journal
    records metadata, and a token must never land in a file)."""

    def __init__(self, tokens: Iterable[Token], policy: Policy | None = None, counted: Collection[str] = ()) -> None:
        self._tokens = tuple(tokens)
        assert self._tokens, "an Authenticator without tokens would refuse every call"
        self._policy = policy or Policy()
        # Refusals of these methods (the hosted ones) are counted by reason;
        # any other path a caller makes up is not, so labels stay few.
        self._counted = frozenset(counted)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        refusal = self.check(method, handler_call_details.invocation_metadata or ())
        if refusal is not None:
            if method in self._counted:
                metrics.OUTCOMES.labels(method, refusal[0].name).inc()
            return grpc.unary_unary_rpc_method_handler(_refuse(*refusal))
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _token_hidden(cast(AioBehavior, handler.unary_unary)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> tuple[Reason, str, dict[str, str]] | None:
        """None when the call may go on, else the refusal's reason, message and ErrorInfo metadata."""
        headers = [value for key, value in metadata if key == AUTHORIZATION]
        if not headers:
            return Reason.UNAUTHENTICATED, "this server needs a bearer token: metadata authorization: Bearer TOKEN", {}
        header = headers[0] if len(headers) == 1 else None
        if not isinstance(header, str) or not header[: len(_BEARER)].lower() == _BEARER or not header[len(_BEARER) :].strip():
            return Reason.UNAUTHENTICATED, "malformed authorization metadata: expected one 'Bearer TOKEN'", {}
        token = self.identify(header[len(_BEARER) :].strip())
        if token is None:
            return Reason.UNAUTHENTICATED, "the bearer token is not known to this server", {}
        if not self._policy.allows(token.roles, method):
            role = self._policy.role(method)
            message = f"token {token.name!r} lacks the role {role!r} that {method.lstrip('/')} needs"
            return Reason.PERMISSION_DENIED, message, {"token": token.name, "role": role}
        return None

    def identify(self, presented: str) -> Token | None:
        """The entry whose hash is the presented token's. Every entry is
        compared, in constant time, whichever matches."""
        digest = token_hash(presented).encode()
        found = None
        for token in self._tokens:
            if hmac.compare_digest(token.sha256.encode(), digest):
                found = token
        return found


def _refuse(reason: Reason, message: str, info: Mapping[str, str]) -> AioBehavior:
    outcome = failure(reason, message, metadata=info)

    async def refuse(request: bytes, context: Context) -> None:
        await context.abort(outcome.code, message, trailing_metadata=((STATUS_DETAILS, outcome.payload),))
        raise AssertionError("abort returns only by raising")

    return refuse


def _token_hidden(behavior: AioBehavior) -> AioBehavior:
    async def hidden(request: Any, context: Context) -> Any:
        # Duck-typed: the context's own, less the token (_WithoutToken).
        return await behavior(request, cast(Context, _WithoutToken(context)))

    return hidden


class _WithoutToken:
    """A servicer context whose invocation metadata lacks the token; all else
    is the call's own context."""

    __slots__ = ("_context",)

    def __init__(self, context: Context) -> None:
        self._context = context

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return tuple((k, v) for k, v in self._context.invocation_metadata() or () if k != AUTHORIZATION)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)
