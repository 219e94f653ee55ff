"""Corpus inputs -> documents: which files, in which formats, cut into ordered work units.

Formats, by file name:
- plain text (any other name; in directories TEXT_SUFFIXES): one document per file, key ``path``;
- JSONL (``.jsonl``): one document per line, the string field ``text_field``, key ``f"{path}:{line}"``
  (1-based line number in the file, or in its decompressed stream);
- compressed (``.gz`` gzip, ``.zst`` / ``.zstd`` zstd): read as the name without that suffix would be
  (``x.jsonl.gz`` is JSONL, ``x.txt.gz`` one text document), except that ``x.json.gz`` / ``x.json.zst`` are
  JSONL (C4's and others' shards); a bare ``x.zst`` / ``x.zstd`` is JSONL;
- Parquet (``.parquet``): one document per row, the string column ``text_field``, key ``f"{path}:{row}"``
  (1-based row number over the whole file).

A work unit is what one worker process reads at a time (a few MB of input): a group of small text files,
a byte range of lines of one JSONL file (``Lines``; the decompressed lines themselves for a compressed one,
cut by the main process, which is the only reader of a stream that cannot seek), or one Parquet row group.
The units of a corpus come in corpus order, so documents read unit after unit come in the order one
reader of the whole corpus sees them.

Light to import (no torch): prepare's worker processes read units with it; pyarrow and zstandard are
imported when a file needs them.
"""
import glob
import io
import json
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

__all__ = ["TEXT_SUFFIXES", "COMPRESSED", "ENCODING_ERRORS", "UNIT_BYTES", "Reading", "Tally", "TextFiles", "Lines",
           "RowGroup", "default_corpus", "resolve_inputs", "source_format", "plan_units", "unit_documents",
           "unit_bytes", "iter_documents"]

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".jsonl")
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
PARQUET_SUFFIX = ".parquet"
# What prepare does with a document that is not UTF-8 text: refuse it, keep it with U+FFFD for each
# invalid byte, or leave it out.
ENCODING_ERRORS = ("strict", "replace", "skip")
# Input bytes per work unit: big enough that a unit's hand-over to a worker costs little against its
# tokenizing, small enough that a window of 2 units per worker stays a few tens of MB.
UNIT_BYTES = 4 << 20
_READ_BYTES = 1 << 20


class Reading(NamedTuple):
    """How documents are read: the text field of JSONL records / Parquet rows, what happens to text that
    is not UTF-8 (ENCODING_ERRORS), and whether a malformed record is skipped (and counted) or refused."""
    text_field: str = "text"
    encoding_errors: str = "strict"
    skip_malformed: bool = False


@dataclass
class Tally:
    """What reading some units came across besides documents; units' tallies add up (``merge``)."""
    not_text: int = 0  # documents that are not UTF-8 text (replaced or left out)
    malformed: int = 0  # records skipped with skip_malformed (bad JSON, no string text field, null row, ...)
    records: int = 0  # JSONL records and Parquet rows read
    with_field: int = 0  # ... of which held a string text field
    fields: Set[str] = field(default_factory=set)  # fields seen in records without the text field (a few)
    not_text_keys: Optional[Set[str]] = None  # the keys of the not-text documents, if wanted

    def merge(self, other: "Tally") -> None:
        self.not_text += other.not_text
        self.malformed += other.malformed
        self.records += other.records
        self.with_field += other.with_field
        if len(self.fields) < 20:
            self.fields |= other.fields


class TextFiles(NamedTuple):
    """Whole files, one document each (plain or compressed text)."""
    paths: Tuple[str, ...]
    in_bytes: int  # their size on disk


class Lines(NamedTuple):
    """JSONL lines: bytes [start, end) of ``path`` (``data`` None), or ``data``: lines decompressed from it,
    found at byte ``start`` of its decompressed stream. ``first_line``: the 1-based number of the first."""
    path: str
    start: int
    end: int
    first_line: int
    data: Optional[bytes]
    in_bytes: int  # the bytes of the file on disk this unit stands for


