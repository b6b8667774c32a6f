"""The one raw HTTP/1.1 client of the load scripts and the fault scenarios."""

from __future__ import annotations

import asyncio


class Connection:
    """One keep-alive HTTP/1.1 connection: a lean client, so that load costs little CPU."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
        self._r = self._w = None

    async def request(self, head: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one request; (status, lower-cased headers, body) of the answer."""
        if self._w is None:
            self._r, self._w = await asyncio.open_connection(self._host, self._port,
                                                             limit=1 << 22)
        assert self._r is not None and self._w is not None
        self._w.writelines((head, body))
        await self._w.drain()
        lines = (await self._r.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:
            content = await self._r.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self._r.readuntil(b"\r\n")).split(b";")[0], 16)
                chunks.append((await self._r.readexactly(size + 2))[:-2])
                if size == 0:
                    break
            content = b"".join(chunks)
        else:  # no length: the body ends with the connection
            content = await self._r.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, content
