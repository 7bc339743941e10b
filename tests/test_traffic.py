"""mgrow.parallel.traffic counts what a rank sends and receives, by the model its docstring states."""

import json

from rank_pool import pool


def test_traffic_counts_calls_and_bytes_on_two_ranks(tmp_path):
    out = pool().run(2, "traffic_worker:known_calls", (str(tmp_path),), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    calls = {"all_reduce": 1, "all_gather": 1, "broadcast": 1, "all_gather_object": 1}
    assert ranks[0]["calls"] == {**calls, "send": 1} and ranks[1]["calls"] == {**calls, "recv": 1}
    assert ranks[0]["sent_bytes"] == 4000 + 400 + 40 + 100 and ranks[0]["received_bytes"] == 4000 + 400
    assert ranks[1]["sent_bytes"] == 4000 + 400 and ranks[1]["received_bytes"] == 4000 + 400 + 40 + 100
    assert all(r["restored"] for r in ranks)
