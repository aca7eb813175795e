"""The control-plane bodies the Sapiom SDKs send and the shapes they read (sapiom-protocol.md).

The SDKs send far more than falgate needs (call sites, sanitised headers, agent names); unknown
fields are ignored rather than refused, so a newer SDK keeps working.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TransactionStatus = Literal[
    "pending", "preparing", "authorized", "denied", "cancelled", "completed"
]


# For the document: URLs that ``service.normalise_url`` takes (an http(s) scheme, a host name
# or IPv4 address, a port up to 65535). It takes a few more spellings (user info, IPv6
# literals), which the SDKs do not send for falgate.
_PORT = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
URL_PATTERN = rf"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(?::{_PORT})?(?:[/?#]\S*)?$"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class RequestFacts(_Lenient):
    """The request the SDK is about to send to the target."""

    method: str = Field(min_length=1, max_length=16, pattern=r"^[A-Za-z]+$", examples=["POST"])
    url: str = Field(
        min_length=1,
        max_length=8192,
        description="The absolute http(s) URL the SDK will call.",
        examples=["http://falgate:8000/v1/run/fal-ai/flux/dev"],
        json_schema_extra={"pattern": URL_PATTERN},
    )


class HttpClientFacts(_Lenient):
    source: str | None = Field(default=None, examples=["http-client"])
    request: RequestFacts


class TransactionCreate(_Lenient):
    """``POST /v1/transactions``: authorise one request before the SDK sends it."""

    request_facts: HttpClientFacts = Field(alias="requestFacts")
    service_name: str | None = Field(default=None, alias="serviceName")
    agent_name: str | None = Field(default=None, alias="agentName")


class TransactionComplete(_Lenient):
    """``POST /v1/transactions/{id}/complete``: what happened (recorded as the outcome only)."""

    outcome: Literal["success", "error"] | None = None


class TransactionOut(BaseModel):
    """A transaction as the SDKs read it: top level, no ``data`` envelope."""

    id: str = Field(examples=["stx_key_0123456789abcdef_9f2c..."])
    status: TransactionStatus = Field(examples=["authorized"])
    reason: str | None = Field(
        default=None, description="Why a transaction was denied.", examples=[None]
    )


class IdentityToken(BaseModel):
    """``POST /v1/auth/tokens`` (SDK 0.5.x): a token the SDK caches; falgate never reads it."""

    model_config = ConfigDict(populate_by_name=True)

    identity: str = Field(description="A signed JWT naming the key.")
    identity_expires_at: str = Field(
        alias="identityExpiresAt", examples=["2027-12-01T00:00:00.000Z"]
    )
