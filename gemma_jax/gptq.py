"""GPTQ: quantized weights chosen to keep each projection's outputs on real activations close to float's.

  small = gj.quantize(model, "int4", calibration=text)             # text, or lists of token ids
  python -m gemma_jax.convert SRC DST --quantize int4 --calibration calib.txt

Rounding each weight to its nearest level (qarray.quantize) minimises the error of every weight on its own;
GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
arXiv:2210.17323, Algorithm 1) minimises the error of the layer's output X W on calibration inputs X. It
quantizes the contracted entries of a weight one at a time, in order, and moves each one's rounding error
onto the entries not yet quantized in the proportion the inverse Hessian H^-1 (H = X^T X) says keeps X W
closest, so later entries absorb it. The grid of a block (its scale, and offset for int4) is found, by
qarray's own search, from the block's weights as they are when GPTQ reaches it (the reference
implementation's `groupsize` with `static_groups=False`); the stored format is exactly qarray's, so a GPTQ
checkpoint loads, computes and shards like any other. Choices, as in the reference code
(github.com/IST-DASLab/gptq, gptq.py): damping 1% of H's mean diagonal, lazy batches of 128 entries,
inputs never seen (a zero diagonal) quantized as zero weight.

What it trades: an entry may end farther than qarray's bound (int4: absmax / 14 per block) from its own
float weight -- that is how the output error shrinks -- so the round-trip bounds are qarray.quantize's,
not this module's; tests/test_gptq.py checks that with H = I GPTQ is exactly qarray.quantize, and that on
correlated inputs it lowers the output error.

H of every quantized projection comes from one float forward pass per calibration row (hessians): each
Einsum's input, through the adapter hook Einsum already has (layers.py), and for the tied embedding
(used for lookup and for the logits) the final hidden states that the logits contract with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import qarray
from .layers import Einsum
from .transformer import official_path

DAMP = 0.01  # of H's mean diagonal (the reference's percdamp)
LAZY = 128  # entries per lazy batch update (the reference's blocksize)


class _Recorder(nnx.Module):
  """An Einsum adapter that adds nothing and keeps x^T x (C, C) of the input it saw last."""

  def __init__(self, name: str, size: int):
    self.name, self.size = name, size
    self.xtx = nnx.Variable(jnp.zeros((size, size), jnp.float32))

  def __call__(self, equation: str, x: jax.Array) -> jax.Array:
    x2 = x.reshape(-1, self.size).astype(jnp.float32)
    self.xtx[...] = jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST)
    return jnp.zeros((), x.dtype)


@nnx.jit
def _sums(module: nnx.Module, tokens: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
  """One (1, T) forward: ({recorder name: x^T x}, final hidden (T, D)); each Einsum runs once per forward."""
  hidden = module(tokens, jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]).hidden[0]
  recs = {node.name: node.xtx[...] for _, node in nnx.iter_graph(module) if isinstance(node, _Recorder)}
  return recs, hidden.astype(jnp.float32)


def hessians(graphdef: nnx.GraphDef, params: nnx.State, rows: Iterable[Sequence[int]], names: Iterable[str]
             ) -> dict[str, np.ndarray]:
  """{official weight name: H (C, C) float64 = sum over calibration tokens of x x^T}.

  graphdef, params: a float model (Model.graphdef, Model.params); rows: token-id lists, each run as one
  (1, T) forward from position 0 (no padding, so every position is real); names: the quantized weights
  (quantize.quantized_weights): an Einsum's `.../w` gets its input's H (C = its contracted size),
  `embedder/input_embedding` that of the final hidden states (C = D). Sums over rows in float64.
  """
  names = set(names)
  module = nnx.merge(graphdef, params)  # a copy of the model's modules: the user's model gets no recorders
  for path, node in list(nnx.iter_graph(module)):
    name = official_path("/".join(map(str, path))) + "/w"
    if isinstance(node, Einsum) and name in names:
      node.adapter = _Recorder(name, qarray.contracted_size(node.w.shape, node.contract))
  emb = "embedder/input_embedding"
  sums: dict[str, np.ndarray] = {}
  for ids in rows:
    recs, hidden = _sums(module, jnp.asarray([list(ids)], jnp.int32))
    if emb in names:
      recs = dict(recs, **{emb: jnp.matmul(hidden.T, hidden, precision=jax.lax.Precision.HIGHEST)})
    for name, xtx in recs.items():
      sums[name] = sums.get(name, 0.0) + np.asarray(xtx, np.float64)
  missing = names - set(sums)
  if missing:
    raise ValueError(f"no calibration inputs reached {sorted(missing)[:3]}")
  return sums


def _as_rows(w: np.ndarray, contract: int) -> np.ndarray:
  """w as (O, C): one row per output, its contracted entries in the order x.reshape(-1, C) has them."""
  c = qarray.contracted_size(w.shape, contract)
  return w.reshape(c, -1).T if contract > 0 else w.reshape(-1, c)


def _from_rows(w2: np.ndarray, shape: tuple[int, ...], contract: int) -> np.ndarray:
  return w2.T.reshape(shape) if contract > 0 else w2.reshape(shape)


def _grid(wg: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset) (O, 1) of one block (O, block) of weights: qarray.quantize's own choice for that block
  (its search for int4, absmax for the symmetric schemes; offset 0 for those), in its float32 arithmetic."""
  _, s, m = qarray.quantize(wg.astype(np.float32), -1, scheme, None)
  s = np.asarray(s, np.float64).reshape(-1, 1)
  return s, (np.zeros_like(s) if m is None else np.asarray(m, np.float64).reshape(-1, 1))


