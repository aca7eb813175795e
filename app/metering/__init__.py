"""Metering: holds, settlement, the ledger, idempotency and the sweeper (SPEC section 5)."""

from app.metering.meter import Admission, AdmitRequest, Meter, Settlement

__all__ = ["Admission", "AdmitRequest", "Meter", "Settlement"]
