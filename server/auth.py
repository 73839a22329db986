"""Credentials: JWT verification, stream tickets, revocation, and the request's ``Principal``.

A request's credential becomes a ``Principal`` (tenant, sub, scopes, job grants, exp) once,
in the request middleware (``server.app``), and handlers ask it: ``require(request, scope)``
for a scope (403 ``forbidden``), ``principal.job_key(job_id)`` for a job (a job outside the
grants is ``JobNotFound``, exactly as a job that does not exist).

Tokens are JWTs verified with PyJWT against the configured secrets (HS256/384/512, any one
verifies: rotation) and public keys (RS256 / ES256 / EdDSA); nothing else is accepted, ``none``
least of all. A verified token is cached by its text until it expires, so a producer sending
thousands of requests with one token pays for one verification (the cache is bounded by
``auth.token_cache_size``; expiry and revocation are checked again on every use).

Tickets (``POST /v1/tickets``) are the server's own: ``jft1.<claims>.<HMAC-SHA256>``, signed
with a key derived from each configured secret (a random one per process when there are only
public keys). Stateless: nothing is stored, a ticket is valid for any number of requests until
it expires, and it never grants more than the token that asked for it, nor ``jobs:write``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import orjson
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .config import AuthConfig, ConfigError
from .errors import Forbidden, JobNotFound, Unauthorized
from .frames import Frame
from .grants import BadSelector, JobGrants
from .tenancy import DEFAULT_TENANT, TENANT_RE, JobKey

READ = "jobs:read"
WRITE = "jobs:write"
ADMIN = "jobs:admin"
SCOPES = frozenset({READ, WRITE, ADMIN})
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
TICKET_PREFIX = "jft1."
_MAX_CREDENTIAL_CHARS = 8_192  # far above any real token; bounds the work a bad one costs
_SUB_MAX_CHARS = 200


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for. ``exp`` and ``iat`` are Unix seconds (None: never / unknown);
    ``ticket`` marks a stream ticket (read-only, GET only)."""

    tenant: str
    sub: str | None
    scopes: frozenset[str]
    grants: JobGrants | None = None
    exp: float | None = None
    iat: float | None = None
    ticket: bool = False

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or ADMIN in self.scopes

    def job_key(self, job_id: str) -> JobKey:
        """The job ``job_id`` of this principal's tenant; ``JobNotFound`` when outside its
        grants, so that nobody learns which job ids exist beyond them."""
        if self.grants is not None and not self.grants.covers(job_id):
            raise JobNotFound(job_id)
        return JobKey(self.tenant, job_id)

    @property
    def expires_at(self) -> str | None:
        return None if self.exp is None else rfc3339(self.exp)


class TenantGrant:
    """What a principal may read of a stream that spans jobs (the feed, feed.md): its own
    tenant's events, of the jobs its grants cover. ``permits`` is asked about every frame
    (replayed or live); ``sql_filter`` lets a replay skip other tenants' rows in SQL."""

    __slots__ = ("grants", "key", "tenant")
    everything = False  # never "every event": other tenants' events are always refused

    def __init__(self, principal: Principal) -> None:
        self.tenant = principal.tenant
        self.grants = principal.grants
        selectors = "*" if self.grants is None else ",".join(self.grants.selectors())
        # Subscribers share a filter group only when their grants' keys are equal.
        self.key = f"{self.tenant}|{selectors}"

    def permits(self, frame: Frame) -> bool:
        return frame.tenant == self.tenant and (
            self.grants is None or self.grants.covers(frame.job_id)
        )

    def sql_filter(self, tenant_column: str, job_column: str) -> tuple[str, list[str | int]]:
        clause = f"{tenant_column} = ?"
        params: list[str | int] = [self.tenant]
        if self.grants is not None:
            grant_clause, grant_params = self.grants.sql_filter(job_column)
            clause = f"{clause} AND {grant_clause}"
            params.extend(grant_params)
        return clause, params


