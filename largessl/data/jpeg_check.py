"""The one verdict both input paths act on: may a sample's image be trained on? Reached in the DataLoader worker
before any pixel is decoded or allocated, so `data.decode=cpu` and `data.decode=gpu` skip and count the same
samples (docs/design-notes.md, "Corrupt images").

The image is the sample's `.jpg` (or `.jpeg`) member, as shard-format.md says. It is refused, with a reason, when:
- its header claims more pixels than Pillow's `MAX_IMAGE_PIXELS` (89,478,485 unless changed). Pillow only warns
  between 1x and 2x that limit; here the warning band is refused too, since the device stage would allocate the
  whole image from the header, whatever the file's size;
- it is not a JPEG both decoders take: 8-bit Huffman-coded baseline, extended or progressive, one or three
  components (CMYK, arithmetic, lossless and hierarchical JPEGs are refused);
- its structure is broken anywhere: marker segments that run past the end, bad frame, scan, Huffman or
  quantisation headers (what libjpeg stops on), a scan using a table not defined before it, entropy-coded data
  holding a marker that cannot be there or restart markers out of order, no end-of-image marker, or more than
  `TRAILING` bytes after it;
- Pillow cannot read its header.
The walk reads every byte once (the entropy-coded data by one regular-expression search per marker), so it costs
a fraction of the Huffman decoding that a full or draft-mode decode would do.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

JPEG_EXTENSIONS = ("jpg", "jpeg")
DEFAULT_PIXEL_LIMIT = 89_478_485  # Pillow's MAX_IMAGE_PIXELS; used where a program set that to None
MAX_DIMENSION = 65_500  # libjpeg's JPEG_MAX_DIMENSION
MAX_BLOCKS_IN_MCU = 10  # libjpeg's D_MAX_BLOCKS_IN_MCU
TRAILING = 64  # bytes allowed after the end-of-image marker
FRAMES = {0xC0: False, 0xC1: False, 0xC2: True}  # Huffman-coded frame markers -> progressive
SOI, EOI, SOS, DHT, DQT, DRI = 0xD8, 0xD9, 0xDA, 0xC4, 0xDB, 0xDD
SKIPPED = frozenset([*range(0xE0, 0xF0), 0xFE])  # APPn and COM segments: read past
OTHER_CODING = frozenset([0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF, 0xDE, 0xDF])  # DAC too
MARKER = re.compile(rb"\xff[^\x00\xff]")  # in entropy-coded data: the last FF before a code (00 stuffs a data FF)


class Refused(Exception):
    """Why an image is not trained on; the message is the reason reported."""


def pixel_limit() -> int:
    """Pillow's MAX_IMAGE_PIXELS, read when checking (a program may change it), or its default where unset."""
    return Image.MAX_IMAGE_PIXELS or DEFAULT_PIXEL_LIMIT


def u16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at: at + 2], "big")


@dataclass
class Frame:
    """A frame header: the size, whether progressive, and each component's (h, v, quantisation table)."""

    width: int
    height: int
    progressive: bool
    components: dict[int, tuple[int, int, int]]


def check_size(width: int, height: int) -> None:
    """Refuses a size before anything is allocated for it."""
    if width * height > pixel_limit():
        raise Refused(f"too many pixels: the header claims {width} x {height} = {width * height:,}, over the limit "
                      f"of {pixel_limit():,} (Pillow's MAX_IMAGE_PIXELS)")
    if width == 0 or height == 0 or max(width, height) > MAX_DIMENSION:
        raise Refused(f"corrupt frame header: the header claims {width} x {height} pixels")


def parse_frame(body: bytes, progressive: bool) -> Frame:
    """The frame header (SOFn) of an 8-bit, one- or three-component JPEG; the size is checked first."""
    if len(body) < 6:
        raise Refused("corrupt frame header")
    precision, height, width, count = body[0], u16(body, 1), u16(body, 3), body[5]
    check_size(width, height)
    if precision != 8:
        raise Refused(f"unsupported JPEG: {precision}-bit samples")
    if count not in (1, 3):
        raise Refused(f"unsupported JPEG: {count} colour components (greyscale and RGB/YCbCr only)")
    if len(body) != 6 + 3 * count:
        raise Refused("corrupt frame header")
    components = {body[at]: (body[at + 1] >> 4, body[at + 1] & 15, body[at + 2]) for at in range(6, len(body), 3)}
    check_components(components, count)
    return Frame(width, height, progressive, components)


