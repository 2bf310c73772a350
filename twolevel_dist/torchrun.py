"""``python -m twolevel_dist.torchrun``: torchrun (the same arguments), without its failure
report where the job ended on purpose and said why itself.

torchrun reports any worker's non-zero exit as a failure: a ChildFailedError table and its
traceback, or, where a refusing worker ended the agent so that it would not restart it
(``engine.ending``), the agent's SignalException traceback. For a refusal (exit 2), a stop
(75) or an interruption before training (130) that is thirty lines of noise above the line that
says why, which our launchers (``launch/torchrun.sh``, ``launch/slurm.sbatch``) read from the
exit file and print last. Any other end (a crash, a rank killed, a peer lost: exit 3) keeps
torchrun's whole report: which rank failed first, with what exit code or signal."""

import sys

from torch.distributed.run import main as torchrun_main

from twolevel_dist.engine.ending import reported

ON_PURPOSE = (2, 75, 130)


def main() -> None:
    try:
        torchrun_main()
    except Exception:           # ChildFailedError, SignalException
        if reported()[0] in ON_PURPOSE:
            sys.exit(1)         # what torchrun exits with; the launcher exits with the job's code
        raise


if __name__ == "__main__":
    main()
