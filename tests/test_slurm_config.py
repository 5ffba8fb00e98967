"""The SLURM launcher config produces the sbatch script a preemption-safe sweep needs (no SLURM here:
the script text is built by submitit exactly as it would be submitted)."""

from __future__ import annotations

from omegaconf import OmegaConf

from tests.conftest import compose_config


def _sbatch_text(tmp_path, monkeypatch, overrides=()):
    import submitit
    import submitit.slurm.slurm as slurm

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # pretend srun exists
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_config(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", *overrides], toy=False,
                         return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    params.pop("_target_")
    params.pop("submitit_folder")
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params["name"] = "robustexp"
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m robustexp", "uid")


def test_slurm_launcher_requeues_and_signals_before_the_time_limit(tmp_path, monkeypatch):
    text = _sbatch_text(tmp_path, monkeypatch)
    assert "#SBATCH --partition=gpu" in text
    assert "#SBATCH --requeue" in text
    assert "#SBATCH --signal=USR2@120" in text  # our handler checkpoints on USR2, then submitit requeues
    assert "#SBATCH --time=1440" in text


def test_slurm_launcher_multi_gpu_job_has_one_task_per_gpu(tmp_path, monkeypatch):
    text = _sbatch_text(tmp_path, monkeypatch, ["hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4"])
    assert "#SBATCH --gpus-per-node=4" in text and "#SBATCH --ntasks-per-node=4" in text
    assert "srun" in text  # tasks started by srun: each reads its rank from SLURM_PROCID


def test_submitits_exit_on_usr2_is_reported_with_the_signal_and_the_checkpoint():
    """submitit's USR2 handler requeues the job and calls sys.exit(-1): the run's record and main.log must say
    which signal stopped it and where its checkpoint is, not just "SystemExit: -1"."""
    import signal

    import pytest

    from robustexp.preemption import PreemptionHandler

    def submitit_like(signum, frame):  # what submitit's checkpoint_and_try_requeue ends with
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    handler = PreemptionHandler(["SIGUSR2"]).install()
    try:
        handler.received = signal.SIGUSR2
        with pytest.raises(SystemExit) as stopped:
            handler.hand_over("/runs/r/checkpoints/last.pt")
    finally:
        handler.uninstall()
        signal.signal(signal.SIGUSR2, previous)
    assert str(stopped.value) == ("robustexp: stopped by SIGUSR2 after writing /runs/r/checkpoints/last.pt; "
                                  "submitit requeued the job")
