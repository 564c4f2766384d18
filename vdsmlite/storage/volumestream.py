"""Volume streams: any volume's bytes to or from a stream of chunks (async).

The two operations every door that moves image data needs, whatever the
volume holds: `write` takes an async stream into a volume with O_DIRECT
(`streamio.DirectWriter`), `read` yields a volume's first bytes read back
with O_DIRECT. Each prepares the volume for the transfer and tears it down
after, also when the transfer fails or its consumer goes away.

Like ovirt-imageio's ops, they know nothing of what the bytes mean or who
asked: callers pass `inspect` (sees every byte in order, e.g. an archive
validator), `before_buffer` (e.g. "is the lease still ours?") and `progress`
(bytes done so far) and translate errors into their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from vdsmlite.blocking import RunBlocking
from vdsmlite.storage import streamio
from vdsmlite.storage.sd import Domain, OpenVolume, VolumeState

Progress = Callable[[int], None]


@contextlib.asynccontextmanager
async def opened(dom: Domain, img_uuid: str, vol_uuid: str, run_blocking: RunBlocking,
                 state: VolumeState | None = None) -> AsyncIterator[OpenVolume]:
    """`Domain.opened` for async callers: prepare and teardown run in the executor.
    `state`: the volume as the caller just read it (see `Domain.prepare_read_volume`)."""
    if state is not None:
        path = await run_blocking(dom.prepare_read_volume, state)
    else:
        path = await run_blocking(dom.prepare_volume, img_uuid, vol_uuid)
    try:
        block_size, _ = await run_blocking(dom.geometry)
        yield OpenVolume(path, block_size)
    finally:
        await run_blocking(dom.teardown_volume, img_uuid, vol_uuid)



@dataclass
class Held:
    """A volume prepared under its caller's locks for work that runs after them (an
    upload's index job): it stays prepared until `release`, however many times that
    is called. Preparing it while the caller still holds its own preparation costs
    nothing on a block domain: no ``lvs``, the same loop device (counted)."""

    dom: Domain
    img_uuid: str
    vol_uuid: str
    volume: OpenVolume
    released: bool = False

    async def release(self, run_blocking: RunBlocking) -> None:
        if not self.released:
            self.released = True
            await run_blocking(self.dom.teardown_volume, self.img_uuid, self.vol_uuid)


async def hold(dom: Domain, state: VolumeState, run_blocking: RunBlocking) -> Held:
    """Prepare the volume the caller just read as `state`, under its locks (see
    `Domain.prepare_read_volume`), for work that releases it later."""
    path = await run_blocking(dom.prepare_read_volume, state)
    try:
        block_size, _ = await run_blocking(dom.geometry)
    except BaseException:
        await run_blocking(dom.teardown_volume, state.image, state.uuid)
        raise
    return Held(dom, state.image, state.uuid, OpenVolume(path, block_size))

async def write(dom: Domain, img_uuid: str, vol_uuid: str, body: streamio.Source, *,
                capacity: int, run_blocking: RunBlocking,
                inspect: streamio.Inspect | None = None,
                before_buffer: Callable[[], None] | None = None,
                progress: Progress | None = None,
                timings: streamio.Timings | None = None,
                state: VolumeState | None = None) -> int:
    """Write `body` from offset 0; returns its length once it is durable.

    Raises `streamio.CapacityExceeded` past `capacity` bytes; whatever `inspect`
    or `before_buffer` (before each buffer of `streamio.DEFAULT_BUFFER` bytes)
    raise stops the transfer; `timings` is filled with where the time went;
    `state` is the volume as the caller just read it, if it did. A
    failed transfer leaves a partial write behind: callers that need
    all-or-nothing mark the volume first.
    """
    async with opened(dom, img_uuid, vol_uuid, run_blocking, state) as volume:
        writer = streamio.DirectWriter(str(volume.path), capacity, volume.block_size,
                                       run_blocking, inspect=inspect)
        if timings is not None:
            writer.timings = timings  # the caller reads them, also after a failure
        await writer.open()
        try:
            await writer.receive(body, before_buffer=before_buffer, progress=progress)
            return await writer.finish()
        except BaseException:
            await writer.abort()
            raise


async def read(dom: Domain, img_uuid: str, vol_uuid: str, length: int, *,
               run_blocking: RunBlocking,
               progress: Progress | None = None) -> AsyncIterator[bytes]:
    """The first `length` bytes of the volume, in chunks, read with O_DIRECT."""
    async with opened(dom, img_uuid, vol_uuid, run_blocking) as volume:
        chunks = streamio.read_chunks(str(volume.path), length, volume.block_size)
        done = 0
        try:
            while True:
                chunk = await run_blocking(next, chunks, None)
                if chunk is None:
                    break
                done += len(chunk)
                if progress is not None:
                    progress(done)
                yield chunk
        finally:
            await run_blocking(chunks.close)
