"""Direct I/O: reads that bypass the page cache, writes that reach the disk.

Shared storage is written by other hosts; a read through this host's page
cache can return stale data, so metadata is read with O_DIRECT. Writes that
matter use O_DIRECT and then fsync, so success means the bytes are on the
storage (O_DIRECT alone may still sit in a volatile disk cache).

O_DIRECT wants the buffer, offset and length aligned to the device's logical
block size; buffers come from anonymous mmap (page aligned) and every length
is rounded to `block_size`.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

from vdsmlite import cancel

ALIGN = 4096  # page alignment satisfies both 512 and 4096 byte devices


class DirectIOError(OSError):
    pass


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def aligned_buffer(size: int) -> mmap.mmap:
    return mmap.mmap(-1, _round_up(max(size, 1), ALIGN))


def read(path: str | os.PathLike[str], offset: int, size: int, block_size: int = 512) -> bytes:
    """Read `size` bytes at `offset` (both multiples of block_size) bypassing the cache.

    Reading past the end of a file returns what is there (short read).
    """
    if offset % block_size or size % block_size:
        raise ValueError(f"unaligned direct read: offset={offset} size={size} "
                         f"block={block_size}")
    buf = aligned_buffer(size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        with memoryview(buf) as whole, whole[:size] as view:
            done = 0
            while done < size:
                with view[done:] as rest:
                    n = os.preadv(fd, [rest], offset + done)
                if n == 0:
                    break
                done += n
            return bytes(view[:done])
    finally:
        os.close(fd)
        buf.close()


def read_file(path: str | os.PathLike[str], limit: int = 1 << 20, block_size: int = 512) -> bytes:
    """A whole small file (at most `limit` bytes), read with O_DIRECT."""
    return read(path, 0, _round_up(limit, block_size), block_size)


def write(path: str | os.PathLike[str], offset: int, data: bytes, block_size: int = 512, *,
          create: bool = False) -> None:
    """Write `data` at `offset` with O_DIRECT and fsync; data is zero-padded to a block."""
    if offset % block_size:
        raise ValueError(f"unaligned direct write offset {offset} (block {block_size})")
    size = _round_up(len(data), block_size)
    buf = aligned_buffer(size)
    buf[:len(data)] = data
    flags = os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o660)
    try:
        with memoryview(buf) as whole, whole[:size] as view:
            done = 0
            while done < size:
                with view[done:] as rest:
                    done += os.pwritev(fd, [rest], offset + done)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def zero(path: str | os.PathLike[str], offset: int, size: int, block_size: int = 512, *,
         chunk: int = 8 << 20, progress: Callable[[int, int], None] | None = None) -> None:
    """Overwrite a range with zeros (postZero on delete), fsync at the end.

    Stoppable: `cancel.check()` runs before every chunk, and each chunk is flushed
    (fdatasync) before the next one starts, so once `Cancelled` is raised nothing
    this call wrote is still on its way to the disk. `progress(done, size)` and
    `cancel.report_bytes(done)` are told after each chunk. A short write (the
    kernel may write less than asked) continues where it stopped; a write of 0
    bytes is an error, never a loop.
    """
    if offset % block_size or size % block_size:
        raise ValueError("unaligned zeroing")
    buf = aligned_buffer(min(chunk, size))
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        done = 0
        with memoryview(buf) as whole:
            while done < size:
                cancel.check()
                n = min(len(buf), size - done)
                written = 0
                while written < n:
                    with whole[written:n] as rest:
                        w = os.pwritev(fd, [rest], offset + done + written)
                    if w <= 0:
                        raise DirectIOError(f"zeroing {path}: wrote nothing at "
                                            f"{offset + done + written}")
                    written += w
                os.fdatasync(fd)
                done += n
                cancel.report_bytes(done)
                if progress is not None:
                    progress(done, size)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