class RowGroup(NamedTuple):
    """Row group ``index`` of a Parquet file; ``first_row``: the 1-based number of its first row in the file."""
    path: str
    index: int
    first_row: int
    in_bytes: int


Unit = Union[TextFiles, Lines, RowGroup]


def default_corpus() -> List[Path]:
    """Every ``*.py`` of the running interpreter's standard library (no site-packages), sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in stdlib.rglob("*.py")
                  if p.is_file() and not skip.intersection(p.relative_to(stdlib).parts))


def source_format(path: Union[str, Path]) -> Tuple[str, Optional[str]]:
    """(format, compression) of an input file from its name: format "text" | "jsonl" | "parquet",
    compression None | "gzip" | "zstd" (see the module docstring)."""
    path = Path(path)
    if path.suffix == PARQUET_SUFFIX:
        return "parquet", None
    compression = COMPRESSED.get(path.suffix)
    inner = Path(path.stem).suffix if compression else path.suffix
    # A compressed .json is JSON lines, as C4 and other pre-training corpora ship (a plain .json stays one document).
    if inner == ".jsonl" or (compression and inner == ".json") or (
            compression == "zstd" and inner not in TEXT_SUFFIXES):
        return "jsonl", compression
    return "text", compression


def _listed(path: Path) -> bool:
    """Whether a directory's file is an input: a known suffix, possibly compressed."""
    if path.suffix in TEXT_SUFFIXES or path.suffix == PARQUET_SUFFIX:
        return True
    if path.suffix in COMPRESSED:
        inner = Path(path.stem).suffix
        return inner in TEXT_SUFFIXES or (COMPRESSED[path.suffix] == "zstd" and not inner)
    return False


def resolve_inputs(inputs: Sequence[str]) -> List[Path]:
    """Files, directories (recursively, known suffixes only) and glob patterns -> a list of files.

    Each directory or pattern is expanded in sorted order; the result keeps the order of ``inputs`` and
    lists each file once.
    """
    if isinstance(inputs, (str, Path)) or not inputs:
        raise ValueError(f"inputs must be a non-empty list of files, directories or glob patterns; got {inputs!r}")
    found: List[Path] = []
    for item in map(str, inputs):
        path = Path(item)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _listed(p))
            if not files:
                raise ValueError(f"directory {item!r} holds no files with suffix {', '.join(TEXT_SUFFIXES)}, "
                                 f"{PARQUET_SUFFIX} (or those compressed: {', '.join(COMPRESSED)}); point at the "
                                 "text files or a glob pattern that matches them")
        elif glob.has_magic(item):
            files = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
            if not files:
                raise ValueError(f"glob pattern {item!r} matches no files; check the pattern "
                                 "('**' needs to stand alone between slashes to recurse)")
        else:
            raise FileNotFoundError(f"input {item!r} is neither a file, a directory nor a glob pattern that exists")
        found.extend(files)
    seen, unique = set(), []
    for path in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


# --- reading ---------------------------------------------------------------------------------------

_SKIP_HINT = "or pass --skip-malformed (skip_malformed=True) to leave such records out, counted"


def _decode(data: bytes, key: str, offset: int, reading: Reading, tally: Tally) -> Optional[str]:
    """The UTF-8 text of document ``key`` (``data``, found at byte ``offset`` of its file), or, if it is
    not text (invalid UTF-8, or a NUL byte: a binary file): a ValueError naming it ("strict"), the text
    with U+FFFD for each invalid byte ("replace"), None ("skip"); counted in ``tally``."""
    nul = data.find(b"\0")
    if nul < 0:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            problem = f"not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset {offset + err.start} ({err.reason})"
    else:
        problem = f"a binary file, not text: a NUL byte at byte offset {offset + nul}"
    if reading.encoding_errors == "strict":
        raise ValueError(f"{key}: {problem}; convert it to UTF-8 or leave it out of the inputs, or pass "
                         "--encoding-errors skip (leaves such documents out) or replace (keeps them, with U+FFFD "
                         "for each invalid byte)")
    tally.not_text += 1
    if tally.not_text_keys is not None:
        tally.not_text_keys.add(key)
    return data.decode("utf-8", errors="replace") if reading.encoding_errors == "replace" else None


