"""Billing arithmetic against hand-computed cases: cached vs uncached split, exact prices, discount, VAT, rounding."""

from __future__ import annotations

from decimal import Decimal

import pytest

from deployments.billing.pricing import (
    TokenCounts,
    TokenPrices,
    cost_nano_dkk,
    format_dkk,
    invoice_totals,
    nano_dkk_per_token,
    to_ore,
)

DEFAULT = TokenPrices.from_dkk_per_million(Decimal("6.00"), Decimal("3.00"), Decimal("45.00"))


def test_prices_convert_exactly() -> None:
    assert (DEFAULT.input_uncached_nano_dkk, DEFAULT.input_cached_nano_dkk, DEFAULT.output_nano_dkk) == (
        6000,
        3000,
        45000,
    )
    assert nano_dkk_per_token(Decimal("0.001")) == 1
    with pytest.raises(ValueError):
        nano_dkk_per_token(Decimal("0.0001"))  # finer than 1 nano-DKK per token
    with pytest.raises(ValueError):
        nano_dkk_per_token(Decimal("-1"))


def test_cost_splits_cached_and_uncached_input() -> None:
    # 1,000 prompt tokens of which 768 cached, 100 output:
    # 232 x 6000 + 768 x 3000 + 100 x 45000 = 1,392,000 + 2,304,000 + 4,500,000 = 8,196,000 nano-DKK = 0.008196 kr
    assert cost_nano_dkk(TokenCounts(1000, 768, 100), DEFAULT) == 8_196_000


def test_a_million_of_each_costs_the_list_price() -> None:
    assert cost_nano_dkk(TokenCounts(1_000_000, 0, 0), DEFAULT) == 6 * 10**9
    assert cost_nano_dkk(TokenCounts(1_000_000, 1_000_000, 0), DEFAULT) == 3 * 10**9
    assert cost_nano_dkk(TokenCounts(0, 0, 1_000_000), DEFAULT) == 45 * 10**9


def test_invalid_counts() -> None:
    with pytest.raises(ValueError):
        TokenCounts(10, 11, 0)
    with pytest.raises(ValueError):
        TokenCounts(-1, 0, 0)


@pytest.mark.parametrize(
    ("nano", "ore"),
    [(0, 0), (4_999_999, 0), (5_000_000, 1), (14_999_999, 1), (15_000_000, 2), (8_196_000, 1), (10**9, 100)],
)
def test_rounding_to_ore_is_half_up(nano: int, ore: int) -> None:
    assert to_ore(nano) == ore


def test_invoice_with_plan_fee_discount_and_vat() -> None:
    # Usage 1,234.565 kr -> 123,457 øre (half up); 10 % discount -> 12,345.7 -> 12,346 øre;
    # net = 123,457 - 12,346 + 50,000 fee = 161,111 øre; VAT 25 % = 40,277.75 -> 40,278; total 201,389 øre.
    totals = invoice_totals(1_234_565_000_000, plan_fee_ore=50_000, discount_percent=Decimal(10))
    assert (totals.usage_ore, totals.discount_ore, totals.net_ore, totals.vat_ore, totals.total_ore) == (
        123_457,
        12_346,
        161_111,
        40_278,
        201_389,
    )
    assert format_dkk(totals.total_ore) == "2013.89"


def test_pay_as_you_go_invoice_and_configurable_vat() -> None:
    totals = invoice_totals(8_196_000 * 1000)  # a thousand of the requests above: 8.196 kr -> 8.20 kr
    assert (totals.usage_ore, totals.vat_ore, totals.total_ore) == (820, 205, 1025)
    assert invoice_totals(10**9, vat_percent=Decimal(0)).total_ore == 100
    with pytest.raises(ValueError):
        invoice_totals(10**9, discount_percent=Decimal(101))
