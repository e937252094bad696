"""The Ray runtime that `serve --ray` and `predict --ray` start: local and small on this machine, or a cluster's.

A local runtime gets `cpus` logical CPUs (rounded up), a 200 MB object store and no dashboard;
`TICKETTUNE_RAY_ADDRESS` joins a running cluster instead. Started once per process.
"""

from __future__ import annotations

import math
import os

ENV_ADDRESS = "TICKETTUNE_RAY_ADDRESS"


def start_ray(cpus: float) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get(ENV_ADDRESS)
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(1, math.ceil(cpus)), object_store_memory=200 * 1024 * 1024,
                 include_dashboard=False, log_to_driver=False)
