"""Run under torchrun: rank 1 is killed (SIGKILL) while reading its first slice; the rest is the CLI."""

import os
import signal

import tp_loader.read
from tp_loader.cli import run

if os.environ.get("RANK") == "1":

    def killed_view(self, item):
        os.kill(os.getpid(), signal.SIGKILL)

    tp_loader.read.MappedSource.slice = killed_view

run()
