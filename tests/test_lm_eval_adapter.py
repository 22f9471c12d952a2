"""lm-evaluation-harness driving a tiny checkpoint: log-likelihoods equal the model's own log-probs,
rolling windows, generate_until stops at its stop string, a local YAML task through the Python
API and through launch/lm_harness.py. Skips without the eval extra (pip install -e ".[eval]")."""
import importlib.util
import json
import os
import subprocess
import sys

if importlib.util.find_spec("lm_eval") is not None:  # before `datasets` is imported
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: no hub look-ups
  os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

lm_eval = pytest.importorskip(
    "lm_eval", reason="needs lm-eval (the eval extra): pip install -e \".[eval]\"")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from sosm_jax import models  # noqa: E402
from sosm_jax.data.tokenizers import ByteTokenizer  # noqa: E402
from sosm_jax.eval import lm_harness  # noqa: E402
from sosm_jax.train import checkpoint as ckpt_lib  # noqa: E402
from sosm_jax.train import config as config_lib  # noqa: E402
from sosm_jax.train.state import TrainState  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compiles")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()
# Batched and right-padded rows vs one unpadded forward pass, float32: sums of a few dozen
# log-probs agree to this (measured on CPU: <= 1e-6).
ATOL, RTOL = 1e-4, 1e-5


