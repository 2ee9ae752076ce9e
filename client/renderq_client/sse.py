"""Server-Sent Events: a parser that follows the WHATWG rules, and reading a streamed
`requests` response as it arrives.

The parser is incremental: feed it text as the network delivers it and it hands back each
event once its blank line has arrived. It remembers the last event id (what to send as
`Last-Event-ID` when reconnecting) and the server's `retry:` delay.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional

import requests


_LINE_END = re.compile("[\r\n]")


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: Optional[str]


class SseParser:
    def __init__(self) -> None:
        self.last_event_id: Optional[str] = None
        self.retry_ms: Optional[int] = None
        self.comments = 0  # heartbeats (': ping'), counted so a caller can tell the stream is alive
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # text after the last complete line
        self._started = False
        self._after_cr = False
        self._event = ""
        self._data: List[str] = []

    def feed(self, chunk: bytes) -> List[ServerSentEvent]:
        """The events completed by this chunk of the stream, in order."""
        text = self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text[1:] if text.startswith("\ufeff") else text  # a byte-order mark may open the stream
        if self._after_cr and text:
            # The last chunk ended in a CR, taken as the end of a line at once (an event must not
            # wait for the next byte); an LF opening this chunk is the rest of that CRLF.
            text = text[1:] if text.startswith("\n") else text
            self._after_cr = False
        self._pending += text
        events: List[ServerSentEvent] = []
        while True:
            end = _LINE_END.search(self._pending)
            if end is None:
                return events
            line, index = self._pending[:end.start()], end.start()
            if self._pending.startswith("\r\n", index):
                self._pending = self._pending[index + 2:]
            else:
                self._after_cr = self._pending[index] == "\r" and index + 1 == len(self._pending)
                self._pending = self._pending[index + 1:]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> Optional[ServerSentEvent]:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None  # unknown fields are ignored, as the specification says

    def _dispatch(self) -> Optional[ServerSentEvent]:
        if not self._data:  # a block of only id/event lines dispatches nothing
            self._event = ""
            return None
        event = ServerSentEvent(event=self._event or "message", data="\n".join(self._data), id=self.last_event_id)
        self._event, self._data = "", []
        return event


def response_chunks(response: requests.Response, size: int = 65536) -> Iterator[bytes]:
    """The body as it arrives. read1 returns whatever bytes are ready instead of waiting for
    `size` of them, which is what lets a heartbeat or an event through at once; urllib3 1.x has
    no read1, and there a byte at a time is the only way not to sit on a short event."""
    raw = response.raw
    if hasattr(raw, "read1"):
        while True:
            chunk = raw.read1(size, decode_content=True)
            if not chunk:
                return
            yield chunk
    else:
        yield from response.iter_content(chunk_size=1)
