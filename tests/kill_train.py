"""Driver for test_distributed's kill test (not collected by pytest): `borahub` whose main process SIGKILLs
itself right after writing the checkpoint of step K, as a crash or an evicted machine would end a run.

    accelerate launch ... tests/kill_train.py K [borahub arguments]
"""
from __future__ import annotations

import os
import signal
import sys

from hub.cli import main
from models.trainer import Trainer

STOP = int(sys.argv.pop(1))
save = Trainer.save_checkpoint


def save_then_die(self) -> None:
    save(self)
    if self.acc.is_main_process and self.step >= STOP:
        os.kill(os.getpid(), signal.SIGKILL)


Trainer.save_checkpoint = save_then_die
sys.exit(main(sys.argv[1:]))
