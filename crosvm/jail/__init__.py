"""Sandboxing for device processes (crosvm's `jail` crate and minijail)."""

from crosvm.jail.jail import DEFAULT_PIVOT_ROOT, Jail, JailError, ensure_pivot_root, set_name

__all__ = ["DEFAULT_PIVOT_ROOT", "Jail", "JailError", "ensure_pivot_root", "set_name"]
