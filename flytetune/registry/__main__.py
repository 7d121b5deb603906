"""python -m flytetune.registry list|show|history|promote|rollback --output_uri URI --name NAME

    list      a table of versions (--json for JSON)
    show      one version as JSON (production unless --version)
    history   the promotion log as JSON, oldest first
    promote   --version V --reason TEXT; prints the new pointer
    rollback  --reason TEXT; back to the version production served before; prints the new pointer

Bad input (unknown or incomplete version, nothing to roll back, a missing flag) is one line
`error: ...` on stderr with exit status 2.
"""

import argparse
import json
import sys

from flytetune import registry, storage


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and the error on two lines; we keep one
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _table(rows: list[dict]) -> str:
    lines = [("", "version", "created_at", "accuracy", "macro_f1", "status")]
    for row in rows:
        metrics = row["metrics"] or {}
        lines.append(("*" if row["production"] else "", row["version"], row["created_at"] or "-",
                      _number(metrics.get("accuracy")), _number(metrics.get("macro_f1")),
                      "production" if row["production"] else "complete" if row["complete"] else "incomplete"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m flytetune.registry", description="The model registry under output_uri.")
    parser.add_argument("command", choices=["list", "show", "history", "promote", "rollback"])
    parser.add_argument("--output_uri", required=True)
    parser.add_argument("--name", required=True, help="model.name: the folder under output_uri")
    parser.add_argument("--version", help="show: this version; promote: the version to promote")
    parser.add_argument("--reason", help="promote, rollback: why (kept in the log)")
    parser.add_argument("--json", action="store_true", help="list: JSON instead of a table")
    args = parser.parse_args(argv)
    if args.command == "promote" and not args.version:
        parser.error("promote needs --version")
    if args.command in ("promote", "rollback") and not args.reason:
        parser.error(f"{args.command} needs --reason")
    try:
        if args.command == "list":
            rows = registry.list_versions(args.output_uri, args.name)
            print(json.dumps(rows, indent=2) if args.json else _table(rows))
            return 0
        if args.command == "show":
            result = registry.show(args.output_uri, args.name, args.version)
        elif args.command == "history":
            result = registry.history(args.output_uri, args.name)
        elif args.command == "promote":
            result = registry.promote(args.output_uri, args.name, args.version, args.reason)
        else:
            result = registry.rollback(args.output_uri, args.name, args.reason)
    except (registry.RegistryError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
