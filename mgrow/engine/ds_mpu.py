"""megatron-core's parallel_state in the shape DeepSpeed expects of an ``mpu``.

DeepSpeed 0.19 calls the Megatron-LM-era names ``get_model_parallel_{group,
world_size,rank}`` (``deepspeed/utils/groups.py:851``); megatron-core 0.16 kept
only the group. Everything else is megatron-core's own function.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps

get_tensor_model_parallel_group = ps.get_tensor_model_parallel_group
get_tensor_model_parallel_world_size = ps.get_tensor_model_parallel_world_size
get_tensor_model_parallel_rank = ps.get_tensor_model_parallel_rank
get_tensor_model_parallel_src_rank = ps.get_tensor_model_parallel_src_rank
get_pipeline_model_parallel_world_size = ps.get_pipeline_model_parallel_world_size
get_pipeline_model_parallel_rank = ps.get_pipeline_model_parallel_rank
get_pipe_parallel_group = ps.get_pipeline_model_parallel_group
get_data_parallel_group = ps.get_data_parallel_group
get_data_parallel_world_size = ps.get_data_parallel_world_size
get_data_parallel_rank = ps.get_data_parallel_rank
get_model_parallel_group = ps.get_model_parallel_group


def get_model_parallel_world_size() -> int:
    return dist.get_world_size(group=ps.get_model_parallel_group())


def get_model_parallel_rank() -> int:
    return dist.get_rank(group=ps.get_model_parallel_group())


def get_data_parallel_group_ranks() -> list[int]:
    return dist.get_process_group_ranks(ps.get_data_parallel_group())
