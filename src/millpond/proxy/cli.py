"""``millpond proxy``: run the proxy from a pgbouncer.ini or from flags."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from millpond.errors import ConfigError
from millpond.proxy.config import ProxyConfig, config_from_args, load_config, parse_setting

# Flags that set a [pgbouncer] setting of the same meaning.
_FLAG_SETTINGS = {
    "pool_mode": "pool_mode",
    "pool_size": "default_pool_size",
    "max_client_conn": "max_client_conn",
    "auth_type": "auth_type",
    "auth_file": "auth_file",
}


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="a pgbouncer.ini (PgBouncer's format)")
    parser.add_argument("--listen", help="HOST:PORT to listen on (without a config file)")
    parser.add_argument("--backend", help="postgresql://user[:pw]@host:port/db to pool")
    parser.add_argument("--pool-mode", choices=["session", "transaction", "statement"])
    parser.add_argument("--pool-size", type=int, help="default_pool_size")
    parser.add_argument("--max-client-conn", type=int)
    parser.add_argument("--auth-type", help="trust, plain, md5, scram-sha-256, hba")
    parser.add_argument("--auth-file", help="userlist.txt")
    parser.add_argument("-v", "--verbose", action="count", default=0)


def build_config(args: argparse.Namespace) -> ProxyConfig:
    overrides = {
        setting: getattr(args, flag)
        for flag, setting in _FLAG_SETTINGS.items()
        if getattr(args, flag, None) is not None
    }
    if args.config:
        config = load_config(args.config)
        if overrides:
            from dataclasses import replace

            values = {k: parse_setting(k, str(v), source="--flag") for k, v in overrides.items()}
            config = replace(config, settings=replace(config.settings, **values))
        return config
    if not (args.listen and args.backend):
        raise ConfigError("config", "give a pgbouncer.ini, or both --listen and --backend")
    overrides.setdefault("auth_type", "trust")
    overrides.setdefault("unix_socket_dir", "")
    return config_from_args(args.listen, args.backend, **overrides)


async def serve(config: ProxyConfig) -> None:
    from millpond.proxy.server import Proxy

    proxy = Proxy(config)
    await proxy.start()
    proxy.install_signal_handlers()
    print(f"millpond proxy listening on {', '.join(proxy.addresses)}", file=sys.stderr, flush=True)
    await proxy.wait_closed()


def setup_logging(config: ProxyConfig, verbose: int) -> None:
    """Log to stderr, and to ``logfile`` when set; ``verbose`` (flag or setting) adds detail."""
    s = config.settings
    level = logging.WARNING - 10 * min(max(verbose, s.verbose), 2)
    if s.log_connections or s.log_disconnections:
        level = min(level, logging.INFO)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if s.logfile:
        handlers.append(logging.FileHandler(s.logfile))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def run_proxy(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"millpond proxy: {exc}", file=sys.stderr)
        return 2
    setup_logging(config, args.verbose)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
    return 0
