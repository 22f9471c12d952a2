"""Data pipeline: packing exactness, determinism, resume, curriculum rebuild, sharding, splits."""
import json
import os

import grain
import numpy as np
import pytest

from sosm_jax import data
from sosm_jax.data.packing import Doc, PackIterDataset, rows_to_batch

BATCH_KEYS = {"inputs", "targets", "loss_mask", "segment_ids", "positions"}


def _cfg(**kw):
  cfg = data.default_data_config()
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _pipe(cfg, seq_len=64, batch_size=4, seed=0, split="train", index=0, count=1, state=None):
  return data.make_pipeline(cfg, data.make_tokenizer(cfg), seq_len=seq_len, batch_size=batch_size,
                            seed=seed, split=split, process_index=index, process_count=count,
                            start_state=state)


def _take(pipeline, n):
  return [next(pipeline) for _ in range(n)]


def _same(batches_a, batches_b):
  return len(batches_a) == len(batches_b) and all(
      np.array_equal(a[k], b[k]) for a, b in zip(batches_a, batches_b) for k in BATCH_KEYS)


def _stream(batches):
  """Concatenated non-padding input tokens of all rows, in order."""
  return np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  """30 small documents of varied lengths (some longer than a row)."""
  root = tmp_path_factory.mktemp("texts")
  rng = np.random.default_rng(0)
  for i in range(30):
    words = " ".join(f"w{i}_{j}" for j in range(int(rng.integers(1, 60))))
    (root / f"doc{i:02d}.txt").write_text(f"<{i}> {words}\n", encoding="utf-8")
  return str(root)


def _random_docs(seed, n=60):
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(n):
    atomic = bool(rng.uniform() < 0.25)
    length = int(rng.integers(1, 30 if atomic else 120))
    tokens = rng.integers(0, 250, length).astype(np.int32)
    mask = (rng.uniform(size=length) < 0.3).astype(np.uint8) if atomic else None
    docs.append(Doc(tokens, mask=mask, atomic=atomic))
  return docs


def test_packing_loses_and_duplicates_no_token_and_sets_segments():
  docs = _random_docs(1)
  seq_len, pad = 32, 256
  rows = list(PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(),
                              seq_len=seq_len, pad_id=pad))
  tok = np.stack([r["tokens"] for r in rows])
  seg = np.stack([r["segment_ids"] for r in rows])
  pos = np.stack([r["positions"] for r in rows])
  # Inputs (first seq_len tokens, padding removed) are exactly the documents, in order.
  inputs, in_seg = tok[:, :seq_len], seg[:, :seq_len]
  np.testing.assert_array_equal(inputs[in_seg > 0], np.concatenate([d.tokens for d in docs]))
  # The look-ahead token of each full row is the next row's first token.
  full = in_seg[:-1].min(axis=1) > 0
  np.testing.assert_array_equal(tok[:-1, seq_len][full], tok[1:, 0][full])
  # Walk the rows: each piece is a run of one segment id, ids 1.. in order, positions 0.. in it.
  pieces = []
  for r in range(len(rows)):
    ids = in_seg[r][in_seg[r] > 0]
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
    assert np.all(in_seg[r][len(ids):] == 0)  # padding only at the end of a row
    for s in range(1, ids.max() + 1):
      where = np.flatnonzero(in_seg[r] == s)
      np.testing.assert_array_equal(pos[r, where], np.arange(len(where)))
      pieces.append((r, inputs[r, where]))
  # Pieces regroup into the documents; atomic documents are never split across rows.
  k = 0
  for d in docs:
    got = []
    while sum(map(len, got)) < len(d.tokens):
      got.append(pieces[k][1])
      k += 1
    np.testing.assert_array_equal(np.concatenate(got), d.tokens)
    if d.atomic:
      assert len(got) == 1
  assert k == len(pieces)


def test_rows_to_batch_scores_only_answers_and_same_document_targets():
  docs = _random_docs(2)
  rows = list(PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=30,
                              pad_id=256))
  stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  batch = rows_to_batch(stacked, batch_size=len(rows) + 2, separate_documents=True, pad_id=256)
  assert batch["inputs"].shape == (len(rows) + 2, 30)
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
  assert batch["loss_mask"][-2:].sum() == 0 and (batch["segment_ids"][-2:] == 0).all()
  # Scored targets: text tokens and the marked task answers, within one document only.
  stream_tokens = np.concatenate([d.tokens for d in docs])
  stream_mask = np.concatenate([d.mask if d.mask is not None else np.ones(len(d.tokens), np.uint8)
                                for d in docs])
  first_of_doc = np.zeros(len(stream_tokens), bool)
  first_of_doc[np.cumsum([0] + [len(d.tokens) for d in docs[:-1]])] = True
  scored = (stream_mask > 0) & ~first_of_doc
  # Every scored stream token is the target of exactly one position with loss_mask = 1.
  assert int(batch["loss_mask"].sum()) == int(scored.sum())
  np.testing.assert_array_equal(np.sort(batch["targets"][batch["loss_mask"] > 0]),
                                np.sort(stream_tokens[scored]))
  joined = rows_to_batch(stacked, batch_size=len(rows), separate_documents=False, pad_id=256)
  valid = joined["segment_ids"] > 0
  assert set(np.unique(joined["segment_ids"])) <= {0, 1}
  np.testing.assert_array_equal(joined["positions"][valid],
                                np.nonzero(valid)[1].astype(np.int32))


