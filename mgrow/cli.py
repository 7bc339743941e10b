"""`mgrow` command line: train, verify, grow-checkpoint, plot, data."""

from __future__ import annotations

import argparse
import sys

from mgrow.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgrow", description=__doc__)
    # The deepspeed launcher puts --local_rank before the subcommand; LOCAL_RANK is read from the env.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a megatron-core GPT (starts local ranks unless under a launcher)")
    train.add_argument("--config", required=True, help="training config YAML (configs/*.yaml)")
    train.add_argument("--nproc", type=int, default=None, help="local ranks to start when not under a launcher")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.steps=20")

    verify = sub.add_parser("verify", help="grow a random model by a plan and check function preservation")
    from mgrow import verify as verify_cmd

    verify_cmd.add_arguments(verify)

    grow_checkpoint = sub.add_parser("grow-checkpoint", help="grow a saved checkpoint (weights and optimizer state)")
    from mgrow.checkpoint import offline

    offline.add_grow_arguments(grow_checkpoint)

    plot = sub.add_parser("plot", help="draw a run's loss curve with its growth events (PNG)")
    plot.add_argument("--metrics", required=True, help="the run's metrics file (train.metrics_path)")
    plot.add_argument("--out", required=True, help="PNG to write")
    plot.add_argument("--title", default="", help="plot title (default: the run folder's name)")

    data = sub.add_parser("data", help="build the indexed byte-level corpus")
    data.add_argument("--out", default="data/cache/corpus", help="output prefix (.bin/.idx are written)")
    data.add_argument("--source", action="append", default=None, help="text file or folder (repeatable)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from mgrow.train.launch import train_command

            return train_command(args.config, args.nproc, args.overrides)
        if args.command == "verify":
            from mgrow import verify as verify_cmd

            return verify_cmd.run(args)
        if args.command == "grow-checkpoint":
            from mgrow.checkpoint import offline

            return offline.grow_command(args)
        if args.command == "plot":
            from mgrow.plot import plot_loss

            print(plot_loss(args.metrics, args.out, args.title))
            return 0
        if args.command == "data":
            from mgrow.data import DEFAULT_SOURCES, build_corpus

            print(build_corpus(args.out, args.source or DEFAULT_SOURCES))
            return 0
    except ConfigError as error:
        print(f"mgrow: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        from mgrow.growth import GrowthError

        if not isinstance(error, GrowthError):
            raise
        print(f"mgrow: error: {error}", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
