"""`mgrow data`: build the indexed byte-level corpus from text files or folders."""

from mgrow.train.data import DEFAULT_SOURCES, build_corpus


def main(args) -> int:
    print(build_corpus(args.out, args.source or DEFAULT_SOURCES, pattern=args.pattern, exclude=args.exclude or ()))
    return 0
