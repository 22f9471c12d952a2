"""Document sources: parsing the source string, and random-access readers of raw documents.

A reader has `__len__` and `__getitem__(i)`, returning either `(text, replaced_bytes)` (text
sources: undecodable bytes become U+FFFD and are counted) or an int32 `[n]` array of token ids
(array_record with token records). Readers hold no open files, so they pickle into workers.

Train/validation split of one source: text files (and the stdlib) hold out the documents whose
hash of their relative path (plus line number for .jsonl) falls below `val_fraction` (at least one
document when there are two or more); array_record holds out every k-th record (k = 1/val_fraction);
Parquet files and a single saved Hugging Face Dataset hold out rows by a hash of (file, row);
tfds and a saved Hugging Face DatasetDict use their own splits ('validation', else 'test').
"""
from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import json
import os
import re
import sysconfig
import threading
from typing import Any, Iterator

import numpy as np

TEXT_EXTENSIONS = (".txt", ".md", ".py", ".jsonl")
_STDLIB_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")
_KINDS = ("stdlib", "text", "tfds", "array_record", "parquet", "hf", "synthetic")


@dataclasses.dataclass(frozen=True)
class Component:
  """One source of a (possibly mixed) source string."""
  kind: str      # 'stdlib' | 'text' | 'tfds' | 'array_record' | 'parquet' | 'hf' | 'synthetic'
  arg: str       # path/glob, tfds name, or task name
  weight: float = 1.0


def _parse_single(spec: str) -> Component:
  spec = spec.strip()
  if spec in ("", "stdlib"):
    return Component("stdlib", "")
  kind, sep, arg = spec.partition(":")
  if not sep or kind not in _KINDS or kind == "stdlib":
    raise ValueError(f"source {spec!r} is not understood; use '' or 'stdlib', 'text:<dir|glob>', "
                     f"'tfds:<name>[/<config>][:<split>]', 'array_record:<glob>', "
                     f"'parquet:<glob>', 'hf:<dataset folder>', 'synthetic:<task>' or "
                     f"'mix:<source>=<weight>,...'")
  if not arg:
    raise ValueError(f"source {spec!r} names no {'task' if kind == 'synthetic' else 'path'} "
                     f"after '{kind}:'")
  return Component(kind, arg)


def parse_source(source: str) -> list[Component]:
  """'text:/d' -> [Component]; 'mix:a=0.7,b=0.3' -> components with weights (any scale)."""
  if not source.startswith("mix:"):
    return [_parse_single(source)]
  parts = [p for p in source[len("mix:"):].split(",") if p.strip()]
  if not parts:
    raise ValueError(f"mixture {source!r} lists no sources; write 'mix:<source>=<weight>,...'")
  comps = []
  for part in parts:
    spec, eq, weight_text = part.rpartition("=")
    if not eq:
      raise ValueError(f"mixture part {part!r} has no weight; write '<source>=<weight>', "
                       f"e.g. 'stdlib=0.9'")
    try:
      weight = float(weight_text)
    except ValueError:
      raise ValueError(f"mixture weight {weight_text!r} of {spec!r} is not a number") from None
    if not np.isfinite(weight) or weight <= 0:
      raise ValueError(f"mixture weight {weight_text!r} of {spec!r} must be a positive number")
    if spec.strip().startswith("mix:"):
      raise ValueError(f"mixtures do not nest ({part!r}); list all sources in one 'mix:'")
    comps.append(dataclasses.replace(_parse_single(spec), weight=weight))
  return comps


# ----------------------------------------------------------------------------- decoding

_TLS = threading.local()


def _count_and_replace(err: UnicodeDecodeError):
  _TLS.replaced += err.end - err.start
  return "\ufffd", err.end


codecs.register_error("sosm_count_replace", _count_and_replace)


def decode_counted(raw: bytes) -> tuple[str, int]:
  """UTF-8 bytes -> (text, number of undecodable bytes replaced by U+FFFD)."""
  try:
    return raw.decode("utf-8"), 0
  except UnicodeDecodeError:
    pass
  # The count lives in thread-local storage: reader threads decode concurrently.
  _TLS.replaced = 0
  text = raw.decode("utf-8", errors="sosm_count_replace")
  return text, _TLS.replaced


