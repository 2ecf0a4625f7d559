"""Download and safely extract the official CIFAR-10 python tarball."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from mixq.data.cifar10 import (
    CIFAR10_FOLDER,
    OFFICIAL_TARBALL_MD5,
    OFFICIAL_URL,
    TEST_FILE,
    TRAIN_FILES,
    manual_instructions,
)
from mixq.data.errors import DataError

__all__ = ["download_cifar10", "safe_extract_tar"]

_CHUNK = 1 << 20


def _check_member(member: tarfile.TarInfo) -> None:
    """Refuse tar members that could write outside the destination or are not plain."""
    path = PurePosixPath(member.name)
    if (
        member.name.startswith(("/", "\\"))
        or path.is_absolute()
        or ".." in path.parts
        or ":" in (path.parts[0] if path.parts else "")
    ):
        raise DataError(f"unsafe path in tarball: {member.name!r} (absolute or contains '..')")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"unsafe member in tarball: {member.name!r} is a link or special file")


def safe_extract_tar(tar_path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Extract a tarball into ``dest`` after checking every member.

    Only regular files and folders with relative paths free of ``..`` are accepted; the
    tarball is rejected as a whole (nothing written) otherwise.

    Raises:
        DataError: If a member is unsafe or the tarball cannot be read.
    """
    try:
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot extract {tar_path}: {exc}") from exc


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (*TRAIN_FILES, TEST_FILE))


def download_cifar10(
    root: str | os.PathLike[str],
    url: str = OFFICIAL_URL,
    *,
    md5: str | None = OFFICIAL_TARBALL_MD5,
    timeout: float = 60.0,
) -> Path:
    """Download the CIFAR-10 python tarball into ``root`` and extract it there.

    Nothing is done if ``root/cifar-10-batches-py`` is already complete. The tarball is
    streamed to a temporary file in ``root``, its md5 checked, extracted into a temporary
    folder with :func:`safe_extract_tar`, and the result renamed into place, so an
    interrupted download never leaves a half-written dataset folder.

    Args:
        root: Folder that will contain ``cifar-10-batches-py``.
        url: Where to fetch the tarball (``file://`` URLs work too).
        md5: Expected md5 of the tarball; ``None`` skips the check.
        timeout: Socket timeout in seconds.

    Returns:
        The ``cifar-10-batches-py`` folder.

    Raises:
        DataError: On network failure, md5 mismatch or an unsafe/incomplete tarball; the
            message says how to install the files by hand.
    """
    root = Path(root).expanduser()
    dest = root / CIFAR10_FOLDER
    if _complete(dest):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".cifar10-", suffix=".tar.gz.part", dir=root)
    os.close(fd)
    tmp_tar, tmp_dir = Path(tmp_name), None
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=".cifar10-extract-", dir=root))
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with open(tmp_tar, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while chunk := resp.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DataError(
                f"could not download CIFAR-10 from {url}: {exc}. {manual_instructions(root)}"
            ) from exc
        if md5 is not None and digest.hexdigest() != md5:
            raise DataError(
                f"downloaded file from {url} has md5 {digest.hexdigest()}, expected {md5}; "
                f"the download is corrupt. Retry, or {manual_instructions(root)}"
            )
        safe_extract_tar(tmp_tar, tmp_dir)
        extracted = tmp_dir / CIFAR10_FOLDER
        if not _complete(extracted):
            raise DataError(
                f"the tarball from {url} has no complete '{CIFAR10_FOLDER}' folder. "
                f"{manual_instructions(root)}"
            )
        if dest.exists():
            shutil.rmtree(dest)  # incomplete leftover (complete ones returned above)
        os.replace(extracted, dest)
    finally:
        tmp_tar.unlink(missing_ok=True)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return dest