def _config():
  c = config_lib.base_config()
  c.model.update(architecture="hybrid", pattern=("gdn", "attn"), num_layers=2, d_model=32,
                 mlp_dim=64, vocab_size=260, attn_num_heads=2, attn_num_kv_heads=1,
                 attn_head_dim=16, gdn_num_heads=2, gdn_head_dim=16, chunk_size=8,
                 dtype="float32")
  c.curriculum.update(seq_lens=(64,), steps=(1,), tokens_per_step=128)
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, model, params) of a tiny GDN + attention checkpoint with random weights."""
  config = _config()
  model = models.build_model(config.model)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), 1, 8)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  zero = np.zeros((), np.int32)
  state = TrainState(step=np.int32(2), params=params, opt_state={"mu": params},
                     nonfinite_streak=zero, nonfinite_total=zero)
  workdir = str(tmp_path_factory.mktemp("lmeval") / "run")
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(2, state, {"config": config.to_dict(), "data_state": None, "stage": 0,
                       "tokenizer": TOK.identity()}, wait=True)
  ckpt.close()
  return workdir, model, jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def lm(run):
  return lm_harness.SosmJaxLM(workdir=run[0], batch_size=4, prefill_chunk=16)


@pytest.fixture(scope="module")
def apply(run):
  return jax.jit(run[1].apply)


def _direct(apply, params, tokens, scored):
  """Sum of log p(tokens[t] | tokens[:t]) over the last `scored` tokens, and all-argmax: one
  unpadded forward pass of the model."""
  logits = np.asarray(apply(params, jnp.asarray([tokens[:-1]], jnp.int32))[0], np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  n = len(tokens) - 1
  rows = np.arange(n - scored, n)
  targets = np.asarray(tokens[1:])[rows]
  return float(logp[rows, targets].sum()), bool((logits[rows].argmax(-1) == targets).all())


def _requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_is_the_models_own_log_prob(run, lm, apply):
  params = run[2]
  # Empty context, trailing spaces moved to the continuation, a row cut on the left; the other
  # rows are 23 tokens long, so that the reference compiles twice only.
  pairs = [("The cat sat on the", " mat"), ("", "hello there, world! hi"),
           ("Numbers: 1 2 3 4 5 ", "6 7"), ("a" * 90, " tail that is cut on the left"),
           ("x", "y" * 21)]
  got = lm.loglikelihood(_requests("loglikelihood", pairs))
  assert lm.max_length == 64  # the trained length
  for (context, continuation), (logprob, greedy) in zip(pairs, got):
    ctx = context.rstrip()
    cont = context[len(ctx):] + continuation
    tokens = ([TOK.bos_id] + TOK.encode(ctx) + TOK.encode(cont))[-65:]
    want, want_greedy = _direct(apply, params, tokens, len(TOK.encode(cont)))
    assert logprob == pytest.approx(want, abs=ATOL, rel=RTOL), (context, continuation)
    assert greedy == want_greedy and logprob < 0


def test_rolling_loglikelihood_sums_disjoint_windows(run, lm, apply):
  params = run[2]
  short, long = "A short document, here", "".join(chr(97 + i % 26) for i in range(150))
  got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,), (long,)]))
  ids = TOK.encode(short)
  assert got[0] == pytest.approx(_direct(apply, params, [TOK.bos_id] + ids, len(ids))[0],
                                 abs=ATOL, rel=RTOL)
  # 150 tokens, windows of 64 inputs: [0, 64) after BOS, [64, 128) after token 63, and the last
  # 22 with the rest of a full window before them as context.
  ids = TOK.encode(long)
  want = _direct(apply, params, [TOK.bos_id] + ids[:64], 64)[0]
  want += _direct(apply, params, ids[63:128], 64)[0]
  want += _direct(apply, params, ids[85:150], 22)[0]
  assert got[1] == pytest.approx(want, abs=ATOL, rel=RTOL)


def test_generate_until_is_greedy_and_stops_at_the_stop_string(run, lm):
  _, model, params = run
  prompts = ["Once upon a time", "The answer is 42", "abcdefghijklmnop"]  # one length
  free = lm.generate_until(_requests("generate_until", [
      (p, {"until": [], "max_gen_toks": 20, "do_sample": False}) for p in prompts]))
  ids = jnp.asarray([[TOK.bos_id] + TOK.encode(p) for p in prompts])
  reference = np.asarray(model.generate(params, ids, jax.random.key(0), 20))[:, ids.shape[1]:]
  for text, out in zip(free, reference):  # the serving engine's greedy text is generate()'s
    out = list(out)
    out = out[:out.index(TOK.eos_id)] if TOK.eos_id in out else out
    assert text == TOK.decode(out)
  # A stop string that first occurs inside the free text cuts it right there.
  cases = []
  for p, text in zip(prompts, free):
    for i in range(2, len(text)):
      if text[i] != "\ufffd" and text[i] not in text[:i]:
        cases.append((p, text[i], text[:i]))
        break
  assert cases, f"no usable stop character in {free}"
  stopped = lm.generate_until(_requests("generate_until", [
      (p, {"until": [stop, "never-there"], "max_gen_toks": 20}) for p, stop, _ in cases]))
  assert stopped == [want for _, _, want in cases]


def _write_tasks(tmp_path):
  """Three local tasks (multiple choice, generation, rolling) over jsonl files, no download."""
  data = tmp_path / "data"
  data.mkdir()
  # Rows of 17-32 tokens and prompts of 16 characters: the shapes compiled by the tests above.
  mc = [{"question": "Roses are red, violets are", "choices": ["blue", "tall"], "answer": 0},
        {"question": "One, two, three, four,", "choices": ["five", "six", "ten"], "answer": 0},
        {"question": "It goes up and then", "choices": ["down", "away", "over"], "answer": 1}]
  gen = [{"prompt": "Say something: x", "target": "x"}, {"prompt": "Count 1 2 3 4 5 ", "target": "6"}]
  text = [{"text": "A local document for perplexity. " * 5}]
  for name, rows in (("mc", mc), ("gen", gen), ("text", text)):
    with open(data / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
            "  cache_dir: {cache}\ntest_split: test\n")
  specs = {
      "tiny_mc": ("mc", "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                  "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                  "metric_list:\n  - metric: acc\n"),
      "tiny_gen": ("gen", "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
                   "doc_to_target: '{{target}}'\ngeneration_kwargs:\n  until: ['e']\n"
                   "  max_gen_toks: 20\n  do_sample: false\n"
                   "metric_list:\n  - metric: exact_match\n"),
      "tiny_ppl": ("text", "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                   "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"),
  }
  for task, (name, body) in specs.items():
    head = common.format(path=data / f"{name}.jsonl", cache=tmp_path / "hf_cache")
    (tasks / f"{task}.yaml").write_text(f"task: {task}\n" + head + body)
  return tasks, mc, gen


def test_local_tasks_through_the_python_api(lm, tmp_path):
  """The harness's requests reach the adapter unchanged (the adapter is held to the model
  above): its scores for the same (context, continuation), its generated text, its acc."""
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  tasks, mc, gen_docs = _write_tasks(tmp_path)
  out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_gen", "tiny_ppl"],
                                log_samples=True, task_manager=TaskManager(include_path=str(tasks)))
  samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
  pairs = [(doc["question"], " " + c) for doc in mc for c in doc["choices"]]
  mine = iter(lm.loglikelihood(_requests("loglikelihood", pairs)))
  hits = []
  for sample, doc in zip(samples, mc):
    scores = [float(resp[0][0]) for resp in sample["resps"]]
    assert scores == pytest.approx([next(mine)[0] for _ in doc["choices"]], abs=1e-6)
    hits.append(int(np.argmax(scores)) == doc["answer"])
  assert len(hits) == 3 and out["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(hits))
  gen = sorted(out["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
  texts = [s["resps"][0][0] for s in gen]
  again = lm.generate_until(_requests("generate_until", [
      (d["prompt"], {"until": ["e"], "max_gen_toks": 20}) for d in gen_docs]))
  assert texts == again and not any("e" in t for t in texts)
  assert out["results"]["tiny_ppl"]["word_perplexity,none"] > 1.0


def test_command_line_runs_a_local_task(run, tmp_path):
  tasks, _, _ = _write_tasks(tmp_path)
  out = tmp_path / "results"
  cmd = [sys.executable, os.path.join(ROOT, "launch", "lm_harness.py"), "run", "--model",
         "sosm_jax", "--model_args", f"workdir={run[0]},max_length=48", "--tasks", "tiny_mc",
         "--include_path", str(tasks), "--batch_size", "4", "--output_path", str(out)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith(".json")]
  assert files, proc.stdout[-2000:]
  with open(files[0]) as f:
    result = json.load(f)
  assert 0.0 <= result["results"]["tiny_mc"]["acc,none"] <= 1.0
  assert result["config"]["model_args"]["max_length"] == 48


def test_bad_model_args_are_named(run):
  with pytest.raises(ValueError, match=r"unknown model_args \['temprature'\]"):
    lm_eval.api.registry.get_model("sosm_jax").create_from_arg_string(
        f"workdir={run[0]},temprature=0")
  with pytest.raises(ValueError, match="max_gen_toks"):
    lm_harness.SosmJaxLM(workdir=run[0], max_gen_toks=64)
  with pytest.raises(ValueError, match="batch_size"):
    lm_harness.SosmJaxLM(workdir=run[0], batch_size="many")
  assert lm_harness.pad_length(17, 64) == 32 and lm_harness.pad_length(3, 64) == 16
  assert lm_harness.pad_length(100, 64) == 64