def _clean_str(text: str) -> tuple[str, int]:
  """Lone surrogates (possible in JSON strings) -> U+FFFD, counted."""
  if text.isascii():
    return text, 0
  try:
    text.encode("utf-8")
    return text, 0
  except UnicodeEncodeError:
    bad = sum(1 for ch in text if 0xD800 <= ord(ch) <= 0xDFFF)
    return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text), bad


# ----------------------------------------------------------------------------- holdout

def _unit_hash(key: str) -> int:
  return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                                        digest_size=8).digest(), "little")


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on uint64 `[n]` (wrapping arithmetic)."""
  x = x.astype(np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def holdout_mask(hashes: np.ndarray, val_fraction: float) -> np.ndarray:
  """uint64 hashes `[n]` -> bool `[n]`, True = validation; never empty when n >= 2."""
  threshold = np.uint64(min(int(val_fraction * 2.0**64), 2**64 - 1))
  val = hashes < threshold
  if not val.any() and len(hashes) >= 2:
    val[np.argmin(hashes)] = True
  if val.all() and len(hashes) >= 2:
    val[np.argmax(hashes)] = False
  return val


# ----------------------------------------------------------------------------- text files

def stdlib_root() -> str:
  """This interpreter's standard-library directory (found at run time, no download)."""
  return sysconfig.get_paths()["stdlib"]


def _walk(root: str, extensions: tuple[str, ...], skip_dirs: tuple[str, ...] = ()) -> list[str]:
  found = []
  for d, dirs, files in os.walk(root, followlinks=False):
    dirs[:] = sorted(x for x in dirs if x not in skip_dirs and not x.startswith("."))
    found.extend(os.path.join(d, f) for f in sorted(files) if f.endswith(extensions))
  return found


def list_text_files(pattern: str) -> tuple[str, list[str]]:
  """'dir' | 'glob' | 'file' -> (root for relative paths, sorted file paths)."""
  pattern = os.path.expanduser(pattern)
  if os.path.isdir(pattern):
    files = _walk(pattern, TEXT_EXTENSIONS)
    if not files:
      raise ValueError(f"text source directory {pattern!r} holds no {'/'.join(TEXT_EXTENSIONS)} "
                       f"files; give a glob for other names (e.g. '{pattern}/**/*.log')")
    return pattern, files
  if glob.has_magic(pattern):
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    root = pattern
    while glob.has_magic(root):
      root = os.path.dirname(root)
    if not files:
      raise ValueError(f"text source {pattern!r} matched no files; check the glob (use '**' with "
                       f"a directory for recursion) or give a directory")
    return root or ".", files
  if os.path.isfile(pattern):
    return os.path.dirname(pattern) or ".", [pattern]
  raise ValueError(f"text source path {pattern!r} does not exist; give an existing directory, "
                   f"file or glob")