def check_components(components: dict[int, tuple[int, int, int]], count: int) -> None:
    """Distinct ids, sampling factors 1-4 that divide the largest (libjpeg decodes no fractional upsampling)."""
    if len(components) != count:
        raise Refused("corrupt frame header: a component id appears twice")
    if any(not (1 <= h <= 4 and 1 <= v <= 4 and table <= 3) for h, v, table in components.values()):
        raise Refused("corrupt frame header: sampling factors or quantisation table out of range")
    max_h = max(h for h, _, _ in components.values())
    max_v = max(v for _, v, _ in components.values())
    if any(max_h % h or max_v % v for h, v, _ in components.values()):
        raise Refused("unsupported JPEG: fractional chroma sampling")


def code_lengths_fit(counts: bytes) -> bool:
    """Whether codes of these lengths (1-16 bits) exist without an all-ones code (libjpeg's table check)."""
    code = 0
    for length, count in enumerate(counts, 1):
        code += count
        if count and code >= 1 << length:
            return False
        code <<= 1
    return True


def parse_huffman(body: bytes) -> set[tuple[int, int]]:
    """The (class, id) of each Huffman table a DHT segment defines (class 0: DC, 1: AC)."""
    tables, at = set(), 0
    while at < len(body):
        kind, ident, counts = body[at] >> 4, body[at] & 15, body[at + 1: at + 17]
        symbols = body[at + 17: at + 17 + sum(counts)]
        if (len(counts) < 16 or len(symbols) != sum(counts) or kind > 1 or ident > 3 or sum(counts) > 256
                or not code_lengths_fit(counts) or (kind == 0 and max(symbols, default=0) > 15)):
            raise Refused("corrupt Huffman table")
        tables.add((kind, ident))
        at += 17 + len(symbols)
    return tables


def parse_quant(body: bytes) -> set[int]:
    """The ids of the quantisation tables a DQT segment defines."""
    tables, at = set(), 0
    while at < len(body):
        precision, ident = body[at] >> 4, body[at] & 15
        if precision > 1 or ident > 3 or at + 1 + 64 * (precision + 1) > len(body):
            raise Refused("corrupt quantisation table")
        tables.add(ident)
        at += 1 + 64 * (precision + 1)
    return tables


def parse_restart(body: bytes) -> int:
    """The restart interval a DRI segment sets (0: none)."""
    if len(body) != 2:
        raise Refused("corrupt restart interval")
    return u16(body, 0)


def check_progression(frame: Frame, count: int, ss: int, se: int, ah: int, al: int) -> None:
    """A scan's spectral band and bit positions: the whole band at full precision in a sequential JPEG, what
    libjpeg accepts in a progressive one (DC alone and interleavable, AC bands of one component)."""
    if not frame.progressive:
        ok = ss == 0 and se == 63 and ah == 0 and al == 0
    else:
        band = se == 0 if ss == 0 else (ss <= se <= 63 and count == 1)
        ok = band and al <= 13 and (ah == 0 or al == ah - 1)
    if not ok:
        raise Refused(f"corrupt scan header: band {ss}-{se}, bits {ah}/{al}")