def test_same_seed_same_batches_and_other_seed_differs():
  cfg = _cfg()  # the built-in stdlib source
  a, b, c = _pipe(cfg, seed=3), _pipe(cfg, seed=3), _pipe(cfg, seed=4)
  first = _take(a, 3)
  assert set(first[0]) == BATCH_KEYS
  for k in BATCH_KEYS:
    assert first[0][k].shape == (4, 64)
  assert first[0]["inputs"].dtype == np.int32 and first[0]["loss_mask"].dtype == np.float32
  assert _same(first, _take(b, 3))
  assert not _same(first, _take(c, 3))
  for p in (a, b, c):
    p.close()


def test_resume_continues_with_the_exact_next_batch():
  cfg = _cfg(source="mix:stdlib=0.6,synthetic:passkey=0.2,synthetic:mqar=0.2", mqar_num_pairs=4,
             task_length=48)
  p = _pipe(cfg, seed=7)
  _take(p, 5)
  state = json.loads(json.dumps(p.get_state()))  # the checkpoint holds it as JSON
  expected = _take(p, 6)
  resumed = _pipe(cfg, seed=7, state=state)
  assert _same(expected, _take(resumed, 6))
  p.set_state(state)  # rewinding the live pipeline works too
  assert _same(expected, _take(p, 6))
  assert p.stats()["documents"] > 0
  for q in (p, resumed):
    q.close()


def test_new_seq_len_continues_the_token_stream(text_dir):
  cfg = _cfg(source=f"text:{text_dir}")
  reference = _stream(_take(_pipe(cfg, seq_len=32, batch_size=2, seed=1), 12))
  first = _pipe(cfg, seq_len=32, batch_size=2, seed=1)
  part1 = _take(first, 5)
  # The next curriculum stage: longer rows, smaller batch, same position in the data.
  second = _pipe(cfg, seq_len=48, batch_size=1, seed=1, state=first.get_state())
  part2 = _take(second, 6)
  assert part2[0]["inputs"].shape == (1, 48)
  stream = np.concatenate([_stream(part1), _stream(part2)])
  np.testing.assert_array_equal(stream, reference[:len(stream)])


def test_state_of_another_source_or_process_count_is_refused(text_dir):
  cfg = _cfg(source=f"text:{text_dir}")
  state = _pipe(cfg).get_state()
  with pytest.raises(ValueError, match="source"):
    _pipe(_cfg(), state=state)
  with pytest.raises(ValueError, match="process_count"):
    _pipe(cfg, index=0, count=2, state=state)


def test_processes_read_disjoint_documents_covering_the_split(text_dir):
  cfg = _cfg(source=f"text:{text_dir}", val_fraction=0.3)
  tok = data.make_tokenizer(cfg)

  def docs_of(**kw):
    batches = list(_pipe(cfg, seq_len=40, batch_size=2, split="validation", **kw))
    stream = _stream(batches)
    return {tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == tok.bos_id)[1:])}

  everything = docs_of(index=0, count=1)
  p0, p1 = docs_of(index=0, count=2), docs_of(index=1, count=2)
  assert p0 and p1 and not p0 & p1
  assert p0 | p1 == everything


def test_validation_is_held_out_finite_and_padded(text_dir):
  cfg = _cfg(source=f"text:{text_dir}", val_fraction=0.2)
  tok = data.make_tokenizer(cfg)
  val = list(_pipe(cfg, seq_len=40, batch_size=3, split="validation"))
  train = _take(_pipe(cfg, seq_len=40, batch_size=3, split="train", seed=5), 80)
  for batch in val:
    assert batch["inputs"].shape == (3, 40)
  assert (val[-1]["segment_ids"] == 0).any()  # the last batch is filled up with padding

  def doc_names(batches):
    text = tok.decode(_stream(batches))
    return {w.split(">")[0] for w in text.split("<")[1:]}

  val_docs, train_docs = doc_names(val), doc_names(train)
  assert val_docs and train_docs and not val_docs & train_docs
  assert len(val_docs) + len(train_docs) == 30
  assert val_docs == doc_names(list(_pipe(cfg, seq_len=40, batch_size=3, split="validation")))


def test_separate_documents_off_gives_one_segment_per_row(text_dir):
  batch = next(_pipe(_cfg(source=f"text:{text_dir}", separate_documents=False), seq_len=64))
  assert (batch["segment_ids"] == 1).all()
  np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(64), (4, 64)))
  assert batch["loss_mask"].all()  # across document boundaries too


def test_worker_processes_match_threads_and_resume(text_dir):
  threads = _take(_pipe(_cfg(source=f"text:{text_dir}"), seq_len=32, batch_size=2, seed=2), 6)
  p = _pipe(_cfg(source=f"text:{text_dir}", num_workers=1), seq_len=32, batch_size=2, seed=2)
  # One worker reads the same documents in the same order as the in-process pipeline.
  assert _same(_take(p, 3), threads[:3])
  state = json.loads(json.dumps(p.get_state()))
  assert _same(_take(p, 3), threads[3:])
  p.set_state(state)
  assert _same(_take(p, 3), threads[3:])
  p.close()
