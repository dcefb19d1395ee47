"""Scoring in chunks (decode.chunked_scores, engine.score, the score CLI): logits and log-softmax a few
positions at a time, long texts through the KV cache chunk after chunk; equal to the straightforward
computation (log-softmax of the full forward's logits), and memory that does not grow with tokens x vocab."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma_jax as gj
from gemma_jax import cache as gcache
from gemma_jax import decode, engine
from gemma_jax.configs import TINY_PRESETS
from gemma_jax.transformer import flat_params, set_flat_params

REPO = pathlib.Path(__file__).parent.parent


def straightforward(model, ids) -> np.ndarray:
  """log p(ids[t+1] | ids[:t+1]) from log-softmax of the full forward's (T, V) logits, in float64 (64 rows
  at a time: a 256k vocabulary's float64 rows are 2 MiB each)."""
  logits, out = model.logits(ids)[:-1], []
  for start in range(0, len(logits), 64):
    x = np.asarray(logits[start:start + 64], np.float64)
    top = x.max(-1, keepdims=True)
    logp = x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))
    out.append(logp[np.arange(len(x)), ids[start + 1:start + 1 + len(x)]])
  return np.concatenate(out)


# The default suite runs one family (Gemma 3: QK-norm, local and global layers); the others are slow-marked.
FAMILIES = [pytest.param(n, marks=() if n == "tiny_gemma3_qk" else pytest.mark.slow) for n in sorted(TINY_PRESETS)]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
  """A tiny model whose every param is random (std 0.3): peaked distributions, so no mechanism hides."""
  model = gj.Model.random(TINY_PRESETS[request.param], seed=5)
  rng = np.random.default_rng(5)
  flat = flat_params(model.params)
  set_flat_params(model.params, {p: jnp.asarray(0.3 * rng.standard_normal(flat[p].shape), flat[p].dtype)
                                 for p in sorted(flat)})
  return model


def test_chunked_scoring_equals_the_straightforward_computation(tiny, monkeypatch):
  """Every tiny family, 45 ids (9x the window of 5): logits 7 positions at a time, and the text through the
  cache in chunks of 8 (the default path past SCORE_CHUNK) and of 3, against log-softmax of the full logits."""
  ids = [2] + np.random.default_rng(0).integers(3, 251, size=44).tolist()
  want = straightforward(tiny, ids)
  monkeypatch.setattr(decode, "SCORE_ROWS", 7)
  decoder = dataclasses.replace(tiny.decoder, capacity=13)  # a new static self: traced with SCORE_ROWS 7
  monkeypatch.setattr(gj.Model, "decoder", property(lambda self: decoder))
  np.testing.assert_allclose(tiny.logprobs(ids), want, rtol=0, atol=1e-4)  # one forward
  monkeypatch.setattr(engine, "SCORE_CHUNK", 8)
  np.testing.assert_allclose(tiny.logprobs(ids), want, rtol=0, atol=1e-4)  # through the cache, 8 per call
  np.testing.assert_allclose(tiny.logprobs(ids, chunk=3), want, rtol=0, atol=1e-4)


def test_no_scoring_program_holds_its_logits():
  """token_logprobs, score (evaluation) and score_chunk (1024 positions, vocabulary 65536: 256 MiB of float32 logits) hold one
  chunk of SCORE_ROWS logit rows in their compiled temporaries; the unchunked computation holds them all."""
  config = dataclasses.replace(TINY_PRESETS["tiny_gemma3_qk"], vocab_size=65536)
  model = gj.Model.random(config)
  t, v, d = 1024, config.vocab_size, model.decoder
  tokens, positions = jnp.zeros((1, t), jnp.int32), jnp.arange(t, dtype=jnp.int32)[None]
  temp = lambda compiled: compiled.memory_analysis().temp_size_in_bytes

  @jax.jit
  def unchunked(params, tokens, positions):
    m = nnx.merge(d.graphdef, params)
    return m.token_logprobs(m(tokens, positions).hidden[:, :-1], tokens[:, 1:])

  assert temp(unchunked.lower(model.params, tokens, positions).compile()) >= (t - 1) * v * 4  # the measure sees them
  assert temp(d.token_logprobs.lower(d, model.params, tokens, positions).compile()) < t * v * 4 / 2
  at, targets = jnp.arange(t - 1, dtype=jnp.int32)[None], jnp.zeros((1, t - 1), jnp.int32)  # evaluate.py's path
  assert temp(d.score.lower(d, model.params, tokens, positions, at, targets).compile()) < t * v * 4 / 2
  # score_chunk's temporaries also hold the chunk's attention to the cache, (T, S) per head: what grows with
  # the vocabulary must stay below half the logits.
  def chunk_temp(model):
    d, cache = model.decoder, gcache.init_cache(model.config, 1, t)
    return temp(d.score_chunk.lower(d, model.params, tokens, positions, tokens, cache).compile())

  small = gj.Model.random(dataclasses.replace(config, vocab_size=256))
  assert chunk_temp(model) - chunk_temp(small) < t * v * 4 / 2