@dataclass
class Walk:
    """Reads a JPEG marker by marker, remembering the frame and the tables defined so far."""

    data: bytes
    pos: int = 2
    frame: Frame | None = None
    quant: set[int] = field(default_factory=set)
    huffman: set[tuple[int, int]] = field(default_factory=set)
    restart: int = 0
    scans: int = 0

    def marker(self) -> int:
        """The code of the marker at the read position (after fill bytes); anything else there is corrupt."""
        data, pos = self.data, self.pos
        if pos < len(data) and data[pos] != 0xFF:
            raise Refused(f"corrupt: no marker at byte {pos}")
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1
        if pos >= len(data):
            raise Refused("truncated: no end-of-image marker")
        self.pos = pos + 1
        return data[pos]

    def body(self) -> bytes:
        """The body of the marker segment at the read position, which moves past it."""
        length = u16(self.data, self.pos)
        if self.pos + max(length, 2) > len(self.data):
            raise Refused(f"truncated inside a marker segment at byte {self.pos}")
        if length < 2:
            raise Refused(f"corrupt marker segment length at byte {self.pos}")
        self.pos += length
        return self.data[self.pos - length + 2: self.pos]

    def segment(self, code: int) -> None:
        """Reads one marker segment (a scan with its entropy-coded data)."""
        if code == SOS:
            self.scan()
        elif code in FRAMES:
            if self.frame is not None:
                raise Refused("corrupt: a second frame header")
            self.frame = parse_frame(self.body(), FRAMES[code])
        elif code == DHT:
            self.huffman |= parse_huffman(self.body())
        elif code == DQT:
            self.quant |= parse_quant(self.body())
        elif code == DRI:
            self.restart = parse_restart(self.body())
        elif code in SKIPPED:
            self.body()
        else:
            raise Refused(unexpected(code))

    def scan(self) -> None:
        """A scan header, checked against the frame and the tables, then its entropy-coded data."""
        header = self.body()
        if self.frame is None:
            raise Refused("corrupt: scan data before the frame header")
        count = header[0] if header else 0
        if not 1 <= count <= 4 or len(header) != 4 + 2 * count:
            raise Refused("corrupt scan header")
        ss, se, ah, al = header[-3], header[-2], header[-1] >> 4, header[-1] & 15
        check_progression(self.frame, count, ss, se, ah, al)
        selectors = {header[at]: header[at + 1] for at in range(1, 1 + 2 * count, 2)}
        if len(selectors) != count or any(ident not in self.frame.components for ident in selectors):
            raise Refused("corrupt scan header: unknown or repeated component")
        self.check_tables(self.frame, selectors, dc=not self.frame.progressive or (ss == 0 and ah == 0),
                          ac=not self.frame.progressive or ss > 0)
        self.entropy_coded()
        self.scans += 1

    def check_tables(self, frame: Frame, selectors: dict[int, int], *, dc: bool, ac: bool) -> None:
        """The tables the scan decodes with were defined before it, and its MCU fits libjpeg's."""
        for ident, tables in selectors.items():
            if (dc and (0, tables >> 4) not in self.huffman) or (ac and (1, tables & 15) not in self.huffman):
                raise Refused("corrupt: a scan uses a Huffman table that is not defined")
            if frame.components[ident][2] not in self.quant:
                raise Refused("corrupt: a scan uses a quantisation table that is not defined")
        blocks = sum(frame.components[ident][0] * frame.components[ident][1] for ident in selectors)
        if len(selectors) > 1 and blocks > MAX_BLOCKS_IN_MCU:
            raise Refused("unsupported JPEG: more than 10 blocks per MCU")

    def entropy_coded(self) -> None:
        """Past a scan's entropy-coded data, to the marker that ends it: restart markers must come in order."""
        start, expected = self.pos, 0
        while (found := MARKER.search(self.data, self.pos)) is not None:
            code = self.data[found.start() + 1]
            if not 0xD0 <= code <= 0xD7:
                if found.start() == start:
                    raise Refused("corrupt: a scan without data")
                self.pos = found.start()
                return
            if not self.restart or code != 0xD0 + expected:
                raise Refused("corrupt scan data: restart markers out of order")
            expected, self.pos = (expected + 1) % 8, found.end()
        raise Refused("truncated: the scan data has no end")


def unexpected(code: int) -> str:
    if code in OTHER_CODING:
        return "unsupported JPEG: arithmetic, lossless or hierarchical coding"
    if 0xD0 <= code <= 0xD7 or code == SOI:
        return f"corrupt: marker 0xFF{code:02X} out of place"
    return f"corrupt: unknown marker 0xFF{code:02X}"


def check_structure(data: bytes) -> Frame:
    """The frame of a JPEG whose every marker segment and scan is well formed, else Refused (docstring above)."""
    if data[:2] != b"\xff\xd8":
        raise Refused("not a JPEG")
    walk = Walk(data)
    while (code := walk.marker()) != EOI:
        walk.segment(code)
    if walk.frame is None or walk.scans == 0:
        raise Refused("corrupt: no image data before the end-of-image marker")
    if len(data) - walk.pos > TRAILING:
        raise Refused(f"corrupt: {len(data) - walk.pos:,} bytes after the end-of-image marker")
    return walk.frame


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def pillow_header(data: bytes) -> tuple[int, int]:
    """(width, height) as Pillow reads the header (the size the crop boxes are drawn for)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                return image.size
    except Exception as exc:  # Pillow raises many types on hostile headers; one sample must never stop a run
        raise Refused(f"Pillow cannot read its header: {first_line(exc)}") from None
    raise Refused("Pillow reads it as another format or colour mode")


def checked_jpeg(sample: dict[str, Any]) -> tuple[bytes, tuple[int, int]] | str:
    """The sample's JPEG and its (width, height), or the reason it is refused; nothing decoded or allocated."""
    data = next((sample[ext] for ext in JPEG_EXTENSIONS if ext in sample), None)
    if data is None:
        return "no .jpg member"
    try:
        check_structure(data)
        return data, pillow_header(data)
    except Refused as exc:
        return str(exc)


def host_decode(data: bytes) -> Image.Image | str:
    """The RGB image Pillow decodes (the CPU path's decoder), or why it does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except Exception as exc:  # as in pillow_header
        return f"does not decode: {first_line(exc)}"

