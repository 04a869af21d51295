"""`guard tenants hash-key|new-key|check`: make API keys and their stored hashes, validate a tenants file."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path


def cmd_tenants_hash_key(args) -> int:
    """The stored form of a key read from standard input (never from argv: shell history, ps)."""
    from server.tenants import hash_key

    key = sys.stdin.readline().strip()
    if not key:
        print("guard: error: give the key on standard input", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def cmd_tenants_new_key(args) -> int:
    """A fresh random key (for the client) and its hash (for the tenants file)."""
    from server.tenants import hash_key

    key = "gk_" + secrets.token_urlsafe(32)
    print(f"key:  {key}\nhash: {hash_key(key)}")
    return 0


def cmd_tenants_check(args) -> int:
    from server.registry import all_specs
    from server.tenants import TenantError, parse_tenants

    path = Path(args.path)
    try:
        tenants = parse_tenants(path.read_text(), [spec.name for spec in all_specs()], str(path))
    except TenantError as exc:
        print(f"guard: error: invalid tenants file:\n{exc}", file=sys.stderr)
        return 1
    for name, tenant in sorted(tenants.items()):
        credentials = f"{len(tenant.key_hashes)} key(s), {len(tenant.identities)} identit(ies)"
        admin = "  admin" if tenant.admin else ""
        print(f"ok  {name:<22} {credentials}; domains {','.join(sorted(tenant.domains))}; "
              f"services {','.join(sorted(tenant.services))}{admin}")  # fmt: skip
    return 0


def add_parser(sub) -> None:
    tenants = sub.add_parser("tenants", help="API keys and the tenants file (authentication, authorization, limits)")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)
    hash_key = tenants_sub.add_parser("hash-key", help="print the sha256:<hex> form of a key read from stdin")
    hash_key.set_defaults(func=cmd_tenants_hash_key)
    new_key = tenants_sub.add_parser("new-key", help="make a random key and print it with its hash")
    new_key.set_defaults(func=cmd_tenants_new_key)
    check = tenants_sub.add_parser("check", help="validate a tenants file")
    check.add_argument("path")
    check.set_defaults(func=cmd_tenants_check)
