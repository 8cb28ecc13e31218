"""A small "kit" from which a shape-faithful copy of a GGUF model is rebuilt elsewhere.

Why: the lent GPU machine has no network and a call carries at most 64 MiB, but the
embedded Gemma 3 270M Q4_K_M is 253 MB (178 MB of it the Q8_0 token embedding of a
262,144-token vocabulary). The kit keeps what decides memory and speed exactly and drops
what only decides the words:

- the whole header, verbatim: metadata (tokenizer, hyper-parameters) and every tensor's
  name, shape, type and offset, so llama.cpp, the registry and the offload planner see
  the same model, and the rebuilt file has the same size, layout and byte count per layer;
- the real bytes of every small tensor and of one tensor per distinct (type, shape) in
  the blocks; the other blocks' tensors are copies of those (same type, same shape);
- the first rows of the token embedding, repeated to its full height.

So VRAM figures and tokens/s are those of the real model (same shapes, same quantisation
types, same kernels, real weight statistics: no NaN, no denormal storms), while the text it
writes is meaningless. Reports made with it must say so.

    python bench/gguf_kit.py make MODEL.gguf KIT_DIR [--rows 4096]   # here
    python bench/gguf_kit.py build KIT_DIR OUT.gguf                  # on the device

Only the standard library is used, so ``build`` runs on a bare Python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

KIT_FORMAT = "ml-offload gguf kit 1"
PAYLOAD = "payload.bin.xz"
MANIFEST = "manifest.json"
SMALL = 64 * 1024  # tensors up to this size are always carried as they are

# ggml type id -> (elements per block, bytes per block), from ggml.c's type traits.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98),
    19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82), 23: (256, 136),
    24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17),
}

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}


class KitError(ValueError):
    pass


class _Reader:
    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise KitError("truncated GGUF header")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.unpack("<Q")).decode("utf-8", "replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _SCALARS:
                self.read(struct.calcsize(_SCALARS[item_type]) * count)
            else:
                for _ in range(count):
                    self.value(item_type)
            return None  # arrays are not needed here
        raise KitError(f"unknown GGUF value type {vtype}")


def read_layout(path: Path) -> dict[str, Any]:
    """Header size, alignment, and each tensor's (name, dims, type, offset, bytes)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        r = _Reader(fh)
        if r.read(4) != b"GGUF":
            raise KitError(f"{path} is not a GGUF file")
        version = r.unpack("<I")
        if version < 2:
            raise KitError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        alignment = 32
        for _ in range(n_kv):
            key = r.string()
            value = r.value(r.unpack("<I"))
            if key == "general.alignment" and isinstance(value, int):
                alignment = value
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
            tensors.append({"name": name, "dims": dims, "type": r.unpack("<I"),
                            "offset": r.unpack("<Q")})
        pos = fh.tell()
    data_start = (pos + alignment - 1) // alignment * alignment
    by_offset = sorted(tensors, key=lambda t: t["offset"])
    for i, t in enumerate(by_offset):
        end = by_offset[i + 1]["offset"] if i + 1 < len(by_offset) else size - data_start
        padded = end - t["offset"]
        n_el = 1
        for d in t["dims"]:
            n_el *= d
        block = GGML_BLOCKS.get(t["type"])
        exact = n_el // block[0] * block[1] if block and n_el % block[0] == 0 else None
        t["bytes"] = exact if exact is not None and exact <= padded else padded
        t["row_bytes"] = (t["bytes"] // t["dims"][1]
                          if exact is not None and len(t["dims"]) >= 2 and t["dims"][1] else None)
    return {"size": size, "data_start": data_start, "alignment": alignment,
            "tensors": by_offset}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def make(model: Path, kit: Path, rows: int = 4096) -> dict[str, Any]:
    layout = read_layout(model)
    ds = layout["data_start"]
    regions: list[list[Any]] = []
    pieces: list[tuple[int, int]] = []  # (file offset, length) carried in the payload
    payload_len = 0

    def carry(dst: int, length: int) -> None:
        nonlocal payload_len
        regions.append([dst, length, "kit", payload_len])
        pieces.append((dst, length))
        payload_len += length

    carry(0, ds)
    donors: dict[tuple[int, tuple[int, ...]], int] = {}
    largest = max(layout["tensors"], key=lambda t: t["bytes"])
    tiled = None
    for t in layout["tensors"]:
        dst, n = ds + t["offset"], t["bytes"]
        key = (t["type"], tuple(t["dims"]))
        if t is largest and t["row_bytes"] and t["dims"][1] > rows:
            unit = t["row_bytes"] * rows
            carry(dst, unit)
            regions.append([dst + unit, n - unit, "tile", dst, unit])
            tiled = {"name": t["name"], "rows_carried": rows, "rows": t["dims"][1]}
        elif n <= SMALL or key not in donors:
            carry(dst, n)
            if n > SMALL:
                donors[key] = dst
        else:
            regions.append([dst, n, "copy", donors[key]])
    kit.mkdir(parents=True, exist_ok=True)
    comp = lzma.LZMACompressor(preset=6)
    with model.open("rb") as src, (kit / PAYLOAD).open("wb") as out:
        for off, length in pieces:
            src.seek(off)
            left = length
            while left:
                block = src.read(min(left, 1 << 22))
                if not block:
                    raise KitError("model file shorter than its layout")
                out.write(comp.compress(block))
                left -= len(block)
        out.write(comp.flush())
    copied = sum(r[1] for r in regions if r[2] != "kit")
    manifest = {
        "format": KIT_FORMAT,
        "source": {"name": model.name, "size": layout["size"], "sha256": _sha256(model)},
        "data_start": ds,
        "payload_bytes": payload_len,
        "tiled": tiled,
        "real_bytes": payload_len,
        "synthesised_bytes": copied,
        "note": ("shape-faithful copy: real header, real small tensors and one real tensor "
                 "per (type, shape); other block tensors copied from those; the token "
                 "embedding's first rows repeated. Same memory and speed as the source; "
                 "its text is meaningless."),
        "regions": regions,
    }
    (kit / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def build(kit: Path, out: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((kit / MANIFEST).read_text())
    if manifest.get("format") != KIT_FORMAT:
        raise KitError(f"{kit / MANIFEST} is not a {KIT_FORMAT!r} manifest")
    payload = lzma.decompress((kit / PAYLOAD).read_bytes())
    if len(payload) != manifest["payload_bytes"]:
        raise KitError("payload size does not match the manifest")
    size = int(manifest["source"]["size"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("w+b") as fh:
        fh.truncate(size)  # padding between tensors stays zero, as in the source
        for region in manifest["regions"]:
            dst, length, kind = region[0], region[1], region[2]
            if kind == "kit":
                fh.seek(dst)
                fh.write(payload[region[3]:region[3] + length])
            elif kind == "copy":
                fh.seek(region[3])
                data = fh.read(length)
                fh.seek(dst)
                fh.write(data)
            elif kind == "tile":
                fh.seek(region[3])
                unit = fh.read(region[4])
                fh.seek(dst)
                left = length
                chunk = unit * max(1, (1 << 24) // len(unit))
                while left:
                    piece = chunk[:left]
                    fh.write(piece)
                    left -= len(piece)
            else:
                raise KitError(f"unknown region kind {kind!r}")
    os.replace(tmp, out)
    return manifest


def cli(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/gguf_kit.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="make a kit from a GGUF file")
    m.add_argument("model", type=Path)
    m.add_argument("kit", type=Path)
    m.add_argument("--rows", type=int, default=4096,
                   help="token-embedding rows carried (the rest repeats them)")
    b = sub.add_parser("build", help="rebuild the shape-faithful GGUF from a kit")
    b.add_argument("kit", type=Path)
    b.add_argument("out", type=Path)
    args = p.parse_args(list(argv))
    try:
        if args.cmd == "make":
            man = make(args.model, args.kit, args.rows)
            size = (args.kit / PAYLOAD).stat().st_size
            print(f"kit {args.kit}: {size / 2**20:.1f} MiB compressed; "
                  f"{man['real_bytes'] / 1e6:.1f} MB real, "
                  f"{man['synthesised_bytes'] / 1e6:.1f} MB rebuilt of "
                  f"{man['source']['size'] / 1e6:.1f} MB")
        else:
            man = build(args.kit, args.out)
            print(f"rebuilt {args.out} ({man['source']['size'] / 1e6:.1f} MB, "
                  f"shape-faithful copy of {man['source']['name']})")
    except (KitError, OSError) as exc:
        print(f"gguf_kit: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
