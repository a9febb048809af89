"""Hypervisor abstraction (crosvm's `hypervisor` crate); KVM is the only backend."""
