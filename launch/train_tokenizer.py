"""Train a SentencePiece tokenizer on any text source, locally.

    python launch/train_tokenizer.py --source=text:/data/books --output=tokenizers/books8k \
        --vocab_size=8000 [--model_type=unigram|bpe] [--max_bytes=200000000]

Reads the training split of the source (the same source strings as config.data.source: '' for
the standard library, text:, tfds:, array_record: with text records, or a mix: of them), writes
OUTPUT.model and OUTPUT.vocab, and prints the setting to train with:
--config.data.tokenizer=sentencepiece:OUTPUT.model (and model.vocab_size at least the printed size).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top

from sosm_jax.data import config as data_config
from sosm_jax.data import sources, tokenizers

_SOURCE = flags.DEFINE_string("source", "", "Text source ('' = the Python standard library).")
_OUTPUT = flags.DEFINE_string("output", None, "Output prefix: writes PREFIX.model, PREFIX.vocab.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8000, "Number of pieces (at least ~300: byte "
                              "fallback adds 256 byte pieces).")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "Algorithm.")
_MAX_BYTES = flags.DEFINE_integer("max_bytes", 200_000_000, "Stop reading text after this much.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds data_dir.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Field of .jsonl lines / tfds examples.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = data_config.default_data_config()
  cfg.source, cfg.data_dir, cfg.text_field = _SOURCE.value, _DATA_DIR.value, _TEXT_FIELD.value
  data_config.validate_data_config(cfg)
  texts = sources.iter_texts(cfg.source, cfg, split="train")
  path = tokenizers.train_sentencepiece(texts, _OUTPUT.value, vocab_size=_VOCAB.value,
                                        model_type=_MODEL_TYPE.value, max_bytes=_MAX_BYTES.value)
  tok = tokenizers.SentencePieceTokenizer(path)
  print(f"wrote {path} ({tok.vocab_size} pieces, sha256 {tok.sha256[:12]}); train with "
        f"--config.data.tokenizer=sentencepiece:{path} --config.model.vocab_size={tok.vocab_size}",
        flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("output")
  app.run(main)
