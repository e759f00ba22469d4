"""The path check every catalogue reader applies to the untrusted paths of a label file or a walk."""

import os


class PathGuard:
    """The one check of catalogue paths, used by every reader: a path from a label file (or a
    walk) must name a file inside the data root ``root``. Calling the guard with ``(rel,
    where)`` returns ``rel`` as a normalised posix path, or raises ValueError naming ``where``
    (``file:line``) for an absolute path, a drive letter, a ``..`` part, or a symbolic link
    (a folder on the way or the file itself) whose target lies outside ``root``. Resolved
    folders are cached per guard: one guard per read."""

    def __init__(self, root):
        self.root = os.path.realpath(root)
        self._real_dirs = {}

    def _real_dir(self, rel_dir):
        if rel_dir not in self._real_dirs:
            self._real_dirs[rel_dir] = os.path.realpath(os.path.join(self.root, rel_dir))
        return self._real_dirs[rel_dir]

    def inside(self, real) -> bool:
        """True when the resolved path ``real`` is the root or lies under it."""
        return real == self.root or real.startswith(self.root.rstrip(os.sep) + os.sep)

    def refuse(self, rel, where, why):
        raise ValueError(
            f"{where}: path {rel!r} {why}; catalogue paths must stay inside the data "
            f"root {self.root}: relative, without '..', and without symbolic links "
            "leading out of it. Copy the photos into the data root, or pass the folder "
            "that really holds them as the data root"
        )

    def __call__(self, rel, where) -> str:
        # string operations, not PurePosixPath: this runs once per image (120k on SOP)
        text = str(rel).replace("\\", "/")
        parts = [p for p in text.split("/") if p not in ("", ".")]
        if text.startswith("/") or (len(text) > 1 and text[1] == ":") or ".." in parts or not parts:
            self.refuse(rel, where, "leaves the data root (absolute, or climbs out with '..')")
        real = os.path.join(self._real_dir("/".join(parts[:-1]) or "."), parts[-1])
        if os.path.islink(real):
            real = os.path.realpath(real)
        if not self.inside(real):
            self.refuse(rel, where, f"leaves the data root through a symbolic link (it resolves to {real})")
        return "/".join(parts)
