"""`python -m tests.support.probe_vmm run ...`: crosvm's CLI with the test-only sandbox
probe device added to the VM. The shipped `crosvm` command has no way to add it."""

from __future__ import annotations

import functools
import sys

import crosvm.vmm.run as vmm_run
from crosvm.cli.main import main
from tests.support.sandbox_probe import SandboxProbe

if __name__ == "__main__":
    vmm_run.run_config = functools.partial(vmm_run.run_config,
                                           extra_pci_devices=[SandboxProbe()])
    sys.exit(main())
