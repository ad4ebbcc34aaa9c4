"""`controlctl`: the operators' command line over the ControlAdmin API.

Connection settings are the trainer client's (`ClientConfig.from_env`):
TRAINCTL_SERVER, TRAINCTL_TOKEN and TRAINCTL_TLS / _TLS_CA / _TLS_CERT / _TLS_KEY;
``--server``, ``--token-file`` and ``--tls-ca`` / ``--tls-cert`` / ``--tls-key``
take precedence. A gRPC error prints ``controlctl: CODE: details`` on stderr
and exits 2 (a bad request: invalid argument, not found), 3 (unauthenticated,
permission denied) or 1 (anything else, e.g. the server is unreachable), as
the one table of status codes (`trainer_client.errors.STATUSES`) says; a TLS
mismatch names the option to pass instead of gRPC's details.

`parser` builds the argument tree, `commands` holds one function per command,
`render` what they print, `plot` the ``run --plot`` PNG (matplotlib) and
`diagnose` which TLS option a refused connection lacks.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace

import grpc

from control_server.ctl.commands import PROG, Ctl, UsageError, read_file
from control_server.ctl.diagnose import tls_hint
from control_server.ctl.parser import build_parser
from control_server.usage import misplaced_option
from trainer_client.api import control_pb2_grpc as pb_grpc
from trainer_client.client import open_channel
from trainer_client.config import ClientConfig, target_problem
from trainer_client.errors import ControlError, exit_code

__all__ = ["build_parser", "client_config", "exit_code", "main"]


#: What `token create` prints (token_urlsafe): a --token-file value like this that
#: is no file is a token given in the file's place, and is never printed.
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9_-]{20,}")


def client_config(args: argparse.Namespace, env: Mapping[str, str]) -> ClientConfig:
    """The connection settings: TRAINCTL_* from `env`, then the options."""
    if args.server:
        problem = target_problem(args.server)
        if problem is not None:
            raise UsageError(f"--server must be HOST:PORT, but got {args.server!r} ({problem})")
    try:
        config = ClientConfig.from_env(env)
        if args.server:
            config = replace(config, target=args.server)
    except ValueError as error:
        raise UsageError(str(error)) from None
    config = _tls_options(args, config)
    if args.token_file is not None:
        if not args.token_file.exists() and _TOKEN_LIKE.fullmatch(str(args.token_file)):
            raise UsageError(
                "the --token-file path does not exist, and looks like a token itself (not "
                "shown): put the token in a file and pass its path, or set TRAINCTL_TOKEN"
            )
        token = read_file(args.token_file).strip()
        try:
            config = replace(config, token=token)
        except ValueError as error:
            raise UsageError(f"--token-file {args.token_file}: {error}") from None
    return config


def _tls_options(args: argparse.Namespace, config: ClientConfig) -> ClientConfig:
    """`config` with --tls-ca, --tls-cert and --tls-key, each a file that exists."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key must be given together")
    for flag, path in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert)):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag} {path}: no such file")
    if args.tls_key is not None and not args.tls_key.is_file():
        raise UsageError(f"--tls-key {args.tls_key}: no such file")
    if args.tls_ca is not None:
        config = replace(config, tls_ca=args.tls_ca)
    if args.tls_cert is not None:
        config = replace(config, tls_cert=args.tls_cert, tls_key=args.tls_key)
    return config


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run one command; return the exit status. Only here is ``os.environ`` read."""
    parser = build_parser()
    misplaced = misplaced_option(parser, sys.argv[1:] if argv is None else argv)
    if misplaced is not None:
        print(f"{PROG}: {misplaced}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (2) and --help (0), already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    err = sys.stderr
    channel = None
    config: ClientConfig | None = None
    try:
        config = client_config(args, os.environ if env is None else env)
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise UsageError(f"--timeout must be a positive number, but got {args.timeout}")
        channel = open_channel(config)
        metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()
        ctl = Ctl(pb_grpc.ControlAdminStub(channel), metadata, args.timeout, sys.stdout, err)
        status: int = args.func(ctl, args)
        return status
    except grpc.RpcError as error:
        details = error.details() or ""
        if error.code() == grpc.StatusCode.UNAVAILABLE and config is not None:
            details = tls_hint(config, details, min(args.timeout, 5.0)) or details
        print(f"{PROG}: {error.code().name}: {details}", file=err)
        return exit_code(error.code())
    except (UsageError, ControlError) as error:
        print(f"{PROG}: {error}", file=err)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (`controlctl decisions | head`): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if channel is not None:
            channel.close()
