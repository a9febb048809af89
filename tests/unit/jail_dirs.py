"""Pivot roots for jail tests, where a root VMM's unprivileged device user can reach them
(pytest's tmp_path is private to its owner)."""

from __future__ import annotations

import os
import tempfile


def reachable_empty_dir() -> str:
    base = tempfile.mkdtemp(prefix="crosvm-jail-test-")
    os.chmod(base, 0o755)
    root = os.path.join(base, "empty")
    os.mkdir(root, 0o755)
    return root
