"""Weight-only int8 / int4 quantization of a model: in memory, in the importers, and its checks.

  small = gj.quantize(model, "int8")                     # every projection per output channel, embedding int8 per row
  small = gj.quantize(model, "int4", block_size=32)      # blocks of 32 along each contracting axis
  python -m gemma_jax.convert SRC DST --quantize int4    # the same, written as a checkpoint

A quantized weight keeps its official name for its values (`layer_0/attn/q_einsum/w`, int8 or int4) and
gets a scale beside it (`layer_0/attn/q_einsum/w_scale`, `embedder/input_embedding_scale`), and for the
asymmetric int4 scheme an offset (`w_offset`, `input_embedding_offset`); the ModelConfig's quant,
quant_block and quant_embedding fields say the scheme (configs/model_config.py), so the config alone still
gives every param's shape and dtype. The math is qarray.py's. Norms stay float.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import gptq, qarray
from .configs import QUANT_BLOCKS, QUANT_SCHEMES, ModelConfig
from .errors import GemmaError
from .layers import Einsum, Embedder
from .transformer import Transformer, abstract_model, flat_params, official_path, set_flat_params

# The embedding's default, chosen by measurement on Gemma 3 270M (benchmarks/results/2026-12-05_quantize.md):
# it holds 63% of the params, so kept float it leaves an int8 model at 0.72x of float32's bytes (for +0.23%
# mean NLL instead of +0.28%); as int4 it reaches 0.156x but costs +8.88% NLL instead of +6.75% (int4 projections).
EMBEDDING_DEFAULT = {"int8": "int8", "int4": "int8", "int4-sym": "int8"}
SCALE_SUFFIX = "_scale"
OFFSET_SUFFIX = "_offset"  # asymmetric schemes (qarray.ASYMMETRIC)
KEEP = "keep"  # embedding=KEEP: as the scheme's default, see EMBEDDING_DEFAULT


def describe(config: ModelConfig) -> str:
  """"int8 (per channel), embedding int8 (per row)" and the like; "float" for a float config."""
  if not config.quantized:
    return "float"
  per = lambda row: f"blocks of {config.quant_block}" if config.quant_block else f"per {row}"
  proj = f"{config.quant} ({per('channel')})" if config.quant else "float projections"
  emb = f"{config.quant_embedding} ({per('row')})" if config.quant_embedding else "float"
  return f"{proj}, embedding {emb}"


def check_scheme(scheme: str, block_size: int | None = None, embedding: str | None = KEEP
                 ) -> tuple[str, int | None, str | None]:
  """(scheme, block size, embedding) with the defaults filled in; a GemmaError naming a bad one."""
  if scheme not in QUANT_SCHEMES:
    raise GemmaError(f"unknown quantization scheme {scheme!r}; known: {', '.join(QUANT_SCHEMES)}")
  if embedding == KEEP:
    embedding = EMBEDDING_DEFAULT[scheme]
  if embedding not in (None, *QUANT_SCHEMES):
    raise GemmaError(f"unknown embedding quantization {embedding!r}; known: {', '.join(QUANT_SCHEMES)} or None "
                     "(kept in the compute dtype)")
  if block_size is None and any(str(k).startswith("int4") for k in (scheme, embedding)):
    block_size = QUANT_BLOCKS[0]
  if block_size is not None and (isinstance(block_size, bool) or block_size not in QUANT_BLOCKS):
    raise GemmaError(f"block size {block_size!r} is not supported; choose one of "
                     f"{', '.join(map(str, QUANT_BLOCKS))}")
  return scheme, block_size, embedding


def scheme_config(config: ModelConfig, scheme: str, block_size: int | None = None, embedding: str | None = KEEP,
                  *, where: str = "the model") -> ModelConfig:
  """config with the quant fields of a scheme, every problem a GemmaError naming it.

  scheme: "int8", "int4" (asymmetric) or "int4-sym" (qarray.py). block_size: 32, 64 or 128 (default:
  int4 32, int8 one scale per output channel). embedding: a scheme or None (kept float); default
  EMBEDDING_DEFAULT[scheme].
  """
  if config.quantized:
    raise GemmaError(f"{where} is already quantized ({describe(config)}); quantize the float checkpoint it "
                     "was made from instead (quantizing twice adds the errors of both)")
  scheme, block_size, embedding = check_scheme(scheme, block_size, embedding)
  try:
    return config.replace(quant=scheme, quant_block=block_size, quant_embedding=embedding)
  except ValueError as e:  # a block size that does not divide a contracting dimension
    raise GemmaError(f"cannot quantize {where} with {scheme} in blocks of {block_size}: "
                     f"{str(e).split(': ', 1)[-1]}") from None


def float_config(config: ModelConfig) -> ModelConfig:
  """The config of the same model with float weights."""
  return config.replace(quant=None, quant_block=None, quant_embedding=None)


def quantized_weights(config: ModelConfig) -> dict[str, int]:
  """{official name of each weight the config quantizes: its `contract`} (qarray.py), from the modules."""
  module = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  out = {}
  for path, node in nnx.iter_graph(module):
    name = official_path("/".join(map(str, path)))
    if isinstance(node, Einsum) and node.w_scale is not None:
      out[f"{name}/w"] = node.contract
    elif isinstance(node, Embedder) and node.input_embedding_scale is not None:
      out[f"{name}/input_embedding"] = -1
  return out


def scheme_of(config: ModelConfig, name: str) -> str:
  """The scheme of a quantized weight of `config` (official name of its values)."""
  return config.quant_embedding if name.startswith("embedder/") else config.quant


def expected_dtypes(config: ModelConfig) -> dict[str, str]:
  """{official name: stored dtype} of every param a checkpoint of `config` holds: the values' scheme
  (int8 or int4), "float16" for an asymmetric scheme's scale and offset, and "float" for the rest (float
  weights and symmetric scales may be stored as float32 or bfloat16)."""
  weights = quantized_weights(config)
  out = {p: "float" for p in flat_params(abstract_model(config)[1])}
  for name in weights:
    scheme = scheme_of(config, name)
    out[name] = scheme
    if scheme in qarray.ASYMMETRIC:
      out[name + SCALE_SUFFIX] = out[name + OFFSET_SUFFIX] = str(qarray.OFFSET_SCALE_DTYPE)
  return out


def check_dtypes(config: ModelConfig, stored: dict[str, Any], where: str) -> None:
  """Raises GemmaError naming the first param whose stored dtype is not the one `config` gives it (a float
  weight where int8 values belong, int values as a scale): Orbax would cast it silently."""
  for name, want in expected_dtypes(config).items():
    got = jnp.dtype(stored[name]) if name in stored else None
    if got is not None and (jnp.issubdtype(got, jnp.floating) if want == "float" else
                            got == (qarray.DTYPES[want] if want in qarray.DTYPES else jnp.dtype(want))):
      continue
    if got is not None:
      raise GemmaError(f"{where}: parameter {name} is stored as {got}, but the config ({describe(config)}) "
                       f"makes it {want}")


def quantize_params(config: ModelConfig, flat: dict[str, Any], scheme: str, block_size: int | None = None,
                    embedding: str | None = KEEP, *, block_scales: dict[str, Any] | None = None,
                    hessians: dict[str, np.ndarray] | None = None, where: str = "the model") -> ModelConfig:
  """Quantizes a flat {official name: float array} in place; returns the quantized config.

  One weight at a time, each float array replaced as soon as its values and scale exist (a dict that
  moves arrays to the device as they are stored, convert.common.DeviceParams, then holds one copy).
  block_scales: {name: (scheme, scale, offset or None)} of weights the source holds quantized (GGUF's
  Q8_0 "int8", Q4_0 "int4-sym", Q4_1 "int4" blocks, convert/gguf.py): where the scheme fits (Q4_0 also
  fits int4, with offset -8 * scale) and the scale's shape matches, the values are round((w - offset) /
  scale), exact for a weight that is values times that scale plus offset, and the scale is kept.
  hessians: {name: H} of calibration inputs (gptq.hessians): those weights (not kept exactly) are chosen by
  GPTQ (gptq.py) instead of rounded to nearest.
  """
  qconfig = scheme_config(config, scheme, block_size, embedding, where=where)
  for name, contract in quantized_weights(qconfig).items():
    kind = scheme_of(qconfig, name)
    w = flat[name]
    given_kind, given, offset = (block_scales or {}).get(name, (None, None, None))
    fits = given_kind == kind or (kind in qarray.ASYMMETRIC and given_kind in ("int4-sym", "int4"))
    if fits and np.shape(given) == qarray.scale_shape(np.shape(w), contract, qconfig.quant_block):
      if kind in qarray.ASYMMETRIC:
        given = np.asarray(given).astype(qarray.OFFSET_SCALE_DTYPE)  # float16 in the file: exact
        offset = given * np.float16(-qarray.OFFSET_LEVELS) if offset is None else np.asarray(offset).astype(
            qarray.OFFSET_SCALE_DTYPE)
      values = qarray.from_scale(w, given, contract, kind, offset)
      scale = jnp.asarray(given) if kind in qarray.ASYMMETRIC else jnp.asarray(given, jnp.float32)
      offset = None if offset is None else jnp.asarray(offset)
    else:
      if hessians is not None and name in hessians:
        values, scale, offset = gptq.quantize_weight(w, hessians[name], contract, kind, qconfig.quant_block)
      else:
        values, scale, offset = qarray.quantize(w, contract, kind, qconfig.quant_block)
      if offset is not None and not bool(jnp.isfinite(scale).all() & jnp.isfinite(offset).all()):
        raise GemmaError(f"cannot quantize {where}'s {name} to {kind}: a block's range exceeds float16's "
                         "(65504 per step), where its scale and offset are stored")
    del w
    flat[name] = values
    flat[name + SCALE_SUFFIX] = scale
    if offset is not None:
      flat[name + OFFSET_SUFFIX] = offset
  return qconfig


def dequantize_params(config: ModelConfig, flat: dict[str, Any], dtype=jnp.float32) -> ModelConfig:
  """The inverse, in place: every quantized weight replaced by values * scale in `dtype` (LoRA merges a
  QLoRA run's adapters into these). Returns the float config."""
  for name, contract in quantized_weights(config).items():
    flat[name] = qarray.dequantize(flat[name], flat.pop(name + SCALE_SUFFIX), contract, dtype,
                                   flat.pop(name + OFFSET_SUFFIX, None))
  return float_config(config)


def calibration_hessians(graphdef, params, config: ModelConfig, tokenizer, calibration, scheme: str,
                         block_size: int | None = None, embedding: str | None = KEEP, *,
                         where: str = "the model") -> dict[str, np.ndarray]:
  """gptq.hessians of every weight `scheme` quantizes, from `calibration`: a text (tokenized with BOS, cut
  into gptq.calibration_rows) or a list of token-id lists. A GemmaError for an empty or unusable one, or
  for a scheme scheme_config refuses (an already quantized model), before any forward pass."""
  qconfig = scheme_config(config, scheme, block_size, embedding, where=where)
  if isinstance(calibration, str):
    ids = tokenizer.encode(calibration)
    if len(ids) < 2:
      raise GemmaError("the calibration text is empty: GPTQ needs at least a few hundred tokens of text")
    rows = gptq.calibration_rows(ids)
  else:
    try:
      rows = [[int(i) for i in row] for row in calibration]
    except TypeError:
      raise GemmaError("calibration must be a text or a list of token-id lists") from None
    if not rows or any(len(r) < 2 for r in rows):
      raise GemmaError("calibration rows must each hold at least 2 token ids")
    bad = [i for r in rows for i in r if not 0 <= i < config.vocab_size]
    if bad:
      raise GemmaError(f"calibration token id {bad[0]} is outside the vocabulary (0..{config.vocab_size - 1})")
  return gptq.hessians(graphdef, params, rows, quantized_weights(qconfig))


def quantize(model, scheme: str = "int8", block_size: int | None = None, embedding: str | None = KEEP,
             calibration=None):
  """A quantized copy of a Model (gj.quantize): same tokenizer and mesh; the original is left as it was.

  Args:
    scheme: "int8" (symmetric, one scale per output channel unless block_size says otherwise),
      "int4" (asymmetric: a float16 scale and offset per block of block_size along each contracting
      axis, default 32) or "int4-sym" (symmetric, a scale per block: checkpoint format 4's int4).
    block_size: 32, 64 or 128 entries of the contracting axis per scale.
    embedding: "int8" (a scale per row), "int4" or None (kept in the compute dtype); default
      EMBEDDING_DEFAULT[scheme].
    calibration: a text, or a list of token-id lists: the weights are then chosen by GPTQ (gptq.py) to
      keep each projection's outputs on these inputs close to float's, instead of rounded to nearest
      (a few thousand tokens of text like the model's use; README "Quantization" has the measurements).
  Symmetric scales are kept in the model's runtime dtype (float32, or bfloat16 for a bfloat16 model),
  int4's scales and offsets in float16.
  """
  hessians = None
  if calibration is not None:
    hessians = calibration_hessians(model.graphdef, model.params, model.config, model.tokenizer, calibration,
                                    scheme, block_size, embedding)
  flat = {k: jnp.asarray(v) for k, v in flat_params(model.params).items()}
  qconfig = quantize_params(model.config, flat, scheme, block_size, embedding, hessians=hessians)
  graphdef, state = abstract_model(qconfig)
  want = {k: x.dtype for k, x in flat_params(state).items()}  # the dtypes the quantized model holds
  set_flat_params(state, {k: v.astype(want[k]) for k, v in flat.items()})
  # dataclasses.replace, not Model(...): model.py imports checkpoint.py, which imports this module.
  out = dataclasses.replace(model, config=qconfig, graphdef=graphdef, params=state, layout=None)
  return out if model.layout is None else out.shard(model.layout.mesh, model.layout.rules)


def param_bytes(params: nnx.State) -> int:
  """Bytes of a model's params as held (int4 counts half a byte, as XLA stores it on CPU and in
  checkpoints)."""
  return sum(qarray.nbytes(x.shape, x.dtype) for x in jax.tree.leaves(params))
