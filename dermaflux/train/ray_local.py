"""Ray Train's local mode: a training function run as the one rank of this process (train.launch local, the
one-worker VAE fit), its stdout in the run log as a worker's would be, torch's thread count put back after."""

from __future__ import annotations

from collections.abc import Callable

import torch


def fit_in_this_process(train_fn: Callable[[dict], None], loop_cfg: dict, name: str):
    """`train_fn(loop_cfg)` under Ray Train's local controller; returns its Result (`.error` set on failure)."""
    from ray.train import ScalingConfig
    # The base trainer's local controller: TorchTrainer's would destroy the process group after the run,
    # which DeepSpeed has derived groups from that it keeps for the next run in this process.
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from dermaflux.core.progress import worker_output_in_run_log

    threads = torch.get_num_threads()  # the function sets its own (cpus_per_worker), as a worker does
    try:
        with worker_output_in_run_log(name):
            trainer = DataParallelTrainer(train_fn, scaling_config=ScalingConfig(num_workers=0),
                                          train_loop_config=loop_cfg)
            return trainer.fit()
    finally:
        torch.set_num_threads(threads)
