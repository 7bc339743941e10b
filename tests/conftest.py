import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def single_rank():
    """This pytest process as a world of one gloo rank with megatron's TP=1, PP=1 groups."""
    from mgrow.runtime import init_single_process

    return init_single_process()