def _stream_problem(path: str, compression: str, err: Exception, where: str) -> str:
    return (f"{path}: a corrupt or truncated {compression} stream {where} ({type(err).__name__}: {err}); "
            f"download or compress it again, leave it out of the inputs, {_SKIP_HINT}")


_STREAM_ERRORS = (EOFError, OSError, zlib.error)  # and zstandard's ZstdError (_stream_errors)


def _decompressed_blocks(path: str, compression: str, raw: BinaryIO) -> Iterator[bytes]:
    """The decompressed bytes of an open compressed file, block by block, so that the blocks before a
    damage still come out; a stream that ends inside a member / frame raises EOFError."""
    if compression == "gzip":
        def member():
            return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    else:
        import zstandard
        member = zstandard.ZstdDecompressor().decompressobj
    stream, fed = member(), False
    while True:
        chunk = raw.read(_READ_BYTES)
        if not chunk:
            break
        while chunk:  # a file may hold several members (frames), one after the other
            fed = True
            yield stream.decompress(chunk)
            if not stream.eof:
                break
            chunk = stream.unused_data
            stream, fed = member(), bool(chunk)
    if fed and not stream.eof:
        raise EOFError(f"the file ends inside a {compression} stream")


def _stream_errors() -> tuple:
    try:
        import zstandard
    except ImportError:  # only gzip can occur then
        return _STREAM_ERRORS
    return _STREAM_ERRORS + (zstandard.ZstdError,)


def _read_compressed(path: str, compression: str, reading: Reading, tally: Tally) -> Optional[bytes]:
    """The whole decompressed content of a compressed text file, or None if it is corrupt and skipped."""
    with open(path, "rb") as raw:
        try:
            return b"".join(_decompressed_blocks(path, compression, raw))
        except _stream_errors() as err:
            if not reading.skip_malformed:
                raise ValueError(_stream_problem(path, compression, err, "(one text document)")) from err
            tally.malformed += 1
            return None


def _jsonl_documents(path: str, lines: bytes, start: int, first_line: int, reading: Reading,
                     tally: Tally) -> Iterator[Tuple[str, str]]:
    """(key, text) of the JSONL records in ``lines`` (found at byte ``start``, line ``first_line``)."""
    field_name, offset = reading.text_field, start
    for number, raw in enumerate(io.BytesIO(lines), start=first_line):
        line = _decode(raw, f"{path}:{number}", offset, reading, tally)
        offset += len(raw)
        if line is None or not line.strip():
            continue
        tally.records += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if reading.skip_malformed:
                tally.malformed += 1
                continue
            raise ValueError(f"{path}:{number}: not valid JSON ({err}); each line must be an object with a string "
                             f"field {field_name!r}; fix or remove the line, {_SKIP_HINT}") from err
        text = obj.get(field_name) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            if isinstance(obj, dict) and len(tally.fields) < 20:
                tally.fields.update(sorted(obj)[:20 - len(tally.fields)])
            if reading.skip_malformed:
                tally.malformed += 1
                continue
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}:{number}: no string field {field_name!r} (got {got}); pass text_field= "
                             f"(--text-field) naming the field that holds the text, {_SKIP_HINT}")
        tally.with_field += 1
        if text:
            yield f"{path}:{number}", text


