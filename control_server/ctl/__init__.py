"""`controlctl`: the operators' command line over the ControlAdmin API.

Connection settings are the trainer client's (`ClientConfig.from_env`):
TRAINCTL_SERVER, TRAINCTL_TOKEN and TRAINCTL_TLS / _TLS_CA / _TLS_CERT / _TLS_KEY;
``--server`` and ``--token-file`` take precedence. A gRPC error prints
``controlctl: CODE: details`` on stderr and exits 2 (a bad request: invalid
argument, not found), 3 (unauthenticated, permission denied) or 1 (anything
else, e.g. the server is unreachable), as the one table of status codes
(`trainer_client.errors.STATUSES`) says.

`parser` builds the argument tree, `commands` holds one function per command,
`render` what they print and `plot` the ``run --plot`` PNG (matplotlib).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace

import grpc

from control_server.ctl.commands import PROG, Ctl, UsageError, read_file
from control_server.ctl.parser import build_parser
from trainer_client.api import control_pb2_grpc as pb_grpc
from trainer_client.client import open_channel
from trainer_client.config import ClientConfig
from trainer_client.errors import ControlError, exit_code

__all__ = ["build_parser", "client_config", "exit_code", "main"]


def client_config(args: argparse.Namespace, env: Mapping[str, str]) -> ClientConfig:
    """The connection settings: TRAINCTL_* from `env`, then --server and --token-file."""
    try:
        config = ClientConfig.from_env(env)
        if args.server:
            config = replace(config, target=args.server)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.token_file is not None:
        token = read_file(args.token_file).strip()
        try:
            config = replace(config, token=token)
        except ValueError as error:
            raise UsageError(f"--token-file {args.token_file}: {error}") from None
    return config


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run one command; return the exit status. Only here is ``os.environ`` read."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # usage errors (2) and --help (0), already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    err = sys.stderr
    channel = None
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
        print(f"{PROG}: {error.code().name}: {error.details()}", file=err)
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