# With authentication off every request acts for this one: the tenant `default`, everything.
ANONYMOUS = Principal(DEFAULT_TENANT, None, SCOPES)
_TICKET_SCOPES = frozenset({READ})  # shared: a ticket's principal is made per request

PRINCIPAL = web.RequestKey("principal", Principal)


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def require(request: web.Request, scope: str) -> Principal:
    """The request's principal, if it holds ``scope``; else 403 ``forbidden``."""
    principal = request[PRINCIPAL]
    if not principal.allows(scope):
        raise Forbidden(f"this credential lacks the scope {scope}")
    return principal


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _load_public_key(path: Path) -> tuple[str, Any]:
    """A PEM public key and the one algorithm it verifies (by its type)."""
    try:
        key = load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"auth.public_keys: cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"auth.public_keys: {path} is not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256", key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA", key
    raise ConfigError(f"auth.public_keys: {path}: only RSA, EC P-256 and Ed25519 keys are used")


def _parse_time(value: Any, claim: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthorized("malformed", f"the {claim} claim must be a number")
    return float(value)


class Authenticator:
    """Verifies tokens and tickets, mints tickets, and knows what is revoked."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._keys: dict[str, list[Any]] = {}
        secrets = [secret.get_secret_value().encode() for secret in config.secrets]
        for algorithm in HMAC_ALGORITHMS if secrets else ():
            self._keys[algorithm] = list(secrets)
        for path in config.public_keys:
            algorithm, key = _load_public_key(path)
            self._keys.setdefault(algorithm, []).append(key)
        # Tickets: signed with the first secret's key, verified with any (rotation). Without
        # secrets, a random key: tickets then do not survive a restart (docs/security.md).
        self._ticket_keys = [
            hmac.new(secret, b"jobfeed ticket key v1", hashlib.sha256).digest()
            for secret in secrets
        ] or [os.urandom(32)]
        self._cache: dict[str, Principal] = {}
        self.verified = 0  # signature verifications done (cache misses)
        self.set_revocations(config)

    @property
    def enabled(self) -> bool:
        return self.config.mode == "jwt"

    # -- revocation ------------------------------------------------------------------------

    def set_revocations(self, config: AuthConfig) -> None:
        """Take ``not_before`` (global and per tenant) from ``config``: re-read at run time."""
        self._not_before = None if config.not_before is None else config.not_before.timestamp()
        self._tenant_not_before = {
            tenant: entry.not_before.timestamp()
            for tenant, entry in config.tenants.items()
            if entry.not_before is not None
        }

    def revoked(self, principal: Principal) -> bool:
        """Issued before the ``not_before`` that applies to its tenant (or without ``iat``
        while one applies: it cannot prove it was issued after)."""
        cutoff = self._tenant_not_before.get(principal.tenant, self._not_before)
        if self._not_before is not None and cutoff is not None:
            cutoff = max(cutoff, self._not_before)
        if cutoff is None:
            return False
        return principal.iat is None or principal.iat < cutoff

    def valid_until(self, principal: Principal) -> float | None:
        """Unix time at which ``principal`` stops being accepted: its ``exp``, plus the
        issuers' clock leeway for tokens (tickets are the server's own: exact)."""
        if principal.exp is None:
            return None
        return principal.exp if principal.ticket else principal.exp + self.config.leeway_seconds

    def _check_live(self, principal: Principal, now: float) -> Principal:
        if principal.exp is not None and principal.exp + self.config.leeway_seconds <= now:
            what = "ticket" if principal.ticket else "token"
            raise Unauthorized("expired", f"the {what} expired at {principal.expires_at}")
        if self.revoked(principal):
            raise Unauthorized(
                "revoked",
                "the credential was issued before auth.not_before (revoked); get a new one",
            )
        return principal

    # -- tokens ----------------------------------------------------------------------------

    def verify(self, credential: str, now: float | None = None) -> Principal:
        """A token or a ticket (the WebSocket's in-band ``auth`` frame takes either)."""
        if credential.startswith(TICKET_PREFIX):
            return self.verify_ticket(credential, now)
        return self.verify_token(credential, now)

    def verify_token(self, token: str, now: float | None = None) -> Principal:
        now = time.time() if now is None else now
        cached = self._cache.get(token)
        if cached is not None:
            try:
                return self._check_live(cached, now)
            except Unauthorized:
                del self._cache[token]
                raise
        principal = self._check_live(self._decode(token), now)
        cache_size = self.config.token_cache_size
        if cache_size:
            while len(self._cache) >= cache_size:
                # Dicts keep insertion order: the oldest entry goes first.
                del self._cache[next(iter(self._cache))]
            self._cache[token] = principal
        return principal

    def _decode(self, token: str) -> Principal:
        if len(token) > _MAX_CREDENTIAL_CHARS or not token.isascii():
            raise Unauthorized("malformed", "the token is not a JSON Web Token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed", "the token is not a JSON Web Token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise Unauthorized("malformed", "the token's header has no algorithm (alg)")
        keys = self._keys.get(algorithm)
        if not keys:
            shown = algorithm
            accepted = ", ".join(sorted(self._keys)) or "none"
            raise Unauthorized(
                "malformed", f"algorithm {shown[:20]!r} is not accepted (accepted: {accepted})"
            )
        self.verified += 1
        claims: dict[str, Any] | None = None
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],
                    audience=self.config.audience or None,
                    issuer=self.config.issuer or None,
                    leeway=self.config.leeway_seconds,
                    options={"require": ["exp"]},
                )
                break
            except jwt.InvalidSignatureError:
                continue  # another configured key may verify it (rotation)
            except jwt.PyJWTError as exc:
                raise _classify(exc) from None
        if claims is None:
            raise Unauthorized("bad signature", "no configured key verifies the token")
        return _principal_from_claims(claims)

    # -- tickets ---------------------------------------------------------------------------

    def mint_ticket(
        self, principal: Principal, grants: JobGrants | None, sub: str | None, now: float
    ) -> tuple[str, float]:
        """A read-only ticket for ``principal`` narrowed to ``grants``; (ticket, exp)."""
        exp = now + self.config.ticket_seconds
        if principal.exp is not None:
            exp = min(exp, principal.exp)
        claims = {
            "tenant": principal.tenant,
            "sub": sub,
            "jobs": None if grants is None else grants.selectors(),
            "exp": exp,
            # The asking token's iat: revoking the token (not_before) revokes its tickets.
            "iat": principal.iat,
        }
        body = TICKET_PREFIX + _b64encode(orjson.dumps(claims))
        signature = hmac.new(self._ticket_keys[0], body.encode(), hashlib.sha256).digest()
        return f"{body}.{_b64encode(signature)}", exp

    def verify_ticket(self, ticket: str, now: float | None = None) -> Principal:
        now = time.time() if now is None else now
        if len(ticket) > _MAX_CREDENTIAL_CHARS or not ticket.isascii():
            raise Unauthorized("malformed", "the ticket is not one this server issued")
        body, _, signature_text = ticket.rpartition(".")
        try:
            signature = _b64decode(signature_text)
            raw_claims = _b64decode(body[len(TICKET_PREFIX) :])
        except (binascii.Error, ValueError):
            raise Unauthorized("malformed", "the ticket is not one this server issued") from None
        if not any(
            hmac.compare_digest(signature, hmac.new(key, body.encode(), hashlib.sha256).digest())
            for key in self._ticket_keys
        ):
            raise Unauthorized("bad signature", "the ticket is not one this server issued")
        claims = orjson.loads(raw_claims)  # signed by us: well-formed
        grants = None if claims["jobs"] is None else JobGrants.parse(claims["jobs"])
        principal = Principal(
            claims["tenant"],
            claims["sub"],
            _TICKET_SCOPES,
            grants,
            claims["exp"],
            claims["iat"],
            ticket=True,
        )
        # A ticket is the server's own: its exp is exact, without the issuers' leeway.
        if principal.exp is not None and principal.exp <= now:
            raise Unauthorized("expired", f"the ticket expired at {principal.expires_at}")
        return self._check_live(principal, now)


