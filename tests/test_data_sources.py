"""Data sources: text files, the stdlib default, tfds (prepared locally), array_record; errors."""
import json
import os
import sysconfig

import numpy as np
import pytest

from sosm_jax import data
from sosm_jax.data import sources


def _cfg(**kw):
  cfg = data.default_data_config()
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _pipe(cfg, seq_len=64, batch_size=2, split="validation", **kw):
  return data.make_pipeline(cfg, data.make_tokenizer(cfg), seq_len=seq_len, batch_size=batch_size,
                            seed=0, split=split, process_index=0, process_count=1, **kw)


def _documents(pipeline, tokenizer, max_batches=100):
  """The documents of (up to max_batches of) a pipeline, decoded, split at BOS."""
  batches = [b for _, b in zip(range(max_batches), pipeline)]
  stream = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
  starts = np.flatnonzero(stream == tokenizer.bos_id)
  return [tokenizer.decode(d) for d in np.split(stream, starts[1:])]


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("mixed")
  (root / "a.txt").write_text("plain text document", encoding="utf-8")
  (root / "b.md").write_text("# a markdown document\n", encoding="utf-8")
  (root / "sub").mkdir()
  (root / "sub" / "c.py").write_text("print('python')\n", encoding="utf-8")
  (root / "empty.txt").write_bytes(b"")
  (root / "bad.txt").write_bytes(b"ok \xff\xfe then \xc3 end")  # 3 undecodable bytes
  lines = [{"text": "json line one"}, {"text": ""}, {"text": "json line two"}]
  (root / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n",
                                encoding="utf-8")
  (root / "ignored.bin").write_bytes(b"not a text extension")
  return str(root)


def test_text_source_reads_every_kind_and_counts_replacements_and_empties(mixed_dir):
  cfg = _cfg(source=f"text:{mixed_dir}", eval_source=f"text:{mixed_dir}")
  tok = data.make_tokenizer(cfg)
  pipeline = _pipe(cfg)
  docs = _documents(pipeline, tok)
  expected = {"plain text document", "# a markdown document\n", "print('python')\n",
              "ok \ufffd\ufffd then \ufffd end", "json line one", "json line two"}
  assert {d.strip("\x00") for d in docs} == expected  # (decode drops BOS/EOS)
  stats = pipeline.stats()
  assert stats["replaced_bytes"] == 3
  assert stats["empty_documents"] == 1       # the empty jsonl text, found while reading
  assert stats["empty_files_skipped"] == 1   # empty.txt, found while listing
  assert stats["documents"] == 6


def test_glob_and_single_file_sources(mixed_dir):
  listing = sources.text_documents(os.path.join(mixed_dir, "**", "*.py"), split="all",
                                   val_fraction=0.1)
  assert len(listing) == 1 and listing[0][0] == "print('python')\n"
  single = sources.text_documents(os.path.join(mixed_dir, "d.jsonl"), split="all",
                                  val_fraction=0.1)
  assert [single[i][0] for i in range(len(single))] == ["json line one", "", "json line two"]


def test_stdlib_default_is_found_at_run_time_with_a_deterministic_holdout():
  train = sources.text_documents("", split="train", val_fraction=0.02, stdlib=True)
  val = sources.text_documents("", split="validation", val_fraction=0.02, stdlib=True)
  assert train.summary["root"] == sysconfig.get_paths()["stdlib"]
  files = lambda d: {d.paths[i] for i in d.file_index}
  assert not files(train) & files(val)
  assert len(val) >= 1 and len(train) > 20 * len(val)
  assert all(p.endswith(".py") and "site-packages" not in p for p in files(train))
  again = sources.text_documents("", split="validation", val_fraction=0.02, stdlib=True)
  assert files(again) == files(val)
  text, _ = val[0]
  assert len(text) > 0


