# The C accelerator of tarstream's hot loop (_tarscan.c).
import mmap

def scan(buffer: bytes | mmap.mmap, pos: int, n: int, max_member: int,
         declarations: tuple[bytes, ...], /) -> tuple[int, list[int], list[str]]: ...
