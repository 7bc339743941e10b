"""`mgrow` command line: train, verify, grow-checkpoint, fuse, bench, plot, plan, data.

The parser imports nothing heavy: a bad flag or config is refused on every rank
before torch, megatron-core or DeepSpeed is loaded.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from mgrow.jobs.launch import exit_code
from mgrow.parallel.device import BACKENDS, DEVICES
from mgrow.train.config import OPTIMIZERS

DEFAULT_TOL = 1e-5  # max-abs logit difference of fp32 growth


def _device_arguments(parser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the ranks' tensors live (auto: CUDA when torch sees a GPU, else CPU)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="collectives backend (auto: nccl on CUDA, gloo on CPU; gloo lets ranks share one GPU)")


def _verify_arguments(parser) -> None:
    parser.add_argument("--model", help="model YAML (ModelConfig keys, e.g. configs/models/tiny.yaml)")
    parser.add_argument("--plan", action="append",
                        help="growth plan YAML (e.g. configs/plans/all_ops.yaml); repeat to check several")
    parser.add_argument("--before", help="checkpoint A (any format grow-checkpoint reads): compare its logits with "
                                         "--after's instead of growing a model; --model describes a checkpoint "
                                         "that does not describe itself")
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
    _device_arguments(parser)


def _grow_checkpoint_arguments(parser) -> None:
    parser.add_argument("--in", dest="source", required=True,
                        help="checkpoint to grow: mgrow's (a root or a step folder), Megatron-LM's (a save folder or "
                             "an iter_NNNNNNN folder), a dist_checkpointing folder or a DeepSpeed checkpoint folder")
    parser.add_argument("--plan", required=True, help="growth plan YAML")
    parser.add_argument("--out", required=True, help="where to write the grown checkpoint, in --in's format (a root; "
                                                     "the folder itself for dist_checkpointing)")
    parser.add_argument("--model", default=None, help="model YAML of a dist_checkpointing or DeepSpeed checkpoint "
                                                      "that does not describe its model (one mgrow wrote does)")
    for flag in ("tp", "pp", "dp"):
        parser.add_argument(f"--{flag}", type=int, default=None, help=f"{flag} of the job that grows it "
                                                                      "(default: the checkpoint's)")
    _device_arguments(parser)


# `mgrow bench X` runs mgrow.jobs.bench.<module>.main; the studies (a file of runs compared by validation loss
# against training FLOPs) share one runner.
BENCH_MODULES = {"growth": "growth", "efficiency": "efficiency", "masked": "efficiency", "warm-start": "efficiency",
                 "fusion": "fusion", "transfer": "transfer"}


def _bench_growth_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="model YAML (ModelConfig keys)")
    parser.add_argument("--plan", default=None, help="growth plan YAML")
    parser.add_argument("--scaling", default=None, help="a scaling study YAML (points: [{model, plan}], tp: [...]): "
                                                        "growth, floor and bytes for each point at each TP size")
    parser.add_argument("--plot", default=None, help="with --scaling: write growth seconds against state bytes "
                                                     "(PNG) here")
    for flag in ("tp", "pp", "dp"):
        parser.add_argument(f"--{flag}", type=int, default=1, help=f"{flag} of the job")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="megatron", help="optimizer path")
    parser.add_argument("--bf16", action="store_true", help="bf16 model with fp32 master weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the token batches")
    parser.add_argument("--throughput-steps", type=int, default=10,
                        help="training steps timed for the grown and the fresh engine each")
    parser.add_argument("--profile", default=None, help="write rank 0's cProfile of the in-memory growth to this file")
    parser.add_argument("--no-roundtrip", dest="roundtrip", action="store_false",
                        help="skip the checkpoint round trip (save, grow offline, load)")
    _device_arguments(parser)


def _bench_study_arguments(parser, study: str, runs: bool = True) -> None:
    parser.add_argument("--study", default=study, help=f"study YAML (default {study})")
    parser.add_argument("--size", default="reduced", help="a key of the study's sizes (reduced: <= 10 min)")
    parser.add_argument("--out", default=f"runs/{os.path.splitext(os.path.basename(study))[0]}",
                        help="folder for each run's config, log and metrics")
    if runs:
        parser.add_argument("--runs", default=None, help="comma-separated runs to train (scratch always runs)")
        parser.add_argument("--reuse", action="store_true",
                            help="read a run's metrics in --out instead of training it again when they are complete")
        parser.add_argument("--jobs", type=int, default=1, help="trials trained at once (each one single-threaded rank)")
        parser.add_argument("--results", default=None,
                            help="results file (default <study dir>/results/<study>_<size>.json; written when the "
                                 "size sweeps LRs or seeds, or when given)")
        parser.add_argument("--rerun", default=None, metavar="TRIAL",
                            help="train one trial of the results file again from its recorded config and compare "
                                 "the curves")
    parser.add_argument("--plot", default=None, help="write the validation loss vs FLOPs plot (PNG) here")


def _bench_transfer_arguments(parser) -> None:
    parser.add_argument("--source-steps", type=int, default=200, help="steps of the dense source model")
    parser.add_argument("--steps", type=int, default=200, help="steps of each target run (scratch and transfer)")
    parser.add_argument("--window", type=int, default=20, help="transfer.unfreeze_window of the transfer runs")
    parser.add_argument("--threshold", type=float, default=0.01, help="transfer.unfreeze_threshold")
    parser.add_argument("--nproc", type=int, default=1, help="local ranks of each run")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")


def _fuse_arguments(parser) -> None:
    parser.add_argument("--a", required=True, help="checkpoint of model A (a root or a step folder)")
    parser.add_argument("--b", required=True, help="checkpoint of model B (the same model config as A)")
    parser.add_argument("--out", required=True, help="checkpoint root to write the fused model into")
    for flag in ("tp", "pp", "dp"):
        parser.add_argument(f"--{flag}", type=int, default=None, help=f"{flag} of the job that fuses them "
                                                                      "(default: A's)")
    _device_arguments(parser)


def _import_hf_arguments(parser) -> None:
    parser.add_argument("--from", dest="source", required=True,
                        help="a local Hugging Face model folder (config.json + safetensors, sharded or not)")
    parser.add_argument("--out", required=True, help="checkpoint root to write (step 0, and model.yaml)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size of the import job")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the import job")
    parser.add_argument("--config", default=None, help="training config the checkpoint is for (its model section "
                                                       "is replaced by the imported model; default: mgrow's)")
    parser.add_argument("--bf16", action="store_true", help="a bf16 model (fp32 master weights); default fp32")
    _device_arguments(parser)


def _export_hf_arguments(parser) -> None:
    parser.add_argument("--in", dest="source", required=True, help="checkpoint to export (any format mgrow reads)")
    parser.add_argument("--out", required=True, help="Hugging Face model folder to write")
    parser.add_argument("--family", choices=("llama", "mistral", "qwen2", "gpt2"), default=None,
                        help="the transformers family to write (default: the model's own)")
    parser.add_argument("--model", default=None, help="model YAML of a checkpoint that does not describe its model")
    _device_arguments(parser)


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
    _fuse_arguments(sub.add_parser("fuse", help="fuse two checkpoints of one model into one twice-as-wide model"))
    _import_hf_arguments(sub.add_parser(
        "import-hf", help="a Hugging Face model folder (Llama, Mistral, Qwen2, GPT-2) into an mgrow checkpoint"))
    _export_hf_arguments(sub.add_parser("export-hf", help="a checkpoint's model as a Hugging Face model folder"))

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    _bench_growth_arguments(bench.add_parser(
        "growth", help="in-memory growth vs the checkpoint round trip and the memcpy floor; grown vs fresh tokens/s"))
    _bench_study_arguments(bench.add_parser(
        "efficiency", help="FLOPs to the same validation loss: growth schedules vs training from scratch"),
        "bench/efficiency.yaml")
    _bench_study_arguments(bench.add_parser(
        "fusion", help="two trained models fused and trained on vs the fused size from scratch"),
        "bench/fusion.yaml", runs=False)
    _bench_transfer_arguments(bench.add_parser(
        "transfer", help="loss at equal steps: a GQA / MoE model started by transfer (XATL) vs from scratch"))
    _bench_study_arguments(bench.add_parser(
        "masked", help="masked growth (random new weights behind a ramped mask) vs plain growth vs from scratch"),
        "bench/masked_growth.yaml")
    _bench_study_arguments(bench.add_parser(
        "warm-start", help="explicit warm start (train.init: explicit) vs random init"), "bench/warm_start.yaml")

    plot = sub.add_parser("plot", help="draw a run's loss curve with its growth events (PNG)")
    plot.add_argument("--metrics", required=True, help="the run's metrics file (train.metrics_path)")
    plot.add_argument("--out", required=True, help="PNG to write")
    plot.add_argument("--title", default="", help="plot title (default: the run folder's name)")

    plan = sub.add_parser("plan", help="dry-run a growth at any scale: memory per rank, bytes moved, projected time")
    plan.add_argument("--model", required=True, help="model YAML (ModelConfig keys) the job runs now")
    plan.add_argument("--plan", required=True, help="growth plan YAML")
    for flag in ("tp", "pp", "dp"):
        plan.add_argument(f"--{flag}", type=int, default=1, help=f"{flag} of the job")
    plan.add_argument("--optimizer", default="megatron", help="adam | megatron | zero1 | zero2 | zero3")
    plan.add_argument("--bf16", action="store_true", help="bf16 parameters with fp32 masters")
    plan.add_argument("--device-memory", default="80GiB", help="memory of one rank's device")
    plan.add_argument("--bandwidth", default="intra=300GB/s,inter=25GB/s",
                      help="per-GPU link bandwidth, stated (not measured): intra-node and inter-node")
    plan.add_argument("--gpus-per-node", type=int, default=8, help="consecutive ranks per node")
    plan.add_argument("--local-bytes-per-second", default=None,
                      help="rate of local growth work (default: measured on this machine's CPU)")
    plan.add_argument("--no-moments", action="store_true", help="Adam has not stepped (or optimizer_state: reset)")
    plan.add_argument("--ranks", action="store_true", help="every rank's numbers in the JSON line")

    data = sub.add_parser("data", help="build the indexed byte-level corpus")
    data.add_argument("--out", default="data/cache/corpus", help="output prefix (.bin/.idx are written)")
    data.add_argument("--source", action="append", default=None, help="text file or folder (repeatable)")
    data.add_argument("--pattern", default="*", help="file names to read in a folder, searched recursively; "
                      ".gz files are decompressed (e.g. '*.rst.gz')")
    data.add_argument("--exclude", action="append", default=None,
                      help="leave out files under a folder of this name (repeatable, e.g. translations)")
    return parser


# Each command is a module of mgrow.jobs with ``main(args) -> exit code``, imported when it runs.
COMMANDS = {"train": "train", "verify": "verify", "grow-checkpoint": "grow_checkpoint", "fuse": "fuse",
            "plot": "plot", "data": "data", "plan": "plan", "import-hf": "hf:import_main", "export-hf": "hf:export_main"}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        module = f"mgrow.jobs.bench.{BENCH_MODULES[args.bench]}"
    else:
        module = f"mgrow.jobs.{COMMANDS[args.command]}"
    module, _, function = module.partition(":")
    return exit_code(lambda parsed: getattr(importlib.import_module(module), function or "main")(parsed), args)


if __name__ == "__main__":
    sys.exit(main())
