"""Money is integer micro-dollars inside; decimal strings only at the edge."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

MICRO_PER_USD = 1_000_000


def format_usd(micro: int) -> str:
    """``11797`` -> ``"0.011797"`` (always six places)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO_PER_USD)
    return f"{sign}{whole}.{frac:06d}"


def parse_usd(value: str | int | float | Decimal) -> int:
    """Parse a USD amount into micro-dollars; more than six decimals is an error."""
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError(f"not a decimal amount: {value!r}") from exc
    if not amount.is_finite():
        raise ValueError("amount must be finite")
    micro = amount * MICRO_PER_USD
    if micro != micro.to_integral_value():
        raise ValueError("amount has more than six decimal places")
    return int(micro)


def display_price(micro: int) -> str:
    """Rounded half-up to a tenth of a cent for people: ``"$0.012"``, at least ``"$0.001"``."""
    if micro == 0:
        return "$0.000"
    rounded = (Decimal(micro) / MICRO_PER_USD).quantize(Decimal("0.001"), ROUND_HALF_UP)
    return f"${max(rounded, Decimal('0.001'))}"
