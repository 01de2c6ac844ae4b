"""A TCP relay on loopback that delays every byte by a fixed time in each direction: a long
link (a round trip of twice the delay) without ``netem``, which these machines' kernels lack.

    python3 testbed/delay_link.py --to 127.0.0.1:2222 --delay-ms 50 [--listen-port 0]

prints ``listening 127.0.0.1:PORT`` once ready and serves until SIGTERM/SIGINT. Each chunk read
from one side is written to the other ``delay`` seconds after it arrived, in order; bandwidth is
not limited and nothing is dropped, so what limits a transfer through it is how much the two
ends keep in flight per round trip (the SSH window, the SFTP requests outstanding), as on a real
long link. Stdlib only (asyncio); used by the benchmark's WAN item and its test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections import deque

CHUNK = 256 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk released ``delay`` seconds after it was read."""
    loop = asyncio.get_running_loop()
    pending: deque[tuple[float, bytes]] = deque()
    arrived = asyncio.Event()
    done = False

    async def release() -> None:
        while True:
            while not pending:
                if done:
                    return
                arrived.clear()
                await arrived.wait()
            due, data = pending[0]
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            pending.popleft()
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(release())
    try:
        while data := await reader.read(CHUNK):
            pending.append((loop.time() + delay, data))
            arrived.set()
    except ConnectionError:
        pass
    finally:
        done = True
        arrived.set()
        with contextlib.suppress(ConnectionError):
            await sender
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()


class DelayLink:
    """``DelayLink(target_host, target_port, delay_seconds)``; ``await start()`` gives the port."""

    def __init__(self, host: str, port: int, delay: float, listen_port: int = 0) -> None:
        self.target = (host, port)
        self.delay = delay
        self.listen_port = listen_port
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.listen_port)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.close()
            return
        try:
            await asyncio.gather(
                _pump(c_reader, s_writer, self.delay), _pump(s_reader, c_writer, self.delay)
            )
        except asyncio.CancelledError:  # the relay is stopping: drop the connection quietly
            pass
        finally:
            for w in (s_writer, c_writer):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()


async def _main(args: argparse.Namespace) -> None:
    host, _, port = args.to.rpartition(":")
    link = DelayLink(host or "127.0.0.1", int(port), args.delay_ms / 1000, args.listen_port)
    bound = await link.start()
    print(f"listening 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    parser.add_argument("--listen-port", type=int, default=0, help="default: a free port")
    asyncio.run(_main(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
