"""Placeholder until the reference operators land (helper-owned file)."""


def add_arguments(parser):
    parser.add_argument("--model")
    parser.add_argument("--plan")


def run(args):
    raise NotImplementedError
