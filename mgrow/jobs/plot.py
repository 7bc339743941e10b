"""`mgrow plot`: a run's loss curve with its growth events, from its metrics file (PNG)."""

from mgrow.train.plot import plot_loss


def main(args) -> int:
    print(plot_loss(args.metrics, args.out, args.title))
    return 0
