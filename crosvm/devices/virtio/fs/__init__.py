"""Shared directories: the virtio-fs device (FUSE passthrough) and what it shares with
virtio-9p (uid/gid maps, guest name checks)."""
