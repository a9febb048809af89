"""Checks on file names that come from the guest.

A name is one path component to be looked up relative to a held directory fd (with
O_NOFOLLOW): never a path. Anything that could climb or descend more than one level,
or that the kernel would read differently, is refused here.
"""

from __future__ import annotations

import errno

NAME_MAX = 255


def check_name(name: bytes, allow_dots: bool = False) -> bytes:
    """`name` if it is a single, plain component; OSError(EINVAL/ENAMETOOLONG) if not.

    '.' and '..' are refused unless `allow_dots` (9P walks '..', handled by the caller
    so it stops at the share's root)."""
    if not name or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, "bad file name")
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "file name too long")
    if name in (b".", b"..") and not allow_dots:
        raise OSError(errno.EINVAL, "'.' or '..' as a name")
    return name


# The POSIX ACL xattrs (their values hold uids and gids, translated through the maps).
ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")


def guest_may_set_xattr(name: str) -> bool:
    """Whether a guest may set or remove the xattr `name` on a shared file: user.* and
    the POSIX ACLs only. trusted.* and security.* (overlayfs redirects, SELinux labels,
    file capabilities) and other system.* names are the host's: the device may be root."""
    return name.startswith("user.") or name in ACL_XATTRS
