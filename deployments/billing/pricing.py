"""Exact money for Anker: per-token prices in integer nano-DKK, request cost, and invoice arithmetic in øre.

Integers and ``Decimal`` only, never ``float``. Knows nothing of databases, requests or content: it turns counts
and prices into amounts.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

NANO_DKK_PER_DKK = 10**9
NANO_DKK_PER_ORE = 10**7
TOKENS_PER_MILLION = 10**6


def nano_dkk_per_token(dkk_per_million_tokens: Decimal) -> int:
    """DKK per 1M tokens to integer nano-DKK per token (6.00 kr -> 6000); refuses prices finer than that."""
    value = dkk_per_million_tokens * NANO_DKK_PER_DKK / TOKENS_PER_MILLION
    if value != value.to_integral_value() or value < 0:
        raise ValueError(f"price {dkk_per_million_tokens} DKK per 1M tokens is not a whole number of nano-DKK/token")
    return int(value)


@dataclass(frozen=True)
class TokenPrices:
    """One model's prices, in nano-DKK per token."""

    input_uncached_nano_dkk: int
    input_cached_nano_dkk: int
    output_nano_dkk: int

    @classmethod
    def from_dkk_per_million(cls, uncached: Decimal, cached: Decimal, output: Decimal) -> TokenPrices:
        return cls(nano_dkk_per_token(uncached), nano_dkk_per_token(cached), nano_dkk_per_token(output))


@dataclass(frozen=True)
class TokenCounts:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    def __post_init__(self) -> None:
        if min(self.prompt_tokens, self.cached_tokens, self.completion_tokens) < 0:
            raise ValueError("token counts cannot be negative")
        if self.cached_tokens > self.prompt_tokens:
            raise ValueError("cached tokens cannot exceed prompt tokens")

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


def cost_nano_dkk(counts: TokenCounts, prices: TokenPrices) -> int:
    """uncached x uncached price + cached x cached price + output x output price, exactly."""
    return (
        counts.uncached_tokens * prices.input_uncached_nano_dkk
        + counts.cached_tokens * prices.input_cached_nano_dkk
        + counts.completion_tokens * prices.output_nano_dkk
    )


def to_ore(nano_dkk: int) -> int:
    """Rounds an exact amount to whole øre, half up (what an invoice line shows and what is charged)."""
    return int((Decimal(nano_dkk) / NANO_DKK_PER_ORE).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def format_dkk(ore: int) -> str:
    sign = "-" if ore < 0 else ""
    return f"{sign}{abs(ore) // 100}.{abs(ore) % 100:02d}"


@dataclass(frozen=True)
class InvoiceTotals:
    usage_ore: int
    plan_fee_ore: int
    discount_ore: int
    net_ore: int
    vat_ore: int
    total_ore: int


def invoice_totals(
    usage_nano_dkk: int,
    plan_fee_ore: int = 0,
    discount_percent: Decimal = Decimal(0),
    vat_percent: Decimal = Decimal(25),
) -> InvoiceTotals:
    """Monthly totals: usage rounded to øre once (not per request), discount on usage, VAT on the net."""
    if not Decimal(0) <= discount_percent <= Decimal(100) or vat_percent < 0:
        raise ValueError("discount must be 0-100 % and VAT non-negative")
    usage_ore = to_ore(usage_nano_dkk)
    discount_ore = int((Decimal(usage_ore) * discount_percent / 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    net_ore = usage_ore - discount_ore + plan_fee_ore
    vat_ore = int((Decimal(net_ore) * vat_percent / 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    return InvoiceTotals(usage_ore, plan_fee_ore, discount_ore, net_ore, vat_ore, net_ore + vat_ore)


def nano_from_dkk(dkk: Decimal) -> int:
    """An amount in DKK (a ``Decimal``, e.g. a budget) as integer nano-DKK; refuses finer amounts and negatives."""
    value = dkk * NANO_DKK_PER_DKK
    if value != value.to_integral_value() or value < 0:
        raise ValueError(f"amount {dkk} DKK must be non-negative with at most 9 decimals")
    return int(value)


def dkk_string(nano_dkk: int) -> str:
    """Exact decimal text of a nano-DKK amount, for JSON (``1410000`` -> ``"0.00141"``); never a float."""
    text = format((Decimal(nano_dkk) / NANO_DKK_PER_DKK).normalize(), "f")
    return text if text != "-0" else "0"


# A budget lease a replica asks for holds the maximum cost of about this many requests like the one waiting for it.
LEASE_REQUESTS = 16


def worst_case_nano_dkk(prices: TokenPrices, prompt_tokens: int, max_output_tokens: int) -> int:
    """The most a request can cost: its whole prompt uncached and every output token it may produce."""
    return prompt_tokens * prices.input_uncached_nano_dkk + max_output_tokens * prices.output_nano_dkk
