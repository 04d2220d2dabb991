"""``carryover serve``: placeholder until the session engine and HTTP API land."""

from __future__ import annotations

import argparse


def _serve(args: argparse.Namespace) -> int:
    print("carryover serve: not implemented yet (the session engine and HTTP API are coming)")
    return 0


def add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run the inference service")
    serve.set_defaults(func=_serve)
