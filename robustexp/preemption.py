"""Checkpoint on a preemption or time-limit signal, then hand over to whoever requeues the job.

During evaluation (``immediate``) the handler raises at once: the runner has saved every finished
evaluation in ``metrics.json``, and a rerun computes only the missing ones.

SLURM sends SIGTERM when it preempts a job and, with ``--signal=USR1@120`` (or submitit's
``USR2``), a user signal before the time limit. The handler only records the signal; the trainer
polls it after every optimizer step, writes a mid-epoch checkpoint, and then calls
:meth:`PreemptionHandler.hand_over`:

* if another handler was installed before ours (submitit's, which requeues the job and exits on
  its USR2 and only logs a SIGTERM), that handler is called, then the process exits with a
  ``SystemExit`` naming the signal and the checkpoint (submitit's own ``sys.exit(-1)`` is replaced by
  it; submitit records no result for the attempt; SLURM requeues a preempted job);
* otherwise, under SLURM with ``requeue=True``, the job is requeued with ``scontrol requeue``;
* then :class:`Preempted` is raised: the run is marked ``preempted`` and the process exits. The
  same command (or the requeued job) resumes from the checkpoint, to the same result.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterable

from robustexp.errors import RobustexpError

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


def _other_rank_of_a_group() -> bool:
    from robustexp import distributed

    return distributed.world()[0] > 0


class Preempted(RobustexpError):
    """The run stopped on a signal after writing a checkpoint."""


class PreemptionHandler:
    def __init__(self, signals: Iterable[str] = DEFAULT_SIGNALS, requeue: bool = True):
        self.signals = [getattr(signal, name) for name in signals]
        self.requeue = requeue
        self.received: int | None = None
        self.immediate = False  # after training: stop at once (evaluations done so far are kept)
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        self.received = signum
        if self.immediate:  # evaluating: nothing to checkpoint, the finished evaluations are in metrics.json
            requeued = self._call_previous(signum, frame)
            if requeued is not None:  # submitit: requeues and exits on its USR2, only logs a SIGTERM
                raise SystemExit(f"robustexp: stopped by {signal.Signals(signum).name} during evaluation"
                                 f"{'; submitit requeued the job' if requeued else ''} (finished evaluations are "
                                 "kept; the requeued job resumes)")
            raise Preempted(f"stopped by {signal.Signals(signum).name} during evaluation; rerun the same command "
                            "to resume (finished evaluations are kept)")

    def _call_previous(self, signum: int, frame) -> bool | None:
        """Call the handler installed before ours, if any (None: there was none). True when it exited:
        submitit's USR2 handler requeues the job and then calls ``sys.exit(-1)``, whose bare ``-1`` would
        be all that the run's record and log say; the caller raises a SystemExit that tells the story."""
        previous = self._previous.get(signum)
        if not callable(previous):
            return None
        try:
            previous(signum, frame)
        except SystemExit:
            return True
        return False

    @property
    def requested(self) -> bool:
        return self.received is not None

    def hand_over(self, checkpoint: str) -> None:
        """Called after the checkpoint is written; does not return."""
        signum, self.received = self.received, None
        name = signal.Signals(signum).name if signum is not None else "a signal"
        # submitit's handler, if installed: requeues the job and exits on rank 0 (USR2); only logs a SIGTERM
        requeued = self._call_previous(signum, None)
        if requeued is not None:
            # SLURM sends SIGTERM when it ends the job (preemption, `scontrol requeue`, scancel, the time
            # limit) and requeues it itself where it will; training on would only end in its SIGKILL. Stop
            # now, with SystemExit rather than an error, so that submitit records no result for this attempt
            # (the requeued job's result is the job's); ranks > 0 (submitit does nothing there) stop too.
            raise SystemExit(f"robustexp: stopped by {name} after writing {checkpoint}"
                             f"{'; submitit requeued the job' if requeued else ''}")
        if self.requeue and os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_PROCID", "0")) == 0:
            job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
            task = os.environ.get("SLURM_ARRAY_TASK_ID")
            subprocess.run(["scontrol", "requeue", f"{job}_{task}" if task else job], check=False)
        raise Preempted(f"stopped by {name} after writing {checkpoint}; rerun the same command to resume from it")
