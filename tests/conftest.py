"""Test configuration: fixed seeds and a fast, deterministic hypothesis profile."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One intra-op thread: the tests are dominated by small ops, for which a second thread only adds
# synchronisation (and, on a busy 2-core machine, 20-100x slow-downs from oversubscription).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kill_at_epoch(monkeypatch):
    """``kill_at_epoch(epoch, start)``: run ``start()`` and kill the run (KeyboardInterrupt) as
    0-based ``epoch`` begins; training is normal again afterwards."""
    from mixq.train.trainer import Trainer

    original = Trainer.train_one_epoch

    def kill(epoch: int, start) -> None:
        def killed(self):
            if self.epoch == epoch:
                raise KeyboardInterrupt
            return original(self)

        monkeypatch.setattr(Trainer, "train_one_epoch", killed)
        with pytest.raises(KeyboardInterrupt):
            start()
        monkeypatch.setattr(Trainer, "train_one_epoch", original)

    return kill