def _row_documents(unit: RowGroup, reading: Reading, tally: Tally) -> Iterator[Tuple[str, str]]:
    import pyarrow.parquet as pq
    number = unit.first_row
    parquet = pq.ParquetFile(unit.path)
    for batch in parquet.iter_batches(batch_size=8192, row_groups=[unit.index], columns=[reading.text_field]):
        for text in batch.column(0).to_pylist():
            tally.records += 1
            if text is None:
                if not reading.skip_malformed:
                    raise ValueError(f"{unit.path}:{number}: row {number} has a null {reading.text_field!r}; fill "
                                     f"or drop such rows, {_SKIP_HINT}")
                tally.malformed += 1
            else:
                tally.with_field += 1
                if text:
                    yield f"{unit.path}:{number}", text
            number += 1


def unit_documents(unit: Unit, reading: Reading, tally: Tally) -> Iterator[Tuple[str, str]]:
    """(key, text) of every non-empty document of a work unit, in order (see the module docstring)."""
    if isinstance(unit, TextFiles):
        for path in unit.paths:
            compression = source_format(path)[1]
            if compression is None:
                # Bytes, decoded here: "\r\n" stays as written, so decoding the tokens gives back the exact text.
                with open(path, "rb") as f:
                    data: Optional[bytes] = f.read()
            else:
                data = _read_compressed(path, compression, reading, tally)
            text = None if data is None else _decode(data, path, 0, reading, tally)
            if text:
                yield path, text
    elif isinstance(unit, Lines):
        data = unit.data
        if data is None:
            with open(unit.path, "rb") as f:
                f.seek(unit.start)
                data = f.read(unit.end - unit.start)
        yield from _jsonl_documents(unit.path, data, unit.start, unit.first_line, reading, tally)
    else:
        yield from _row_documents(unit, reading, tally)


# --- planning: the work units of a corpus -----------------------------------------------------------

def _jsonl_ranges(path: str, limit: int) -> Iterator[Lines]:
    """A plain JSONL file cut at newlines into ranges of about ``limit`` bytes, each with its first line's
    number: one read of the file, counting newlines (no parsing)."""
    start, first_line, lines, pos = 0, 1, 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_READ_BYTES)
            if not block:
                break
            i = 0
            while True:
                # A range ends at the first newline that makes it at least ``limit`` bytes long.
                cut = start + limit - 1 - pos
                newline = block.find(b"\n", max(cut, i)) if cut < len(block) else -1
                if newline < 0:
                    lines += block.count(b"\n", i)
                    break
                lines += block.count(b"\n", i, newline + 1)
                end = pos + newline + 1
                yield Lines(path, start, end, first_line, None, end - start)
                start, first_line, lines, i = end, first_line + lines, 0, newline + 1
            pos += len(block)
    if pos > start:
        yield Lines(path, start, pos, first_line, None, pos - start)


def _compressed_lines(path: str, compression: str, limit: int, reading: Reading, tally: Tally) -> Iterator[Lines]:
    """A compressed JSONL file decompressed here (it cannot seek) and cut at newlines into units of about
    ``limit`` decompressed bytes. A corrupt or truncated stream: ValueError, or with skip_malformed the
    whole lines before the damage are kept and the rest counted as one malformed record."""
    size = Path(path).stat().st_size
    start, first_line, told, buffer = 0, 1, 0, b""
    with open(path, "rb") as raw:
        try:
            for block in _decompressed_blocks(path, compression, raw):
                buffer += block
                if len(buffer) < limit:
                    continue
                cut = buffer.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a unit: it grows until its newline
                    continue
                chunk, buffer = buffer[:cut], buffer[cut:]
                position = min(raw.tell(), size)
                yield Lines(path, start, start + cut, first_line, chunk, position - told)
                start, first_line, told = start + cut, first_line + chunk.count(b"\n"), position
        except _stream_errors() as err:
            line = first_line + buffer.count(b"\n")
            if not reading.skip_malformed:
                raise ValueError(_stream_problem(path, compression, err, f"at line {line}")) from err
            tally.malformed += 1
            buffer = buffer[:buffer.rfind(b"\n") + 1]  # the line cut short by the damage goes with it
    if buffer:
        yield Lines(path, start, start + len(buffer), first_line, buffer, size - told)
    elif size > told:  # what is left of the file still counts towards the progress in bytes
        yield Lines(path, start, start, first_line, b"", size - told)