class _TinyTextBuilder:
  """Registers a tiny tfds text dataset (created lazily: tfds is imported only by this test)."""
  cls = None

  @classmethod
  def get(cls):
    if cls.cls is None:
      import tensorflow_datasets as tfds

      class SosmTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
          return tfds.core.DatasetInfo(
              builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
          return {"train": self._generate_examples(12, 0), "test": self._generate_examples(3, 100)}

        def _generate_examples(self, n, offset):
          for i in range(n):
            yield i, {"text": f"tfds document {i + offset}: " + "x" * (i + 1)}

      cls.cls = SosmTinyText
    return cls.cls


def test_tfds_source_through_a_locally_prepared_dataset(tmp_path):
  builder = _TinyTextBuilder.get()(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  cfg = _cfg(source="tfds:sosm_tiny_text", data_dir=str(tmp_path))
  tok = data.make_tokenizer(cfg)
  train_docs = _documents(_pipe(cfg, split="train", batch_size=1, seq_len=512), tok, 2)
  names = {d.split(":")[0] for d in train_docs}
  assert {f"tfds document {i}" for i in range(12)} <= names
  val_docs = _documents(_pipe(cfg), tok)  # validation: the dataset's 'test' split
  assert sorted(d.split(":")[0] for d in val_docs) == [f"tfds document {i}" for i in (100, 101,
                                                                                     102)]


def test_tfds_dataset_that_is_not_prepared_says_how_to_prepare_it(tmp_path):
  _TinyTextBuilder.get()  # registered, but nothing prepared in tmp_path
  with pytest.raises(ValueError, match="not prepared.*array_record"):
    _pipe(_cfg(source="tfds:sosm_tiny_text", data_dir=str(tmp_path)))


def test_array_record_text_and_token_records(tmp_path):
  texts = [f"record {i} " * (i + 1) for i in range(10)]
  sources.write_array_record(str(tmp_path / "t.array_record"), texts)
  cfg = _cfg(source=f"array_record:{tmp_path}/t.array_record", val_fraction=0.2,
             eval_source="")
  tok = data.make_tokenizer(cfg)
  val = _documents(_pipe(cfg), tok)
  train = _documents(_pipe(cfg, split="train", seq_len=32, batch_size=8), tok, 3)
  assert set(val) == {texts[4], texts[9]}  # every 5th record is held out
  assert set(texts) - set(val) <= set(train)

  ids = [np.arange(5 + i, dtype=np.int32) * 7 % 256 for i in range(6)]
  sources.write_array_record(str(tmp_path / "ids.array_record"), ids, record_format="int32")
  tcfg = _cfg(source=f"array_record:{tmp_path}/ids.array_record", record_format="int32")
  batch = next(_pipe(tcfg, split="train", seq_len=16, batch_size=1))
  row, seg = batch["inputs"][0], batch["segment_ids"][0]
  # Token records are used as stored (no BOS/EOS added): the row starts with whole records
  # (records are shorter than the row) and ends with the start of one.
  pieces = [row[seg == s] for s in range(1, seg.max() + 1)]
  for piece in pieces[:-1]:
    assert any(np.array_equal(piece, r) for r in ids)
  assert any(np.array_equal(pieces[-1], r[:len(pieces[-1])]) for r in ids)


@pytest.mark.parametrize("source, message", [
    ("text:/no/such/dir", "does not exist"),
    ("text:/no/such/dir/*.txt", "matched no files"),
    ("array_record:/no/such/*.array_record", "matched no files"),
    ("nonsense:abc", "not understood"),
    ("synthetic:sorting", "unknown synthetic task"),
    ("mix:stdlib=0.5,synthetic:passkey=-1", "positive"),
    ("mix:stdlib=0.5,synthetic:passkey=0", "positive"),
    ("mix:stdlib=heavy", "not a number"),
    ("mix:stdlib", "no weight"),
    ("mix:", "lists no sources"),
])
def test_bad_sources_fail_with_a_clear_error(source, message):
  with pytest.raises(ValueError, match=message):
    _pipe(_cfg(source=source), split="train")


def test_empty_source_is_an_error(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"")
  (tmp_path / "b.md").write_bytes(b"")
  with pytest.raises(ValueError, match="no documents"):
    _pipe(_cfg(source=f"text:{tmp_path}"), split="train")
  (tmp_path / "c.jsonl").write_text('{"text": ""}\n{"text": ""}\n', encoding="utf-8")
  pipeline = _pipe(_cfg(source=f"text:{tmp_path}"), split="train")
  with pytest.raises(ValueError, match="empty documents in a row"):
    next(pipeline)


def test_bad_config_values_name_their_key():
  for key, value in [("tokenizer", "wordpiece"), ("val_fraction", 1.5), ("record_format", "csv"),
                     ("num_workers", -1), ("passkey_depth", 2.0)]:
    with pytest.raises(ValueError, match=f"config.data.{key}"):
      data.validate_data_config(_cfg(**{key: value}))
  with pytest.raises(ValueError, match="task_length"):
    _pipe(_cfg(source="synthetic:copy", task_length=100), seq_len=64)


# ----------------------------------------------------------------------------- ecosystem formats

def _hf_tokenizer_dir(root):
  """A small BPE tokenizer.json trained here, with its specials named in tokenizer_config.json."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 +
                          ["hello world, hello tokenizer"] * 20, trainer)
  os.makedirs(root, exist_ok=True)
  tok.save(os.path.join(root, "tokenizer.json"))
  with open(os.path.join(root, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)
  return root


def test_hf_tokenizer_from_a_folder_or_file(tmp_path):
  import pickle
  folder = _hf_tokenizer_dir(str(tmp_path / "tok"))
  cfg = _cfg(tokenizer=f"hf:{folder}")
  data.validate_data_config(cfg)
  tok = data.make_tokenizer(cfg)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3) and tok.sep_id == tok.eos_id
  text = "the lazy fox says hello world"
  ids = tok.encode_array(text)
  assert ids.dtype == np.int32 and len(ids) < len(text) and tok.decode(ids) == text
  assert not set(tok.task_ids(16).tolist()) & {0, 1, 2, 3}
  same = data.make_tokenizer(_cfg(tokenizer=f"hf:{folder}/tokenizer.json"))
  data.check_tokenizer_identity(tok.identity(), same.identity())
  assert tok.identity()["kind"] == "hf" and len(tok.identity()["sha256"]) == 64
  assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)   # worker processes
  other = data.make_tokenizer(_cfg(tokenizer=f"hf:{_hf_tokenizer_dir(str(tmp_path / 'o'))}"))
  with open(os.path.join(str(tmp_path / "o"), "tokenizer.json"), "a") as f:
    f.write(" ")   # another file: another identity
  changed = data.make_tokenizer(_cfg(tokenizer=f"hf:{tmp_path / 'o'}"))
  with pytest.raises(ValueError, match="different tokenizer"):
    data.check_tokenizer_identity(other.identity(), changed.identity())
  with pytest.raises(ValueError, match="does not exist"):
    data.make_tokenizer(_cfg(tokenizer=f"hf:{tmp_path}/missing"))


def _parquet_files(root, texts, per_file=7):
  import pyarrow as pa
  import pyarrow.parquet as pq
  os.makedirs(root, exist_ok=True)
  for i in range(0, len(texts), per_file):
    table = pa.table({"id": list(range(i, i + len(texts[i:i + per_file]))),
                      "text": texts[i:i + per_file]})
    pq.write_table(table, os.path.join(root, f"part-{i // per_file:03d}.parquet"),
                   row_group_size=3)


def test_parquet_source_splits_reads_and_resumes(tmp_path):
  texts = [f"parquet document {i} " + "x" * (i % 5) for i in range(40)]
  _parquet_files(str(tmp_path / "pq"), texts)
  src = f"parquet:{tmp_path}/pq/*.parquet"
  comp = sources.parse_source(src)[0]
  cfg = _cfg(source=src, val_fraction=0.2)
  train = sources.open_documents(comp, cfg, "train")
  val = sources.open_documents(comp, cfg, "validation")
  got = [train[i][0] for i in range(len(train))] + [val[i][0] for i in range(len(val))]
  assert sorted(got) == sorted(texts) and 0 < len(val) < 20 and train.summary["files"] == 6
  tok = data.make_tokenizer(cfg)
  assert set(_documents(_pipe(cfg), tok)) == {val[i][0] for i in range(len(val))}
  p = _pipe(cfg, split="train", seq_len=16, batch_size=2)
  _ = [next(p) for _ in range(3)]
  state = json.loads(json.dumps(p.get_state()))
  expected = [next(p) for _ in range(4)]
  resumed = _pipe(cfg, split="train", seq_len=16, batch_size=2, start_state=state)
  for a, b in zip(expected, [next(resumed) for _ in range(4)]):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  with pytest.raises(ValueError, match="not 'body'"):
    sources.open_documents(comp, _cfg(source=src, text_field="body"), "train")


def _hf_dataset(folder, texts):
  """A folder laid out as `datasets.Dataset.save_to_disk` writes it (Arrow stream files)."""
  import pyarrow as pa
  os.makedirs(folder, exist_ok=True)
  files = []
  for i, chunk in enumerate([texts[:len(texts) // 2], texts[len(texts) // 2:]]):
    name = f"data-{i:05d}-of-00002.arrow"
    table = pa.table({"text": chunk, "n": list(range(len(chunk)))})
    with pa.ipc.new_stream(os.path.join(folder, name), table.schema) as writer:
      writer.write_table(table)
    files.append({"filename": name})
  with open(os.path.join(folder, "state.json"), "w") as f:
    json.dump({"_data_files": files, "_split": None}, f)
  with open(os.path.join(folder, "dataset_info.json"), "w") as f:
    json.dump({"features": {"text": {"dtype": "string", "_type": "Value"}}}, f)


def test_hf_saved_dataset_and_dataset_dict(tmp_path):
  texts = [f"hf row {i}" for i in range(30)]
  _hf_dataset(str(tmp_path / "ds"), texts)
  cfg = _cfg(source=f"hf:{tmp_path}/ds", val_fraction=0.2)
  comp = sources.parse_source(cfg.source)[0]
  train = sources.open_documents(comp, cfg, "train")
  val = sources.open_documents(comp, cfg, "validation")
  assert sorted([train[i][0] for i in range(len(train))] + [val[i][0] for i in range(len(val))]) \
      == sorted(texts)
  import pickle
  clone = pickle.loads(pickle.dumps(train))   # worker processes re-open the memory map
  assert clone[len(train) - 1] == train[len(train) - 1]
  # A DatasetDict: its own splits.
  _hf_dataset(str(tmp_path / "dd" / "train"), texts[:20])
  _hf_dataset(str(tmp_path / "dd" / "test"), texts[20:])
  with open(tmp_path / "dd" / "dataset_dict.json", "w") as f:
    json.dump({"splits": ["train", "test"]}, f)
  dcfg = _cfg(source=f"hf:{tmp_path}/dd")
  tok = data.make_tokenizer(dcfg)
  assert sorted(_documents(_pipe(dcfg), tok)) == sorted(texts[20:])
  assert len(sources.open_documents(sources.parse_source(dcfg.source)[0], dcfg, "train")) == 20
  with pytest.raises(ValueError, match="save_to_disk"):
    sources.open_documents(sources.parse_source(f"hf:{tmp_path}")[0], dcfg, "train")
