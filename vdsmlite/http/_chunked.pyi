# The C common case of wire.ChunkedDecoder (_chunked.c).

def decode(buffer: memoryview, out: int, pos: int, end: int, state: int,
           remaining: int, /) -> tuple[int, int, int, int]: ...