def _row_groups(path: str, reading: Reading, tally: Tally) -> Iterator[RowGroup]:
    """One unit per row group of a Parquet file, after checking that it is Parquet and has a string
    column ``text_field``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        if not reading.skip_malformed:
            raise ValueError(f"{path}: not a Parquet file ({err}); convert it, leave it out of the inputs, "
                             f"{_SKIP_HINT}") from err
        tally.malformed += 1
        return
    schema = parquet.schema_arrow
    if reading.text_field not in schema.names:
        raise ValueError(f"{path} has no column {reading.text_field!r} (its columns: {', '.join(schema.names)}); "
                         "pass --text-field (text_field=) naming the column that holds the text")
    kind = schema.field(reading.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {reading.text_field!r} holds {kind}, not strings; pass --text-field "
                         "(text_field=) naming the column that holds the text")
    meta, size = parquet.metadata, Path(path).stat().st_size
    first_row, told, stored = 1, 0, 0
    total = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) or 1
    for index in range(meta.num_row_groups):
        stored += meta.row_group(index).total_byte_size
        # The file's bytes shared out by the row groups' sizes (the last takes the footer with it).
        position = size if index == meta.num_row_groups - 1 else size * stored // total
        yield RowGroup(path, index, first_row, position - told)
        first_row, told = first_row + meta.row_group(index).num_rows, position


def plan_units(paths: Sequence[Path], reading: Reading, tally: Tally, limit: Optional[int] = None) -> Iterator[Unit]:
    """The work units of the files ``paths``, in order: consecutive text files grouped up to about
    ``limit`` bytes (UNIT_BYTES), JSONL cut into line ranges of about that size, Parquet by row group.
    Lazy: a compressed JSONL file is decompressed as its units are taken."""
    limit = UNIT_BYTES if limit is None else limit
    group: List[str] = []
    group_bytes = 0
    for path in map(str, paths):
        kind, compression = source_format(path)
        if kind == "text":
            group.append(path)
            group_bytes += Path(path).stat().st_size
            if group_bytes >= limit:
                yield TextFiles(tuple(group), group_bytes)
                group, group_bytes = [], 0
            continue
        if group:
            yield TextFiles(tuple(group), group_bytes)
            group, group_bytes = [], 0
        if kind == "parquet":
            yield from _row_groups(path, reading, tally)
        elif compression is None:
            yield from _jsonl_ranges(path, limit)
        else:
            yield from _compressed_lines(path, compression, limit, reading, tally)
    if group:
        yield TextFiles(tuple(group), group_bytes)


def unit_bytes(paths: Sequence[Path]) -> int:
    """The input bytes of ``paths`` on disk: the total of the units' ``in_bytes``."""
    return sum(Path(p).stat().st_size for p in paths)


def iter_documents(paths: Iterable[Union[str, Path]], text_field: str = "text", encoding_errors: str = "strict",
                   not_text: Optional[Set[str]] = None, skip_malformed: bool = False) -> Iterator[Tuple[str, str]]:
    """Yield (key, text) per non-empty document of the files ``paths`` (formats and keys: see the module
    docstring). A document that is not UTF-8 text is refused, kept with U+FFFD replacements or left out, as
    ``encoding_errors`` (one of ENCODING_ERRORS) says; the keys of such documents are added to
    ``not_text``. A malformed record is refused, or with ``skip_malformed`` left out."""
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(f"encoding_errors must be one of {', '.join(ENCODING_ERRORS)}; got {encoding_errors!r}")
    reading = Reading(text_field, encoding_errors, skip_malformed)
    tally = Tally(not_text_keys=not_text)
    for unit in plan_units([Path(p) for p in paths], reading, tally):
        yield from unit_documents(unit, reading, tally)
