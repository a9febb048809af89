"""A 9P2000.L file server (crosvm's `p9` crate): the wire codec and the server."""
