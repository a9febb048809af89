"""Assembling and running a VM from a Config (crosvm's src/crosvm/sys/linux)."""
