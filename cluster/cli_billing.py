"""`anker keys|tenants|members|usage|invoice|admin-token`: the operator's billing and governance commands.

They work on the database directly (the stack need not run) through the same governance layer as the admin API,
so every change is checked the same way and written to the audit log as ``cli:<user>``. Keys are printed once.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.schema import AnkerConfig

if TYPE_CHECKING:
    from deployments.billing.governance import Actor
    from deployments.billing.service import BillingService

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

ConfigLoader = Callable[[argparse.Namespace], AnkerConfig]


def service(config: AnkerConfig) -> BillingService:
    from deployments.billing.service import BillingService, billing_spec

    return BillingService(billing_spec(config))


def actor() -> Actor:
    from deployments.billing.governance import Actor

    return Actor.operator(f"cli:{getpass.getuser()}")


def _fail(command: str, message: str, code: int = EXIT_USAGE) -> int:
    print(f"anker {command}: {message}", file=sys.stderr)
    return code


def _models(value: str | None) -> list[str] | None:
    return [m.strip() for m in value.split(",") if m.strip()] if value else None


def _month(value: str | None) -> str:
    if value is None:
        return datetime.now(UTC).strftime("%Y-%m")
    try:
        datetime.strptime(value, "%Y-%m")
    except ValueError:
        raise argparse.ArgumentTypeError("--month must look like 2026-11") from None
    return value


def _run(command: str, action: Callable[[], int]) -> int:
    from deployments.errors import AnkerError

    try:
        return action()
    except AnkerError as error:
        return _fail(command, error.message, EXIT_FAILED if error.status in (403, 404, 409) else EXIT_USAGE)


def add_commands(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser], load: ConfigLoader
) -> None:
    keys = sub.add_parser("keys", help="create, list, change and revoke API keys").add_subparsers(
        dest="keys_command", metavar="ACTION", required=True
    )
    create = with_config(
        keys.add_parser(
            "create",
            help="create a key; it is printed once, alone on the last line",
            description="Create an API key for an organisation (created as pay-as-you-go if new). Only a keyed "
            "hash is stored: the key is printed once.",
        )
    )
    create.add_argument("--tenant", required=True, help="organisation the key belongs to")
    create.add_argument(
        "--role",
        default="member",
        choices=["owner", "admin", "member", "viewer"],
        help="what the key may do (default: member: call models, see its own usage)",
    )
    create.add_argument(
        "--member", metavar="MEMBER_ID", help="the member the key belongs to (the key takes their role)"
    )
    create.add_argument("--name", help="a label for the key")
    create.add_argument("--budget-dkk", metavar="N", help="monthly budget of this key in DKK")
    create.add_argument("--rpm", type=int, metavar="N", help="requests per minute (default from config)")
    create.add_argument("--tpm", type=int, metavar="N", help="tokens per minute (default from config)")
    create.add_argument("--models", metavar="LIST", help="allowed models, comma-separated; region:dk admits a region")
    create.set_defaults(func=lambda a: _keys_create(a, load(a)))

    listing = with_config(keys.add_parser("list", help="list keys (settings, never the keys)"))
    listing.add_argument("--tenant", help="only this organisation's keys")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=lambda a: _keys_list(a, load(a)))

    change = with_config(keys.add_parser("set", help="change a key's budget, limits or allowed models"))
    change.add_argument("key_id", metavar="KEY_ID")
    change.add_argument("--budget-dkk", metavar="N|none")
    change.add_argument("--rpm", metavar="N|none")
    change.add_argument("--tpm", metavar="N|none")
    change.add_argument("--models", metavar="LIST|all")
    change.set_defaults(func=lambda a: _keys_set(a, load(a)))

    revoke = with_config(keys.add_parser("revoke", help="revoke a key by its id"))
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(func=lambda a: _keys_revoke(a, load(a)))

    tenants = sub.add_parser("tenants", help="organisations: plans, discounts, budgets, ceilings").add_subparsers(
        dest="tenants_command", metavar="ACTION", required=True
    )
    for action in ("create", "set"):
        p = with_config(tenants.add_parser(action, help=f"{action} an organisation's plan, budget and ceilings"))
        p.add_argument("tenant", metavar="TENANT")
        p.add_argument("--display-name")
        p.add_argument("--plan", choices=["payg", "monthly"], help="pay-as-you-go, or a monthly agreement")
        p.add_argument("--monthly-fee-dkk", metavar="N", help="fixed monthly fee of a monthly agreement")
        p.add_argument("--discount-percent", metavar="P", help="discount on usage of a monthly agreement")
        p.add_argument("--budget-kind", choices=["monthly", "prepaid", "none"], help="monthly cap or prepaid credit")
        p.add_argument("--budget-dkk", metavar="N", help="the cap or the credit, in DKK")
        p.add_argument("--max-rpm", metavar="N|none", help="ceiling on any key's requests per minute")
        p.add_argument("--max-tpm", metavar="N|none", help="ceiling on any key's tokens per minute")
        p.add_argument("--max-keys", metavar="N|none", help="ceiling on the organisation's active keys")
        p.set_defaults(func=lambda a, action=action: _tenants_change(a, load(a), action))
    tlist = with_config(tenants.add_parser("list", help="list organisations"))
    tlist.set_defaults(func=lambda a: _print_json(a, load(a), "list_tenants", {}))

    members = sub.add_parser("members", help="people of an organisation and their roles").add_subparsers(
        dest="members_command", metavar="ACTION", required=True
    )
    madd = with_config(members.add_parser("add", help="add a member in a role"))
    madd.add_argument("--tenant", required=True)
    madd.add_argument("--name", required=True)
    madd.add_argument("--role", required=True, choices=["owner", "admin", "member", "viewer"])
    madd.set_defaults(
        func=lambda a: _print_json(a, load(a), "add_member", {"tenant": a.tenant, "name": a.name, "role": a.role})
    )
    mlist = with_config(members.add_parser("list", help="list an organisation's members"))
    mlist.add_argument("--tenant", required=True)
    mlist.set_defaults(func=lambda a: _print_json(a, load(a), "list_members", {"tenant": a.tenant}))

    usage = with_config(
        sub.add_parser(
            "usage",
            help="an organisation's usage in tokens and DKK for a month",
            description="Tokens (uncached, cached, output), requests and DKK, as GET /v1/usage shows.",
        )
    )
    usage.add_argument("--tenant", required=True)
    usage.add_argument("--month", type=_month, default=None, help="YYYY-MM (default: this month)")
    usage.add_argument("--group-by", choices=["day", "model"], default="model")
    usage.add_argument("--json", action="store_true", help="print JSON")
    usage.set_defaults(func=lambda a: _usage(a, load(a)))

    invoice = with_config(
        sub.add_parser(
            "invoice",
            help="write an organisation's monthly invoice (JSON and CSV)",
            description="Usage per model and token kind, plan fee, discount, net, VAT and total in DKK.",
        )
    )
    invoice.add_argument("--tenant", required=True)
    invoice.add_argument("--month", type=_month, default=None, help="YYYY-MM (default: this month)")
    invoice.add_argument("--out", default=".", metavar="DIR", help="folder for the files (default: .)")
    invoice.set_defaults(func=lambda a: _invoice(a, load(a)))

    aside = with_config(
        sub.add_parser(
            "set-aside",
            help="usage reports billing could not record (a model without a price, impossible counts)",
            description="Lists the usage set aside, unbilled, with each report's reason; --record records it "
            "again once the cause is fixed (a price set from the request's start, say), and what is recorded leaves "
            "the list.",
        )
    )
    aside.add_argument("--record", action="store_true", help="record them again, then list what is left")
    aside.set_defaults(func=lambda a: _set_aside(a, load(a)))

    token = with_config(sub.add_parser("admin-token", help="print the operator's admin token for the /admin HTTP API"))
    token.set_defaults(func=lambda a: _admin_token(load(a)))


def _keys_create(args: argparse.Namespace, config: AnkerConfig) -> int:
    billing = service(config)

    def action() -> int:
        record, key = billing.governance.create_key(
            actor(),
            args.tenant,
            role=args.role,
            member_id=args.member,
            name=args.name,
            allowed_models=_models(args.models),
            budget_dkk=args.budget_dkk,
            rpm=args.rpm,
            tpm=args.tpm,
        )
        print(
            f"created key {record.key_id} ({record.role}) for tenant {record.tenant}; it is shown once:",
            file=sys.stderr,
        )
        print(key)
        return EXIT_OK

    return _run("keys create", action)


def _keys_list(args: argparse.Namespace, config: AnkerConfig) -> int:
    from deployments.billing.governance import key_json

    records = service(config).governance.list_keys(actor(), args.tenant)
    if args.json:
        print(json.dumps([key_json(r) for r in records], indent=2))
        return EXIT_OK
    print(
        f"{'KEY ID':<14}{'TENANT':<22}{'ROLE':<8}{'CREATED (UTC)':<21}{'STATUS':<9}"
        f"{'BUDGET DKK':<12}{'RPM':<7}{'TPM':<10}MODELS"
    )
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created_at))
        body = key_json(r)
        print(
            f"{r.key_id:<14}{r.tenant:<22}{r.role:<8}{created:<21}{'revoked' if r.revoked_at else 'active':<9}"
            f"{body['budget_dkk'] or '-':<12}{r.rpm or '-'!s:<7}{r.tpm or '-'!s:<10}"
            f"{','.join(r.allowed_models) if r.allowed_models is not None else 'all'}"
        )
    return EXIT_OK


def _optional(value: str | None, convert: Callable[[str], Any]) -> dict[str, Any]:
    if value is None:
        return {}
    return {"value": None if value.lower() in ("none", "all") else convert(value)}


def _keys_set(args: argparse.Namespace, config: AnkerConfig) -> int:
    changes: dict[str, Any] = {}
    try:
        for field, value, convert in (
            ("budget_dkk", args.budget_dkk, str),
            ("rpm", args.rpm, int),
            ("tpm", args.tpm, int),
            ("allowed_models", args.models, _models),
        ):
            for v in _optional(value, convert).values():
                changes[field] = v
    except ValueError:
        return _fail("keys set", "--rpm and --tpm take whole numbers or none")
    if not changes:
        return _fail("keys set", "nothing to change: give --budget-dkk, --rpm, --tpm or --models")
    billing = service(config)

    def action() -> int:
        record = billing.governance.update_key(actor(), args.key_id, **changes)
        print(json.dumps(record.public(), indent=2))
        return EXIT_OK

    return _run("keys set", action)


def _keys_revoke(args: argparse.Namespace, config: AnkerConfig) -> int:
    billing = service(config)

    def action() -> int:
        billing.governance.revoke_key(actor(), args.key_id)
        print(f"revoked {args.key_id}")
        return EXIT_OK

    return _run("keys revoke", action)


def _tenants_change(args: argparse.Namespace, config: AnkerConfig, action_name: str) -> int:
    settings: dict[str, Any] = {}
    for field in ("display_name", "plan", "monthly_fee_dkk", "discount_percent", "budget_dkk"):
        if getattr(args, field) is not None:
            settings[field] = getattr(args, field)
    if args.budget_kind is not None:
        settings["budget_kind"] = None if args.budget_kind == "none" else args.budget_kind
        if args.budget_kind == "none":
            settings["budget_dkk"] = None
    try:
        for field in ("max_rpm", "max_tpm", "max_keys"):
            for value in _optional(getattr(args, field), int).values():
                settings[field] = value
    except ValueError:
        return _fail(f"tenants {action_name}", "--max-rpm, --max-tpm and --max-keys take whole numbers or none")
    billing = service(config)

    def action() -> int:
        if action_name == "create":
            display = settings.pop("display_name", None)
            result = billing.governance.create_tenant(actor(), args.tenant, display, **settings)
        else:
            if not settings:
                return _fail("tenants set", "nothing to change")
            result = billing.governance.update_tenant(actor(), args.tenant, **settings)
        print(json.dumps(result, indent=2))
        return EXIT_OK

    return _run(f"tenants {action_name}", action)


def _print_json(args: argparse.Namespace, config: AnkerConfig, operation: str, arguments: dict[str, Any]) -> int:
    billing = service(config)

    def action() -> int:
        print(json.dumps(getattr(billing.governance, operation)(actor(), **arguments), indent=2))
        return EXIT_OK

    return _run(operation.replace("_", " "), action)


def _set_aside(args: argparse.Namespace, config: AnkerConfig) -> int:
    ledger = service(config).ledger
    if args.record:
        recorded = ledger.record_set_aside()
        print(f"recorded {len(recorded.new)} set-aside usage reports", file=sys.stderr)
    rows = ledger.set_aside()
    print(f"{'REQUEST':<40}{'TENANT':<22}{'MODEL':<24}{'PROMPT':>8}{'CACHED':>8}{'OUTPUT':>8}  {'REASON':<20}SET ASIDE")
    for r in rows:
        print(
            f"{r['request_id']!s:<40}{r['tenant']!s:<22}{r['model']!s:<24}{r['prompt_tokens']:>8}{r['cached_tokens']:>8}"
            f"{r['completion_tokens']:>8}  {r['reason']!s:<20}{r['set_aside_at']}"
        )
    return EXIT_OK


def _usage(args: argparse.Namespace, config: AnkerConfig) -> int:
    from deployments.billing.budgets import month_bounds
    from deployments.billing.ledger import usage_total
    from deployments.billing.service import bucket_json

    month = args.month or _month(None)
    start, end = month_bounds(month)
    ledger = service(config).ledger
    buckets = ledger.usage(args.tenant, start, end, args.group_by)
    whole = usage_total(buckets, start, end)
    if args.json:
        print(
            json.dumps(
                {
                    "tenant": args.tenant,
                    "month": month,
                    "group_by": args.group_by,
                    "data": [bucket_json(b) for b in buckets],
                    "totals": bucket_json(whole, with_range=False),
                },
                indent=2,
            )
        )
        return EXIT_OK
    print(f"usage of {args.tenant} in {month} (DKK, exact)")
    print(f"{args.group_by.upper():<22}{'REQUESTS':>10}{'UNCACHED':>12}{'CACHED':>12}{'OUTPUT':>12}{'DKK':>16}")
    for b in buckets:
        j = bucket_json(b)
        label = b.model if args.group_by == "model" else b.start.strftime("%Y-%m-%d")
        print(
            f"{label!s:<22}{j['requests']:>10}{j['input_uncached_tokens']:>12}{j['input_cached_tokens']:>12}"
            f"{j['output_tokens']:>12}{j['cost_dkk']:>16}"
        )
    t = bucket_json(whole, with_range=False)
    print(
        f"{'total':<22}{t['requests']:>10}{t['input_uncached_tokens']:>12}{t['input_cached_tokens']:>12}"
        f"{t['output_tokens']:>12}{t['cost_dkk']:>16}"
    )
    return EXIT_OK


def _invoice(args: argparse.Namespace, config: AnkerConfig) -> int:
    from deployments.billing.invoice import build_invoice, write_invoice

    month = args.month or _month(None)
    try:
        invoice = build_invoice(service(config).ledger, args.tenant, month, Decimal(config.billing.vat_percent))
    except LookupError:
        return _fail("invoice", f"no tenant {args.tenant}", EXIT_FAILED)
    json_path, csv_path = write_invoice(invoice, Path(args.out))
    print(
        f"invoice {args.tenant} {month}: net {invoice['net_dkk']} DKK + VAT {invoice['vat_dkk']} = "
        f"{invoice['total_dkk']} DKK",
        file=sys.stderr,
    )
    print(json_path)
    print(csv_path)
    return EXIT_OK


def _admin_token(config: AnkerConfig) -> int:
    from deployments.billing.service import load_or_create_admin_token

    print(load_or_create_admin_token(config.secrets_path, create=config.secrets_dir is None))
    return EXIT_OK