def _jsonl_lines(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Byte spans (start `[n]`, end `[n]`) of the non-blank lines of a .jsonl file."""
  with open(path, "rb") as f:
    raw = f.read()
  buf = np.frombuffer(raw, np.uint8)
  nl = np.flatnonzero(buf == 10)
  starts = np.concatenate([[0], nl + 1]).astype(np.int64)
  ends = np.concatenate([nl, [len(raw)]]).astype(np.int64)
  keep = ends > starts
  short = np.flatnonzero(keep & (ends - starts <= 8))
  for i in short:  # whitespace-only lines are not documents
    if not raw[starts[i]:ends[i]].strip():
      keep[i] = False
  return starts[keep], ends[keep]


class TextDocuments:
  """Documents of local text files: whole files, or lines of .jsonl files (field `text_field`)."""

  def __init__(self, paths, file_index, starts, ends, *, text_field: str, summary: dict):
    self.paths = list(paths)
    self.file_index = np.asarray(file_index, np.int32)
    self.starts = np.asarray(starts, np.int64)
    self.ends = np.asarray(ends, np.int64)   # -1: the whole file
    self.text_field = text_field
    self.summary = summary

  def __len__(self) -> int:
    return len(self.file_index)

  def __getitem__(self, i: int) -> tuple[str, int]:
    path = self.paths[self.file_index[i]]
    start, end = int(self.starts[i]), int(self.ends[i])
    with open(path, "rb") as f:
      if end < 0:
        raw = f.read()
      else:
        f.seek(start)
        raw = f.read(end - start)
    text, replaced = decode_counted(raw)
    if end < 0:
      return text, replaced
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: byte {start}: line is not valid JSON ({e}); fix or remove "
                       f"it") from None
    value = record.get(self.text_field) if isinstance(record, dict) else None
    if not isinstance(value, str):
      raise ValueError(f"{path}: byte {start}: no string field {self.text_field!r} in this JSON "
                       f"line; set data.text_field to the field that holds the text")
    value, bad = _clean_str(value)
    return value, replaced + bad


def text_documents(pattern: str, *, split: str, val_fraction: float, text_field: str = "text",
                   stdlib: bool = False) -> TextDocuments:
  """Lists the documents of a text source (or the stdlib) for split 'train'|'validation'|'all'.

  Files of size zero are empty documents: skipped and counted in `summary['empty_documents']`.
  """
  if stdlib:
    root = stdlib_root()
    files = _walk(root, (".py",), _STDLIB_SKIP_DIRS)
    if not files:
      raise ValueError(f"found no .py files under the standard library {root!r}; name a source "
                       f"with data.source='text:<dir>'")
  else:
    root, files = list_text_files(pattern)
  paths, file_index, starts, ends, hashes = [], [], [], [], []
  empty = 0
  for path in files:
    rel = os.path.relpath(path, root)
    if os.path.getsize(path) == 0:
      empty += 1
      continue
    fi = len(paths)
    paths.append(path)
    if path.endswith(".jsonl"):
      s, e = _jsonl_lines(path)
      file_index.append(np.full(len(s), fi, np.int32))
      starts.append(s)
      ends.append(e)
      base = np.uint64(_unit_hash(rel))
      hashes.append(_mix64(np.arange(len(s), dtype=np.uint64) ^ base))
    else:
      file_index.append(np.array([fi], np.int32))
      starts.append(np.zeros(1, np.int64))
      ends.append(np.full(1, -1, np.int64))
      hashes.append(np.array([_unit_hash(rel)], np.uint64))
  cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
  file_index, starts, ends = cat(file_index, np.int32), cat(starts, np.int64), cat(ends, np.int64)
  hashes = cat(hashes, np.uint64)
  name = "stdlib" if stdlib else f"text:{pattern}"
  if len(hashes) == 0:
    raise ValueError(f"source {name!r} has no documents ({len(files)} files, {empty} empty); "
                     f"point data.source at non-empty text")
  val = holdout_mask(hashes, val_fraction)
  if split != "all":
    keep = val if split == "validation" else ~val
    if not keep.any():
      raise ValueError(f"source {name!r} has a single document, so nothing is left for the "
                       f"{split} split; add documents or set data.eval_source")
    file_index, starts, ends = file_index[keep], starts[keep], ends[keep]
  summary = {"source": name, "root": root, "files": len(files), "documents": int(len(file_index)),
             "empty_documents": empty}
  return TextDocuments(paths, file_index, starts, ends, text_field=text_field, summary=summary)


# ----------------------------------------------------------------------------- tfds

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def parse_tfds(arg: str) -> tuple[str, str | None]:
  """'name[/config][:version][:split]' -> ('name[/config][:version]', split or None)."""
  parts = arg.split(":")
  name, split = parts[0], None
  for p in parts[1:]:
    if _VERSION.match(p):
      name += ":" + p
    elif split is None and p:
      split = p
    else:
      raise ValueError(f"tfds source 'tfds:{arg}' has an extra part {p!r}; write "
                       f"'tfds:<name>[/<config>][:<split>]'")
  return name, split


class TfdsDocuments:
  """Examples of a tfds dataset prepared as ArrayRecord, read with `tfds.data_source`."""

  def __init__(self, arg: str, *, split: str, data_dir: str, text_field: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    name, given_split = parse_tfds(arg)
    data_dir = data_dir or None
    how = (f"prepare it as ArrayRecord first (no TensorFlow needed): `tfds.builder({name!r}, "
           f"data_dir={data_dir!r}, file_format='array_record').download_and_prepare()` in "
           f"Python, or `tfds build {name.split(':')[0]} --file_format=array_record"
           f"{' --data_dir=' + data_dir if data_dir else ''}`; then set data.data_dir to that "
           f"directory")
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      splits = list(builder.info.splits.keys())
    except Exception as e:  # tfds raises several types for unknown / unprepared datasets
      raise ValueError(f"tfds dataset {name!r} was not found in data_dir {data_dir!r} ({e}); "
                       f"{how}") from None
    if not splits:
      raise ValueError(f"tfds dataset {name!r} is not prepared in data_dir {data_dir!r}; {how}")
    if split == "validation":
      choice = next((s for s in ("validation", "test") if s in splits and s != given_split), None)
      if choice is None:
        raise ValueError(f"tfds dataset {name!r} has splits {splits} and none to validate on "
                         f"besides the training split; set data.eval_source='tfds:{name}:<split>'")
    else:
      choice = given_split or "train"
    try:
      self._source = tfds.data_source(name, split=choice, data_dir=data_dir)
    except Exception as e:
      raise ValueError(f"tfds dataset {name!r} split {choice!r} cannot be read as ArrayRecord "
                       f"({e}); {how}") from None
    self.text_field = text_field
    self.summary = {"source": f"tfds:{arg}", "split": choice, "documents": len(self._source),
                    "empty_documents": 0}
    if len(self._source) == 0:
      raise ValueError(f"tfds dataset {name!r} split {choice!r} is empty")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> tuple[str, int]:
    example = self._source[int(i)]
    if self.text_field not in example:
      raise ValueError(f"tfds examples have fields {sorted(example)}, not {self.text_field!r}; "
                       f"set data.text_field")
    value = example[self.text_field]
    if isinstance(value, np.ndarray):
      value = value.item()
    return decode_counted(value) if isinstance(value, bytes) else _clean_str(str(value))


# ----------------------------------------------------------------------------- array_record

class ArrayRecordDocuments:
  """Records of ArrayRecord files: UTF-8 text, or token ids ('int32' / 'uint16' little-endian)."""

  def __init__(self, pattern: str, *, split: str, val_fraction: float, record_format: str):
    from grain import sources as grain_sources  # pylint: disable=g-import-not-at-top
    pattern = os.path.expanduser(pattern)
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
      raise ValueError(f"array_record source {pattern!r} matched no files; check the path or glob")
    self._source = grain_sources.ArrayRecordDataSource(paths)
    n = len(self._source)
    if n == 0:
      raise ValueError(f"array_record source {pattern!r} has no records")
    # Every k-th record is held out; index maps are arithmetic so nothing is materialised.
    self._k = max(2, min(int(round(1.0 / val_fraction)), n))
    self._split = split
    n_val = n // self._k
    if split == "validation" and n_val == 0:
      raise ValueError(f"array_record source {pattern!r} has a single record, so nothing is left "
                       f"for validation; set data.eval_source")
    self._len = {"all": n, "validation": n_val, "train": n - n_val}[split]
    self.record_format = record_format
    self.summary = {"source": f"array_record:{pattern}", "files": len(paths),
                    "documents": self._len, "empty_documents": 0}

  def __len__(self) -> int:
    return self._len

  def _index(self, j: int) -> int:
    k = self._k
    if self._split == "validation":
      return j * k + k - 1
    if self._split == "train":
      return j + j // (k - 1)
    return j

  def __getitem__(self, j: int):
    raw = self._source[self._index(int(j))]
    if self.record_format == "text":
      return decode_counted(raw)
    dtype = "<i4" if self.record_format == "int32" else "<u2"
    if len(raw) % np.dtype(dtype).itemsize:
      raise ValueError(f"an array_record record of {len(raw)} bytes is not a whole number of "
                       f"{self.record_format} token ids; check data.record_format")
    return np.frombuffer(raw, dtype).astype(np.int32)


def write_array_record(path: str, documents, record_format: str = "text") -> int:
  """Writes documents (str, or int arrays for 'int32'/'uint16') as ArrayRecord; returns count."""
  # pylint: disable-next=g-import-not-at-top
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(path, "group_size:1")
  n = 0
  for doc in documents:
    if record_format == "text":
      writer.write(doc.encode("utf-8"))
    else:
      writer.write(np.asarray(doc, "<i4" if record_format == "int32" else "<u2").tobytes())
    n += 1
  writer.close()
  return n


# ----------------------------------------------------------------------------- columnar files

def _row_holdout(names: list[str], counts: list[int], val_fraction: float) -> np.ndarray:
  """bool `[sum(counts)]`, True = validation: hash of (file name, row number) per row."""
  hashes = [_mix64(np.arange(n, dtype=np.uint64) ^ np.uint64(_unit_hash(name)))
            for name, n in zip(names, counts)]
  return holdout_mask(np.concatenate(hashes) if hashes else np.zeros(0, np.uint64), val_fraction)


def _text_value(value, where: str, text_field: str) -> tuple[str, int]:
  if isinstance(value, bytes):
    return decode_counted(value)
  if not isinstance(value, str):
    raise ValueError(f"{where}: column {text_field!r} holds {type(value).__name__}, not text; set "
                     f"data.text_field to a string column")
  return _clean_str(value)


class _ColumnRows:
  """Random access to one text column of several tables: global row -> (table, row in it).

  Subclasses give `_table(k)` (a pyarrow table or record batch holding table k's rows, cached
  per process, never pickled) and list `names`, `counts`. `rows` selects the split's rows.
  """

  def __init__(self, names, counts, rows, text_field: str, summary: dict):
    self.names, self.counts = list(names), np.asarray(counts, np.int64)
    self.starts = np.concatenate([[0], np.cumsum(self.counts)])
    self.rows = np.asarray(rows, np.int64)
    self.text_field = text_field
    self.summary = summary
    self._cache = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = {}
    return state

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, j: int) -> tuple[str, int]:
    row = int(self.rows[int(j)])
    k = int(np.searchsorted(self.starts, row, side="right") - 1)
    table, offset = self._table_at(k, row - int(self.starts[k]))
    value = table.column(self.text_field)[offset].as_py()
    return _text_value(value, f"{self.names[k]} row {row - int(self.starts[k])}", self.text_field)


class ParquetDocuments(_ColumnRows):
  """Rows of Parquet files (column `text_field`), read one row group at a time with pyarrow.

  grain's Parquet reader (`grain.experimental.ParquetIterDataset`) reads sequentially; this
  reader gives random access, so Parquet takes part in the same global shuffle, holdout and
  checkpointed position as the other sources.
  """

  def __init__(self, pattern: str, *, split: str, val_fraction: float, text_field: str):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pattern = os.path.expanduser(pattern)
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
      raise ValueError(f"parquet source {pattern!r} matched no files; check the path or glob")
    counts, groups = [], []
    for path in paths:
      meta = pq.ParquetFile(path).metadata
      names = meta.schema.to_arrow_schema().names
      if text_field not in names:
        raise ValueError(f"{path} has columns {names}, not {text_field!r}; set data.text_field")
      counts.append(meta.num_rows)
      groups.append(np.cumsum([0] + [meta.row_group(g).num_rows
                                     for g in range(meta.num_row_groups)]))
    self._groups = groups
    rel = [os.path.relpath(p, os.path.dirname(pattern.split("*")[0]) or ".") for p in paths]
    rows = _split_rows(rel, counts, split, val_fraction, f"parquet:{pattern}")
    super().__init__(paths, counts, rows, text_field,
                     {"source": f"parquet:{pattern}", "files": len(paths),
                      "documents": int(len(rows)), "empty_documents": 0})

  def _table_at(self, k: int, offset: int):
    g = int(np.searchsorted(self._groups[k], offset, side="right") - 1)
    table = self._cache.get((k, g))
    if table is None:   # one row group held per reader; a new dict is swapped in atomically
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      table = pq.ParquetFile(self.names[k]).read_row_group(g, columns=[self.text_field])
      self._cache = {(k, g): table}
    return table, offset - int(self._groups[k][g])


class HFDatasetDocuments(_ColumnRows):
  """A Hugging Face `datasets` folder saved with `save_to_disk` (Arrow stream files), no `datasets`.

  A DatasetDict folder (dataset_dict.json and one folder per split) gives its splits: 'train'
  reads the train split, 'validation' the validation split (else test); a single Dataset folder
  (state.json) is split by a hash of the row number like the text sources.
  """

  def __init__(self, folder: str, *, split: str, val_fraction: float, text_field: str):
    folder = os.path.expanduser(folder)
    dict_file = os.path.join(folder, "dataset_dict.json")
    holdout = True
    if os.path.isfile(dict_file):
      with open(dict_file, encoding="utf-8") as f:
        splits = json.load(f).get("splits", [])
      if split == "validation":
        choice = next((s for s in ("validation", "test") if s in splits), None)
      else:
        choice = "train" if "train" in splits else (splits[0] if splits else None)
      if choice is None:
        raise ValueError(f"Hugging Face dataset {folder!r} has splits {splits} and none for "
                         f"{split}; set data.eval_source='hf:{folder}/<split folder>'")
      folder, holdout = os.path.join(folder, choice), False
    state_file = os.path.join(folder, "state.json")
    if not os.path.isfile(state_file):
      raise ValueError(f"{folder!r} is not a Hugging Face dataset saved with save_to_disk (no "
                       f"state.json or dataset_dict.json); save it with "
                       f"`datasets.load_dataset(...).save_to_disk(DIR)`")
    with open(state_file, encoding="utf-8") as f:
      files = [os.path.join(folder, d["filename"]) for d in json.load(f)["_data_files"]]
    tables = {i: self._open(path) for i, path in enumerate(files)}   # memory-mapped, no copy
    for i, table in tables.items():
      if text_field not in table.column_names:
        raise ValueError(f"{files[i]} has columns {table.column_names}, not {text_field!r}; "
                         f"set data.text_field")
    counts = [tables[i].num_rows for i in range(len(files))]
    rel = [os.path.basename(p) for p in files]
    if holdout:
      rows = _split_rows(rel, counts, split, val_fraction, f"hf:{folder}")
    else:
      rows = np.arange(sum(counts), dtype=np.int64)
    super().__init__(files, counts, rows, text_field,
                     {"source": f"hf:{folder}", "files": len(files), "documents": int(len(rows)),
                      "empty_documents": 0})
    self._cache = tables

  @staticmethod
  def _open(path: str):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    return pa.ipc.open_stream(pa.memory_map(path, "r")).read_all()   # zero-copy, memory-mapped

  def _table_at(self, k: int, offset: int):
    table = self._cache.get(k)
    if table is None:   # in a worker process after unpickling
      table = self._open(self.names[k])
      self._cache = {**self._cache, k: table}
    return table, offset


def _split_rows(rel_names, counts, split: str, val_fraction: float, name: str) -> np.ndarray:
  n = int(sum(counts))
  if n == 0:
    raise ValueError(f"source {name!r} has no rows")
  if split == "all":
    return np.arange(n, dtype=np.int64)
  val = _row_holdout(rel_names, counts, val_fraction)
  keep = np.flatnonzero(val if split == "validation" else ~val)
  if len(keep) == 0:
    raise ValueError(f"source {name!r} has a single row, so nothing is left for the {split} "
                     f"split; add rows or set data.eval_source")
  return keep


# ----------------------------------------------------------------------------- entry points

def open_documents(comp: Component, data_cfg, split: str):
  """Component (not synthetic) -> random-access reader of its documents for `split`."""
  if comp.kind == "stdlib":
    return text_documents("", split=split, val_fraction=data_cfg.val_fraction, stdlib=True)
  if comp.kind == "text":
    return text_documents(comp.arg, split=split, val_fraction=data_cfg.val_fraction,
                          text_field=data_cfg.text_field)
  if comp.kind == "tfds":
    return TfdsDocuments(comp.arg, split=split, data_dir=data_cfg.data_dir,
                         text_field=data_cfg.text_field)
  if comp.kind == "array_record":
    return ArrayRecordDocuments(comp.arg, split=split, val_fraction=data_cfg.val_fraction,
                                record_format=data_cfg.record_format)
  if comp.kind == "parquet":
    return ParquetDocuments(comp.arg, split=split, val_fraction=data_cfg.val_fraction,
                            text_field=data_cfg.text_field)
  if comp.kind == "hf":
    return HFDatasetDocuments(comp.arg, split=split, val_fraction=data_cfg.val_fraction,
                              text_field=data_cfg.text_field)
  raise ValueError(f"source kind {comp.kind!r} has no documents to open")


def iter_texts(source: str, data_cfg, split: str = "train") -> Iterator[str]:
  """Raw texts of every text-bearing component of `source`, in order (for tokenizer training)."""
  for comp in parse_source(source):
    tokens_only = comp.kind == "array_record" and data_cfg.record_format != "text"
    if comp.kind == "synthetic" or tokens_only:
      raise ValueError(f"source component {comp.kind}:{comp.arg} holds no text to train a "
                       f"tokenizer on; use a text, stdlib, tfds or text array_record source")
    docs = open_documents(comp, data_cfg, split)
    for i in range(len(docs)):
      text, _ = docs[i]
      if text:
        yield text


def describe(docs: Any) -> dict:
  """The listing summary of a reader (files, documents, empty documents skipped)."""
  return dict(getattr(docs, "summary", {}))