def _classify(exc: jwt.PyJWTError) -> Unauthorized:
    """PyJWT's refusal as one of the reasons a client can act on."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return Unauthorized("expired", "the token has expired")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return Unauthorized("not yet valid", "the token is not valid yet (nbf or iat)")
    if isinstance(exc, jwt.InvalidAudienceError):
        return Unauthorized("wrong audience", "the token is for another audience (aud)")
    if isinstance(exc, jwt.InvalidIssuerError):
        return Unauthorized("wrong issuer", "the token is from another issuer (iss)")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return Unauthorized("malformed", f"the token lacks the {exc.claim} claim")
    return Unauthorized("malformed", "the token cannot be decoded")


def _principal_from_claims(claims: dict[str, Any]) -> Principal:
    tenant = claims.get("tenant")
    if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
        raise Unauthorized(
            "malformed", "the tenant claim is missing or not ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
        )
    scope = claims.get("scope")
    if not isinstance(scope, str):
        raise Unauthorized("malformed", "the scope claim is missing or not a string")
    sub = claims.get("sub")
    if sub is not None and (not isinstance(sub, str) or len(sub) > _SUB_MAX_CHARS):
        raise Unauthorized("malformed", "the sub claim must be a string")
    jobs = claims.get("jobs")
    grants = None
    if jobs is not None:
        if not isinstance(jobs, list):
            raise Unauthorized("malformed", "the jobs claim must be a list of selectors")
        try:
            grants = JobGrants.parse(jobs)
        except BadSelector as exc:
            raise Unauthorized("malformed", f"the jobs claim: {exc}") from None
    return Principal(
        tenant,
        sub,
        frozenset(scope.split()) & SCOPES,
        grants,
        _parse_time(claims.get("exp"), "exp"),
        _parse_time(claims.get("iat"), "iat"),
    )


def bearer_token(header: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized("malformed", "the Authorization header must be 'Bearer <token>'")
    token = token.strip()
    if not token:
        raise Unauthorized("missing", "the Authorization header has no token")
    return token


def authenticate(request: web.Request, authenticator: Authenticator | None) -> Principal:
    """The principal of ``request``'s credential (``ANONYMOUS`` with authentication off)."""
    if authenticator is None:
        return ANONYMOUS
    header = request.headers.get("Authorization")
    if header is not None:
        token = bearer_token(header)
        if token.startswith(TICKET_PREFIX):
            raise Unauthorized("malformed", "a ticket is accepted only as ?ticket= on GET requests")
        return authenticator.verify_token(token)
    ticket = request.query.get("ticket")
    if ticket is None:
        raise Unauthorized(
            "missing", "no credential: send 'Authorization: Bearer <token>' (or ?ticket=)"
        )
    if request.method != "GET":
        raise Unauthorized("malformed", "a ticket is accepted only on GET requests")
    if not ticket.startswith(TICKET_PREFIX):
        raise Unauthorized(
            "malformed",
            "?ticket= takes a ticket from POST /v1/tickets; send tokens in the Authorization "
            "header, never in a URL",
        )
    return authenticator.verify_ticket(ticket)


def mint_token(
    secret: str,
    *,
    tenant: str,
    scope: str,
    jobs: list[str] | None = None,
    sub: str | None = None,
    ttl_seconds: float = 3600,
    audience: str | None = "jobfeed",
    issuer: str | None = None,
    now: float | None = None,
    algorithm: str = "HS256",
) -> str:
    """An HS256 token as a backend would issue it (``jobfeed token``, tests, docs)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"tenant": tenant, "scope": scope, "iat": issued}
    claims["exp"] = issued + int(ttl_seconds)
    if sub is not None:
        claims["sub"] = sub
    if jobs is not None:
        claims["jobs"] = jobs
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=algorithm)
