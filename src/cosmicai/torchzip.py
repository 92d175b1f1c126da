"""Bounded reading of torch zip files (``torch.save`` since 1.6): what a checkpoint or a legacy partition
declares is checked before anything in it is inflated.

The zip's central directory says how many bytes every member inflates to: their total must stay within a
limit the caller derives from what the file can hold, and members are inflated a chunk at a time, never past
their declared size (zipfile stops there and checks the CRC), whatever their compressed streams hold.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable

from .errors import CaiError

READ_CHUNK = 1 << 20


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo | str) -> bytes:
    """One member's bytes, inflated a chunk at a time so that memory never exceeds its declared size."""
    out = bytearray()
    with zf.open(info) as fh:
        while chunk := fh.read(READ_CHUNK):
            out += chunk
    return bytes(out)


def check_zip_sizes(data: bytes, source: str, limit: int, what: str,
                    error: Callable[[str], CaiError] = CaiError,
                    damaged: str = "a damaged or truncated torch checkpoint") -> zipfile.ZipFile:
    """The open archive, once its members declare at most ``limit`` inflated bytes in all (``what`` says what
    the limit allows); otherwise ``error(message)``, one line naming ``source``, raised before anything is
    inflated. An unreadable archive's message starts with ``damaged``."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise error(f"{source}: {damaged} (its zip archive cannot be read: {exc}); the copy is incomplete or "
                    f"corrupt: fetch it again") from None
    declared = sum(i.file_size for i in infos)
    if declared > limit:
        raise error(f"{source}: its zip entries inflate to {declared:,} bytes from a {len(data):,}-byte file, more "
                    f"than {what} ({limit:,} bytes); refused before inflating anything")
    return zf
