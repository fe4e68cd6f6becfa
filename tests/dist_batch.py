"""Several stage runs in one launched group of processes, for test_distributed: each process runs every job
in turn through the stage's own main, so one launch (the processes, their imports, the process group) serves
many equivalence cases instead of one each. The stages' own launch and its main-only summary are tested
through their real entry points (`python -m stages.<name>`) in test_distributed.py.

    python -m tests.dist_batch JOBS.json PROCESSES

JOBS.json: [{"module": "stages.align", "argv": [...]}, ...]; each job's argv names its own --params file.
The main process prints each job's summary line; any error stops the batch with it.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from stages.core import dist, stage


def main() -> None:
    path, processes = sys.argv[1], int(sys.argv[2])
    if dist.world() == 1 and processes > 1:
        sys.exit(dist.launch("tests.dist_batch", sys.argv[1:], processes))
    for key, value in (("TOKENIZERS_PARALLELISM", "false"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(key, value)  # as stage.run sets them
    with open(path) as f:
        jobs = json.load(f)
    for job in jobs:
        try:
            summary = importlib.import_module(job["module"]).main(job["argv"])
        except (stage.StageFailed, stage.ConfigError) as e:
            print(f"error: {job['module']} {' '.join(job['argv'])}: {e}", file=sys.stderr)
            sys.exit(1)
        if dist.is_main():
            print(summary, flush=True)


if __name__ == "__main__":
    main()
