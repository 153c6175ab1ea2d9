"""System shared memory for requests (`--shared-memory system`).

`ShmSlots`: one input and one output region per request slot, registered lazily with each
server and again after it restarts. A slot whose request got an answer from the server
(descriptors, or any error the server sent: a rejected image, a DALI batch error, a full
queue) is released for reuse. Only a request that ended without an answer (timeout, lost
connection, cancellation) retires its slot: the server may still read or write its
regions, so they are never reused. `remove_stale_regions` cleans up after killed runs.
"""
from __future__ import annotations

import asyncio
import os
import random
import re
from typing import Any

from tritonclient.utils import InferenceServerException

from sscd_triton.client.endpoints import Endpoint
from sscd_triton.client.errors import RESTRICTED, RETRY, Fatal, classify, clean_message, restricted
from sscd_triton.files import writer_alive

SHM_PREFIX = "sscd_embed_"
_REGION = re.compile(re.escape(SHM_PREFIX) + r"(\d+)_[0-9a-f]{6}_\d+_\d+_(?:in|out)")


def remove_stale_regions(folder: str = "/dev/shm") -> list[str]:
    """Remove regions that a killed embed.py left behind: names of this tool's pattern
    whose process (the pid in the name) no longer exists. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _REGION.fullmatch(name)
        if not m:
            continue
        if writer_alive(int(m.group(1))):
            continue  # in use
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.gen = 0
        self.regions: dict[str, tuple[str, Any, int]] = {}  # "in"/"out" -> (name, handle, size)
        self.registered: set[str] = set()  # urls holding the current regions


class ShmSlots:
    """Request slots with system shared-memory regions (inputs and outputs).

    Regions grow (to a power of two) when a request needs more; a grown region is a new
    one, registered again. Only for servers on this host: they map the same /dev/shm.
    """

    def __init__(self, count: int, prefix: str | None = None, headers: dict | None = None):
        from tritonclient.utils import shared_memory as shm

        self.headers = headers

        self.shm = shm
        if prefix is None:
            remove_stale_regions()
            prefix = f"{SHM_PREFIX}{os.getpid()}_{random.getrandbits(24):06x}"
        self.prefix = prefix
        self._free: asyncio.Queue = asyncio.Queue()
        self._slots = [_Slot(i) for i in range(count)]
        self._retired: list[tuple[str, set[str]]] = []  # (region name, urls holding it)
        for s in self._slots:
            self._free.put_nowait(s)

    async def acquire(self) -> _Slot:
        return await self._free.get()

    def release(self, slot: _Slot) -> None:
        self._free.put_nowait(slot)

    def retire(self, slot: _Slot) -> None:
        """Never reuse `slot`'s regions: its request ended without a clean answer (timeout,
        lost connection, cancellation), so a server may still read the input or write the
        output there, into the next request's data. Our mappings are destroyed (the names
        unlinked; a server's own mapping stays valid until it unregisters), the names are
        unregistered at `close`, and a fresh slot with new names takes its place."""
        for name, handle, _ in slot.regions.values():
            if slot.registered:
                self._retired.append((name, set(slot.registered)))
            try:
                self.shm.destroy_shared_memory_region(handle)
            except Exception:
                pass
        fresh = _Slot(slot.index)
        fresh.gen = slot.gen  # `prepare` counts on: the new regions get new names
        self._slots[slot.index] = fresh
        self._free.put_nowait(fresh)

    def forget(self, url: str) -> None:
        """The server at `url` lost its registrations (restart): register again on use."""
        for s in self._slots:
            s.registered.discard(url)

    async def _unregister_everywhere(self, slot: _Slot, endpoints: list[Endpoint]) -> None:
        for ep in endpoints:
            if ep.url in slot.registered:
                for name, _, _ in slot.regions.values():
                    try:
                        await ep.client.unregister_system_shared_memory(name, headers=self.headers)
                    except Exception:
                        pass
        slot.registered.clear()

    async def prepare(self, slot: _Slot, ep: Endpoint, endpoints: list[Endpoint],
                      in_bytes: int, out_bytes: int) -> None:
        """Make the slot's regions big enough and registered with `ep`'s server."""
        need = {"in": in_bytes, "out": out_bytes}
        if any(k not in slot.regions or slot.regions[k][2] < n for k, n in need.items()):
            await self._unregister_everywhere(slot, endpoints)
            for _, handle, _ in slot.regions.values():
                self.shm.destroy_shared_memory_region(handle)
            slot.gen += 1
            slot.regions = {}
            for kind, n in need.items():
                size = max(1 << 16, 1 << (max(n, 1) - 1).bit_length())
                name = f"{self.prefix}_{slot.index}_{slot.gen}_{kind}"
                handle = self.shm.create_shared_memory_region(name, "/" + name, size)
                slot.regions[kind] = (name, handle, size)
        if ep.url not in slot.registered:
            for name, _, size in slot.regions.values():
                try:
                    await ep.client.unregister_system_shared_memory(name, headers=self.headers)
                except Exception:
                    pass
                try:
                    await ep.client.register_system_shared_memory(name, "/" + name, size,
                                                                   headers=self.headers)
                except InferenceServerException as e:
                    if classify(e) == RETRY:
                        raise
                    if classify(e) == RESTRICTED:
                        raise restricted(ep.url, e) from None
                    raise Fatal(f"--shared-memory system: the server at {ep.url} cannot map "
                                f"/dev/shm/{name} ({clean_message(e)}); shared memory only "
                                "works with a server on this host") from None
            slot.registered.add(ep.url)

    async def close(self, endpoints: list[Endpoint]) -> None:
        for name, urls in self._retired:
            for ep in endpoints:
                if ep.url in urls:
                    try:
                        await asyncio.wait_for(ep.client.unregister_system_shared_memory(
                            name, headers=self.headers), 5)
                    except (Exception, asyncio.TimeoutError):
                        pass
        self._retired = []
        for slot in self._slots:
            try:
                await asyncio.wait_for(self._unregister_everywhere(slot, endpoints), 5)
            except (Exception, asyncio.TimeoutError):
                pass
            for _, handle, _ in slot.regions.values():
                try:
                    self.shm.destroy_shared_memory_region(handle)
                except Exception:
                    pass
            slot.regions = {}