# ---- the real 270M: a 16K-token text ----

def long_ids(tokenizer, n: int) -> list[int]:
  """n ids (BOS first) of English text: the held-out text, then a long generated log of varied lines."""
  sys.path.insert(0, str(REPO / "benchmarks"))
  from bench_sample import long_text  # noqa: E402

  text = (REPO / "tests" / "data" / "heldout_en.txt").read_text(encoding="utf-8") + "\n\n" + long_text(days=300)
  ids = tokenizer.encode(text)
  assert len(ids) >= n, len(ids)
  return ids[:n]


LONG = 16384  # tokens scored: 16383 log-probs
# Peak RSS of the scoring process beyond its runtime (RSS after `import gemma_jax` and the first device
# call) + the float32 params + the KV cache: the loader's own buffers and Orbax/tensorstore (measured
# 0.28 GiB), XLA's compile-time memory and the programs (0.2 GiB), one chunk's attention to a 16K cache
# and SCORE_ROWS rows of logits (0.36 GiB, compiled temporaries). Measured: 0.79 GiB (README, "Long texts").
BOUND = 1.25 * 2**30

SCRIPT = r"""
import json, sys
import jax
import numpy as np
import gemma_jax as gj
from gemma_jax import cache as gcache
jax.devices()
with open("/proc/self/status") as f:
  base = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
ids = json.load(open(sys.argv[2]))
model = gj.load(sys.argv[1], dtype="float32")
lp = model.logprobs(ids)
np.save(sys.argv[3], lp)
params = sum(int(x.nbytes) for x in jax.tree.leaves(model.params))
cache = gcache.cache_bytes(model.config, 1, len(ids), "float32")
# VmHWM, this process image's own high-water mark: ru_maxrss would also count the parent's, which Linux
# carries across the (v)fork + exec that started this process (a pytest worker of several GiB).
with open("/proc/self/status") as f:
  peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({"base": base, "params": params, "cache": cache, "peak": peak}))
"""


@pytest.mark.slow
def test_a_16k_token_text_scores_in_bounded_memory_and_equals_the_straightforward_computation(
    model_270m, ckpt_270m, tmp_path):
  ids = long_ids(model_270m.tokenizer, LONG)
  (tmp_path / "ids.json").write_text(json.dumps(ids))
  # In a fresh process, so its RSS high-water mark is the scoring's alone: the default path, through the
  # cache SCORE_CHUNK tokens per call.
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt_270m), str(tmp_path / "ids.json"),
                        str(tmp_path / "lp.npy")], capture_output=True, text=True, timeout=3000,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert out.returncode == 0, out.stderr[-3000:]
  m = json.loads(out.stdout.strip().splitlines()[-1])
  lp = np.load(tmp_path / "lp.npy")
  assert lp.shape == (LONG - 1,) and np.all(np.isfinite(lp))
  over = m["peak"] - m["base"] - m["params"] - m["cache"]
  assert over < BOUND, f"peak {m['peak'] / 2**30:.2f} GiB = runtime {m['base'] / 2**30:.2f} + params + cache + " \
                       f"{over / 2**30:.2f} GiB, over the bound {BOUND / 2**30:.2f}"
  # Where both fit: the first 768 tokens against log-softmax of the full forward's logits (causal, so the
  # long text's first scores are the prefix's; past 512 they came through the cache).
  np.testing.assert_allclose(lp[:767], straightforward(model_270m, ids[:768]), rtol=0, atol=1e-4)
  # The whole text cut differently (2048 tokens per call: other chunk boundaries, other splits of each
  # softmax between cache and chunk): the same log-probs at every position.
  np.testing.assert_allclose(model_270m.logprobs(ids, chunk=2048), lp, rtol=0, atol=1e-4)
  assert -lp.mean() < 4  # a sane NLL all the way (a model lost past its window scores ~10 nats)
