"""GPTQ (gptq.py): with nothing to spread it is exactly qarray.quantize; on correlated inputs it lowers the
output error; the Hessians are the inputs' x^T x; calibrated models and checkpoints; the named errors.

The real 270M's quality with GPTQ: benchmarks/bench_quantize.py (README "Quantization").
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma_jax as gj
from gemma_jax import checkpoint, gptq, qarray
from gemma_jax.convert.__main__ import main as convert_main
from gemma_jax.errors import GemmaError
from gemma_jax.quantize import quantized_weights
from gemma_jax.transformer import flat_params
from test_quantize import IDS, QCFG, qmodel, run, save_model

# (shape, contract): a leading contraction (q_einsum's D, N, H), two leading dims (attn_vec's N, H, D) and
# a trailing one (gating's F, 2, D).
LAYOUTS = [((64, 2, 32), 1), ((2, 32, 64), 2), ((48, 2, 64), -1)]


@pytest.mark.parametrize("shape,contract", LAYOUTS)
@pytest.mark.parametrize("scheme,block", [("int4", 32), ("int4", 64), ("int4-sym", 32), ("int8", None),
                                          ("int8", 32)])
def test_identity_hessian_is_round_to_nearest(shape, contract, scheme, block):
  # H = I: every entry's error spreads over the others with weight 0, so GPTQ must store exactly what
  # qarray.quantize stores (values, scale and offset, bit for bit).
  w = jax.random.normal(jax.random.key(0), shape) * 0.05
  c = qarray.contracted_size(shape, contract)
  got = gptq.quantize_weight(w, np.eye(c), contract, scheme, block)
  want = qarray.quantize(w, contract, scheme, block)
  for g, e in zip(got, want):
    if e is None:
      assert g is None
      continue
    assert g.dtype == e.dtype and g.shape == e.shape
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(e, np.float32))


def correlated_inputs(c: int, t: int = 2048, seed: int = 1, rows_seed: int | None = None) -> np.ndarray:
  """(t, c) inputs with strongly correlated entries and uneven magnitudes, like a model's activations: the
  distribution fixed by `seed`, the rows drawn from rows_seed (default: seed)."""
  rng = np.random.default_rng(seed)
  mix = 3 * rng.normal(size=(c, c)) / np.sqrt(c) + np.eye(c)
  scale = rng.uniform(0.2, 3.0, size=c)
  rows = np.random.default_rng(seed if rows_seed is None else rows_seed).normal(size=(t, c))
  return (rows @ mix) * scale


@pytest.mark.parametrize("shape,contract", LAYOUTS)
@pytest.mark.parametrize("scheme", ["int4", "int4-sym"])
def test_gptq_lowers_the_output_error(shape, contract, scheme):
  w = np.asarray(jax.random.normal(jax.random.key(2), shape) * 0.05)
  c = qarray.contracted_size(shape, contract)
  x = correlated_inputs(c)
  v, s, m = qarray.quantize(w, contract, scheme, 32)
  rtn = np.asarray(qarray.dequantize(v, s, contract, jnp.float32, m))
  v, s, m = gptq.quantize_weight(w, x.T @ x, contract, scheme, 32)
  ours = np.asarray(qarray.dequantize(v, s, contract, jnp.float32, m))
  e_rtn, e_gptq = (gptq.output_error(w, q, x, contract) for q in (rtn, ours))
  assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)  # measured 0.74-0.78x
  # ...on held-out inputs of the same distribution too, not only the ones it saw
  x2 = correlated_inputs(c, t=512, rows_seed=7)
  assert gptq.output_error(w, ours, x2, contract) < 0.9 * gptq.output_error(w, rtn, x2, contract)


def reference_gptq(w2: np.ndarray, h: np.ndarray, scheme: str, block: int) -> np.ndarray:
  """The same greedy algorithm written the plain way, independent of gptq.py's Cholesky and lazy batches:
  quantize entry i (its block's grid from the weights as they are when it starts), then move the rest of
  each row by the least-squares optimum given that error e = w_i - q_i, delta_R = H_RR^-1 H_Ri e (GPTQ eq. 2-3,
  the OBS update), with H damped as gptq.py does. Returns the dequantized (O, C) weights."""
  w2 = w2.astype(np.float64).copy()
  o, c = w2.shape
  h = h + gptq.DAMP * np.mean(np.diag(h)) * np.eye(c)
  out = np.zeros_like(w2)
  for i in range(c):
    if i % block == 0:
      v, s, m = qarray.quantize(w2[:, i:i + block].astype(np.float32), -1, scheme, None)
      s = np.asarray(s, np.float64)[:, 0]
      m = np.zeros_like(s) if m is None else np.asarray(m, np.float64)[:, 0]
      levels_of = (lambda col: np.clip(np.round((col - m) / s), 0, 15)) if scheme == "int4" else (
          lambda col: np.clip(np.round(col / s), -7, 7))
    q = levels_of(w2[:, i].astype(np.float32).astype(np.float64)) * s + m
    out[:, i] = q
    e = w2[:, i] - q
    r = slice(i + 1, c)
    if i + 1 < c:
      w2[:, r] += np.outer(e, np.linalg.solve(h[r, r], h[r, i]))
  return out


@pytest.mark.parametrize("scheme", ["int4", "int4-sym"])
def test_gptq_is_the_greedy_least_squares_algorithm(scheme):
  # 160 entries: two lazy batches of 128 (the second partial), five blocks of 32.
  w = np.asarray(jax.random.normal(jax.random.key(5), (12, 160)) * 0.05)  # (O, C): contract -1
  x = correlated_inputs(160, t=1024)
  h = x.T @ x
  v, s, m = gptq.quantize_weight(w, h, -1, scheme, 32)
  ours = np.asarray(qarray.dequantize(v, s, -1, jnp.float32, m), np.float64)
  ref = reference_gptq(w, h, scheme, 32)
  # the same discrete choices (a rare tie may round the other way after float differences) ...
  assert np.mean(np.isclose(ours, ref, rtol=0, atol=1e-6)) > 0.99
  # ... and the same output error
  e_ours, e_ref = gptq.output_error(w, ours, x, -1), gptq.output_error(w, ref, x, -1)
  assert abs(e_ours - e_ref) <= 1e-3 * e_ref, (e_ours, e_ref)


def test_dead_inputs_get_zero_weight():
  w = np.asarray(jax.random.normal(jax.random.key(3), (64, 8)) * 0.05)  # (C, O), contract 1
  x = correlated_inputs(64)
  x[:, 5] = 0.0  # an input entry never seen
  v, s, m = gptq.quantize_weight(w, x.T @ x, 1, "int4", 32)
  deq = np.asarray(qarray.dequantize(v, s, 1, jnp.float32, m))
  block = deq[:32]
  # the dead entry is quantized as weight 0: its level is the one nearest 0 on its block's grid
  step = np.asarray(s, np.float32)[0]
  assert np.all(np.abs(block[5]) <= step / 2 + 1e-7)


def test_hessians_are_the_inputs_sums():
  model = qmodel()
  rows = [IDS, IDS[3:] + [5, 6]]
  names = quantized_weights(QCFG.replace(quant="int4", quant_block=32, quant_embedding="int4"))
  hs = gptq.hessians(model.graphdef, model.params, rows, names)
  assert set(hs) == set(names)
  # the embedding's H: the final hidden states the logits contract with, summed over every row's positions
  want = 0.0
  m = nnx.merge(model.graphdef, model.params)
  for ids in rows:
    hid = np.asarray(m(jnp.asarray([ids]), jnp.arange(len(ids))[None]).hidden[0], np.float64)
    want = want + hid.T @ hid
  # (hessians' forward is jitted, this one eager: float32 rounding of the hidden states differs, so the
  # tolerance is relative to H's scale)
  np.testing.assert_allclose(hs["embedder/input_embedding"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  for name, h in hs.items():
    c = h.shape[0]
    assert h.shape == (c, c) and np.allclose(h, h.T) and np.all(np.diag(h) >= 0), name
  # the query and key/value projections of a layer read the same normed input; gate/up and down do not
  np.testing.assert_array_equal(hs["layer_0/attn/q_einsum/w"], hs["layer_0/attn/kv_einsum/w"])
  assert hs["layer_0/mlp/linear/w"].shape == (QCFG.hidden_dim,) * 2
  # the user's model is untouched: no recorder left on it
  m = nnx.merge(model.graphdef, model.params)
  assert m.blocks[0].attn.q_einsum.adapter is None


def calib_rows(n: int = 6, t: int = 48, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [[2] + rng.integers(3, QCFG.vocab_size, t - 1).tolist() for _ in range(n)]


def test_calibrated_model_is_closer_to_float():
  # GPTQ minimises the error of each projection's outputs on the calibration inputs; the whole model's
  # logits on those inputs must then be closer to float's than round-to-nearest's.
  model = qmodel(seed=3)
  rows = calib_rows()
  rtn = gj.quantize(model, "int4", embedding="int8")
  cal = gj.quantize(model, "int4", embedding="int8", calibration=rows)
  assert cal.config == rtn.config
  def logits(m):
    mm = nnx.merge(m.graphdef, m.params)
    return np.concatenate([np.asarray(mm.logits(mm(jnp.asarray([r]), jnp.arange(len(r))[None]).hidden))[0]
                           for r in rows])
  ref = logits(model)
  err = lambda m: float(np.sqrt(np.mean(np.square(logits(m) - ref))))
  assert err(cal) < 0.9 * err(rtn), (err(cal), err(rtn))  # measured 0.82x


def test_calibrated_checkpoint_roundtrip_and_cli(tmp_path, capsys):
  model = qmodel(seed=4)
  src = save_model(tmp_path / "f32", model)
  text = "The quick brown fox jumps over the lazy dog. " * 12
  (tmp_path / "calib.txt").write_text(text)
  code, out, err = run(convert_main, [str(src), str(tmp_path / "q"), "--quantize", "int4", "--no-progress",
                                      "--calibration", str(tmp_path / "calib.txt")], capsys)
  assert code == 0, err
  loaded = gj.load(tmp_path / "q")
  mem = gj.quantize(model, "int4", calibration=text)
  a, b = flat_params(loaded.params), flat_params(mem.params)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k], np.float32), np.asarray(b[k], np.float32), err_msg=k)
  # it is not round-to-nearest: at least one weight differs
  rtn = flat_params(gj.quantize(model, "int4").params)
  assert any(not np.array_equal(np.asarray(a[k], np.float32), np.asarray(rtn[k], np.float32)) for k in a)
  assert json.loads((tmp_path / "q" / checkpoint.CONFIG_FILE).read_text())["config"]["quant"] == "int4"
  np.testing.assert_allclose(np.asarray(loaded.logits(IDS)), np.asarray(mem.logits(IDS)), atol=1e-5, rtol=1e-5)


def test_calibration_errors(tmp_path, capsys):
  model = qmodel()
  with pytest.raises(GemmaError, match="calibration text is empty"):
    gj.quantize(model, "int4", calibration="")
  with pytest.raises(GemmaError, match="outside the vocabulary"):
    gj.quantize(model, "int4", calibration=[[2, 5, 99999]])
  with pytest.raises(GemmaError, match="at least 2 token ids"):
    gj.quantize(model, "int4", calibration=[[2]])
  with pytest.raises(GemmaError, match="already quantized"):
    gj.quantize(gj.quantize(model, "int8"), "int4", calibration=[IDS])
  src = save_model(tmp_path / "f32", model)
  (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
  (tmp_path / "empty.txt").write_text("  \n")
  cases = [
      (["--quantize", "int4", "--calibration", str(tmp_path / "bad.txt")], "bad.txt is not UTF-8 (byte 3"),
      (["--quantize", "int4", "--calibration", str(tmp_path / "empty.txt")], "empty.txt is empty"),
      (["--quantize", "int4", "--calibration", str(tmp_path / "missing.txt")], "cannot read the calibration"),
      (["--calibration", str(tmp_path / "empty.txt")], "no quantization scheme"),
  ]
  for i, (extra, msg) in enumerate(cases):
    code, out, err = run(convert_main, [str(src), str(tmp_path / f"o{i}"), "--no-progress", *extra], capsys)
    assert code != 0 and msg in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / f"o{i}").exists() or not any((tmp_path / f"o{i}").iterdir())
