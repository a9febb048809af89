"""Host networking for virtio-net (crosvm's `net_util` crate): TAP devices."""
