"""One rank of a data-parallel `compress profile` that dies mid-way: rank KILL_RANK sends itself SIGKILL right after
its KILL_STEP-th step (the same point as a machine lost mid-run). Used by tests/test_scale_out.py:

    torchrun --standalone --nproc-per-node 2 tests/scripts/profile_kill_rank.py KILL_RANK KILL_STEP '{profile kwargs}'

The JSON holds ``out``, ``model`` and ``args`` (a :class:`compressor.args.ProfileArgs` as
:func:`compressor.args.args_to_json` writes it) for :func:`compressor.pipeline.profile`.
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(kill_rank: int, kill_step: int, kwargs: dict) -> None:
    from compressor.args import ProfileArgs, args_from_json
    from compressor.pipeline import profile

    steps = []

    def on_sample(n: int, k: int) -> None:
        steps.append((n, k))
        if int(os.environ["RANK"]) == kill_rank and len(steps) == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    profile(kwargs["out"], kwargs["model"], args_from_json(ProfileArgs, kwargs["args"]), on_sample=on_sample)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]))
