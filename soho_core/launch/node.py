"""A training pod's entry point: check the ``soho`` arguments, then become torchrun.

    python -m soho_core.launch.node [torchrun options] -m soho_core pretrain --config demo ...

torchrun restarts its workers (``--max-restarts``) whatever made them fail, so a usage error (an
unknown preset, a bad ``--set``, a flag that does not exist) would be tried again and again, in
every pod, each time failing the same way. Here the arguments are parsed by the real ``soho``
parser and the configuration is loaded before torchrun starts: a usage error exits with code 2
at once, and nothing is retried. With ``restartPolicy: ExitCode`` the training operator reads
2 as permanent too (exit codes 1-127 are permanent, 128 and up, such as an out-of-memory kill or
a preemption's SIGTERM, are retried). What passes the check becomes torchrun (``exec``, so the
pod's exit code is torchrun's): failures after the start are worth retrying, because training
resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys

from soho_core.config import ConfigError, load_config

USAGE_ERROR = 2


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``[torchrun options..., "-m", "soho_core", soho args...]`` -> (torchrun options, soho args)."""
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "soho_core":
            return argv[:i], argv[i + 2:]
    raise ValueError(f"expected torchrun options, then '-m soho_core' and its arguments, got {argv}")


def check(soho_argv: list[str]) -> None:
    """Raise (ConfigError, ValueError, or SystemExit(2) from argparse) unless ``soho_argv`` is a
    training command whose configuration loads. Reads no data: this runs before torchrun."""
    from soho_core.cli import _parser

    args = _parser().parse_args(soho_argv)
    if args.command not in ("pretrain", "finetune"):
        raise ValueError(f"a training pod runs `soho pretrain` or `soho finetune`, not `soho {args.command}`")
    overrides = list(args.set)
    if args.command == "pretrain" and args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.command == "finetune" and args.config is None:
        return  # the --init run's own configuration: read from the store by the training itself
    load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        torchrun, soho_argv = split_argv(argv)
        check(soho_argv)
    except (ConfigError, ValueError) as err:
        print(f"soho: error: {err} (a usage error: exit {USAGE_ERROR}, not retried)", file=sys.stderr)
        return USAGE_ERROR
    except SystemExit as stop:  # argparse has printed what is wrong
        return USAGE_ERROR if stop.code else 0
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *torchrun, "-m", "soho_core", *soho_argv])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