def _levels(w: np.ndarray, s: np.ndarray, m: np.ndarray, scheme: str) -> np.ndarray:
  """The level of each weight of a column (O,) for its row's grid, computed in float32 as qarray.quantize
  computes it (so that with nothing to spread, GPTQ stores exactly what qarray.quantize stores)."""
  w, s, m = (np.asarray(a, np.float32) for a in (w, s[:, 0], m[:, 0]))
  safe = np.where(s == 0, np.float32(1), s)
  if scheme in qarray.ASYMMETRIC:
    return np.clip(np.round((w - m) / safe), 0, qarray.LEVELS)
  q = qarray.QMAX[scheme]
  return np.clip(np.round(w / safe), -q, q)


def quantize_weight(w, h: np.ndarray, contract: int, scheme: str, block: int | None, damp: float = DAMP
                    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """GPTQ of one weight: (values, scale, offset) in qarray.quantize's format, from w and its H (C, C).

  w: the float weight in our layout (contract as in qarray.py); h: sum of x x^T of its inputs (hessians);
  block: entries of C per scale (None: one per output channel, found from the whole row first).
  """
  # Weights in float32 (the reference implementation's precision; the embedding's (V, D) is 0.7 GB so), H and
  # its factor in float64.
  w2 = _as_rows(np.asarray(w, np.float32), contract).copy()
  o, c = w2.shape
  block = block or c
  h = np.array(h, np.float64)
  if h.shape != (c, c):
    raise ValueError(f"H is {h.shape}, the weight contracts {c} entries")
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w2[:, dead] = 0.0
  h[np.diag_indices(c)] += damp * np.mean(np.diag(h))
  # The upper Cholesky factor U of H^-1 (H^-1 = U^T U): row i of U, divided by U[i, i], is how entry i's
  # error spreads over the entries after it (the reference's cholesky_inverse + cholesky(upper=True)).
  u = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)
  levels = np.zeros((o, c), np.int8)
  scales = np.zeros((o, c // block), np.float64)
  offsets = np.zeros((o, c // block), np.float64)
  for i1 in range(0, c, LAZY):
    i2 = min(i1 + LAZY, c)
    w1 = w2[:, i1:i2].copy()
    err1 = np.zeros_like(w1)
    u1 = u[i1:i2, i1:i2]
    for i in range(i2 - i1):
      col = i1 + i
      if col % block == 0:  # a new block: its grid from its weights as they are now
        end = col + block
        cur = np.concatenate([w1[:, i:], w2[:, i2:end]], axis=1) if end > i2 else w1[:, i:i + block]
        s, m = _grid(cur, scheme)
        scales[:, col // block], offsets[:, col // block] = s[:, 0], m[:, 0]
      q = _levels(w1[:, i], s, m, scheme)
      levels[:, col] = q
      deq = (q * s[:, 0] + m[:, 0]).astype(np.float32)
      e = (w1[:, i] - deq) / u1[i, i]
      w1[:, i:] -= np.outer(e, u1[i, i:])
      err1[:, i] = e
    w2[:, i2:] -= err1 @ u[i1:i2, i2:]
  values = _from_rows(levels, np.shape(w), contract)
  out_shape = qarray.scale_shape(np.shape(w), contract, None if block == c else block)
  to_scale = lambda a: a.T.reshape(out_shape) if contract > 0 else a.reshape(out_shape)
  if scheme in qarray.ASYMMETRIC:
    return (jnp.asarray(values - np.int8(qarray.OFFSET_LEVELS), qarray.DTYPES[scheme]),
            jnp.asarray(to_scale(scales), qarray.OFFSET_SCALE_DTYPE),
            jnp.asarray(to_scale(offsets), qarray.OFFSET_SCALE_DTYPE))
  return jnp.asarray(values, qarray.DTYPES[scheme]), jnp.asarray(to_scale(scales), jnp.float32), None


def calibration_rows(ids: Sequence[int], length: int = 512, max_tokens: int = 8192) -> list[list[int]]:
  """Windows of `length` ids cut from one tokenized text (BOS first), at most max_tokens in all: the rows
  hessians() runs. A text shorter than one window is one row."""
  ids = list(ids)[:max_tokens]
  return [ids[i:i + length] for i in range(0, len(ids), length) if len(ids[i:i + length]) > 1] or [ids]


def output_error(w, q: np.ndarray, x: np.ndarray, contract: int) -> float:
  """||x (w - q)^T||_F / ||x w^T||_F for inputs x (T, C): the quantity GPTQ lowers (tests, benchmarks)."""
  a, b = _as_rows(np.asarray(w, np.float64), contract), _as_rows(np.asarray(q, np.float64), contract)
  return float(np.linalg.norm(x @ (a - b).T) / math.sqrt(max(np.sum(np.square(x @ a.T)), 1e-30)))
