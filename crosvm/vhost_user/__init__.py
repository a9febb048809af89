"""vhost-user (crosvm's `vmm_vhost` crate): the protocol, and its front-end and back-end
ends. A back-end serves a virtio device's queues in another process, reaching the
guest's memory through the fds the front-end sends."""
