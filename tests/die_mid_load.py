"""Run under torchrun: rank 1 is killed (SIGKILL) while reading its first slice; the rest is the CLI."""

import os
import signal

import tp_loader.read
from tp_loader.cli import run

if os.environ.get("RANK") == "1":

    def killed_read(self, item, *args):
        os.kill(os.getpid(), signal.SIGKILL)

    tp_loader.read.MappedSource.read_into = killed_read

run()
