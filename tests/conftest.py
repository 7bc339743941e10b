import socket

import pytest

_DIMS = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank():
    """This pytest process as one CPU rank (gloo, megatron's TP=1, PP=1 groups): its ParallelDims.

    In-process tests run on the CPU by design, also on a machine with a GPU.
    """
    global _DIMS
    if _DIMS is None:
        from mgrow.parallel.dims import init_single_process

        _DIMS = init_single_process(device="cpu")
    return _DIMS


@pytest.fixture(scope="session")
def single_rank():
    return one_rank()


def pytest_sessionfinish(session, exitstatus):
    import rank_pool

    rank_pool.close()
