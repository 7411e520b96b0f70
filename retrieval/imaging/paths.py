"""Turn a stored image reference into a file path: the one resolver every reader uses.

Why one: an image reference comes from a manifest a user wrote, or from an index payload that a
server reads on behalf of a remote client. The second must never reach outside the index's image
root (a crafted payload or symlink must not turn ``/api/cases/.../images/0`` into a file
reader for the whole disk); having the check in one function means no reader can forget it.
"""

from __future__ import annotations

from pathlib import Path


class ImagePathError(ValueError):
    """A stored image reference that leaves the folder it must stay in."""


def resolve_image(ref: str, root: str | Path | None, *, confine: bool = True) -> Path:
    """The path of image ``ref``, relative to ``root`` unless absolute.

    Args:
        ref: the stored reference (manifest entry or payload ``image``).
        root: the folder relative references resolve against (a manifest's folder, an index's
            image root); None: the current directory.
        confine: refuse a relative reference whose resolved path (symlinks followed) leaves
            ``root``. Readers serving remote clients keep it on; a manifest, which a user wrote
            and may point at ``../images``, turns it off.

    Raises:
        ImagePathError: ``confine`` is on and the reference escapes ``root``.
    """
    p = Path(ref)
    if p.is_absolute():
        return p
    base = Path(root).resolve() if root is not None else Path.cwd()
    full = (base / p).resolve() if confine else base / p
    if confine and base != full and base not in full.parents:
        raise ImagePathError(f"image reference {ref!r} leaves its root folder")
    return full


def manifest_image(manifest: str | Path, ref: str) -> Path:
    """An image named in a manifest: relative entries resolve against the manifest's folder."""
    return resolve_image(ref, Path(manifest).resolve().parent, confine=False)
