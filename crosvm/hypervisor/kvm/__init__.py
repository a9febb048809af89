"""KVM backend: `Kvm` (the /dev/kvm handle), `KvmVm` and `KvmVcpu`."""

from crosvm.hypervisor.kvm.kvm import Kvm, KvmError, KvmVcpu, KvmVm

__all__ = ["Kvm", "KvmError", "KvmVcpu", "KvmVm"]
