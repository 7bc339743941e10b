"""`mgrow` command line: train, verify, grow-checkpoint, bench, plot, data.

The parser imports nothing heavy: a bad flag or config is refused on every rank
before torch, megatron-core or DeepSpeed is loaded.
"""

from __future__ import annotations

import argparse
import sys

from mgrow.errors import ConfigError

DEFAULT_TOL = 1e-5  # max-abs logit difference of fp32 growth


def _verify_arguments(parser) -> None:
    from mgrow.train.config import OPTIMIZERS

    parser.add_argument("--model", help="model YAML (ModelConfig keys, e.g. configs/models/tiny.yaml)")
    parser.add_argument("--plan", action="append",
                        help="growth plan YAML (e.g. configs/plans/all_ops.yaml); repeat to check several")
    parser.add_argument("--before", help="checkpoint A: compare its logits with --after's instead of growing a model")
    parser.add_argument("--after", help="checkpoint B (e.g. made from A by mgrow grow-checkpoint)")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL, help="largest max-abs logit difference accepted")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model and tokens")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (sharded check)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size (sharded check)")
    parser.add_argument("--dp", type=int, default=1, help="data parallel size (sharded check)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 model with fp32 master weights (sharded check; sets the model's bf16 key)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="optimizer path of the sharded check (default adam); without it and at "
                             "tp = pp = dp = 1 the reference operators are checked alone")


def _grow_checkpoint_arguments(parser) -> None:
    parser.add_argument("--in", dest="source", required=True, help="checkpoint to grow (a root or a step folder)")
    parser.add_argument("--plan", required=True, help="growth plan YAML")
    parser.add_argument("--out", required=True, help="checkpoint root to write the grown checkpoint into")
    for flag in ("tp", "pp", "dp"):
        parser.add_argument(f"--{flag}", type=int, default=None, help=f"{flag} of the job that grows it "
                                                                      "(default: the checkpoint's)")


def _bench_growth_arguments(parser) -> None:
    from mgrow.train.config import OPTIMIZERS

    parser.add_argument("--model", required=True, help="model YAML (ModelConfig keys)")
    parser.add_argument("--plan", required=True, help="growth plan YAML")
    for flag in ("tp", "pp", "dp"):
        parser.add_argument(f"--{flag}", type=int, default=1, help=f"{flag} of the job")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="megatron", help="optimizer path")
    parser.add_argument("--bf16", action="store_true", help="bf16 model with fp32 master weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the token batches")
    parser.add_argument("--throughput-steps", type=int, default=10,
                        help="training steps timed for the grown and the fresh engine each")
    parser.add_argument("--profile", default=None, help="write rank 0's cProfile of the in-memory growth to this file")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgrow", description=__doc__)
    # The deepspeed launcher puts --local_rank before the subcommand; LOCAL_RANK is read from the env.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a megatron-core GPT (starts local ranks unless under a launcher)")
    train.add_argument("--config", required=True, help="training config YAML (configs/*.yaml)")
    train.add_argument("--nproc", type=int, default=None, help="local ranks to start when not under a launcher")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.steps=20")

    _verify_arguments(sub.add_parser("verify", help="grow a random model by a plan and check function preservation"))
    _grow_checkpoint_arguments(
        sub.add_parser("grow-checkpoint", help="grow a saved checkpoint (weights and optimizer state)"))

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    _bench_growth_arguments(bench.add_parser(
        "growth", help="in-memory growth vs the checkpoint round trip and the memcpy floor; grown vs fresh tokens/s"))

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
        if args.command == "bench":
            from mgrow.bench import growth as bench_growth

            return bench_growth.command(args)
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
