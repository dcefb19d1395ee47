"""lm-evaluation-harness runs gemma_jax models: an lm_eval.api.model.LM registered as "gemma_jax".

Needs the optional extra (pip install -e ".[eval]"). Importing this module registers the model; lm-eval
does not find plugins by itself, so either import it before calling lm-eval from Python:

  import lm_eval, gemma_jax.lm_eval_adapter
  lm_eval.simple_evaluate(model="gemma_jax", model_args="ckpt=out/ckpt,dtype=bfloat16", tasks=["hellaswag"],
                          num_fewshot=10, batch_size=16)
  lm_eval.simple_evaluate(model=gemma_jax.lm_eval_adapter.GemmaJaxLM(model=gj.load(...)), tasks=[...])

or run lm-eval's own command line through this module (every lm-eval flag works):

  python -m gemma_jax.lm_eval_adapter --model gemma_jax --model_args ckpt=out/ckpt --tasks piqa,arc_easy

All three request types go to gemma_jax.evaluate, the code behind `python -m gemma_jax.eval`, so both give the
same log-likelihoods (tested): loglikelihood with lm-eval's tokenization (BOS first, trailing context
whitespace moved, split at len(encode(context))); loglikelihood_rolling through lm-eval's disjoint windows of
`window` tokens after a single BOS, each later window's oldest token replaced by BOS (evaluate.rolling_windows:
Gemma needs BOS at a sequence start; HFLM instead encodes the text with BOS and prefixes a second one);
generate_until greedily (do_sample is not supported: a warning, then greedy).
"""

from __future__ import annotations

import logging

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from . import evaluate
from .errors import GemmaError

log = logging.getLogger(__name__)


@register_model("gemma_jax")
class GemmaJaxLM(LM):
  """A gemma_jax Model as an lm-eval LM.

  Args (also as lm-eval model_args, "ckpt=DIR,dtype=bfloat16,..."):
    ckpt: checkpoint directory (default: the embedded Gemma 3 270M); or model: an already loaded gj.Model.
    dtype: "float32" or "bfloat16" (default: the checkpoint's); mesh: a mesh spec with ";" for "," (lm-eval's
      model_args split at commas), e.g. "data=2;model=4".
    batch_size: requests per batch ("auto" means 8: no search, buckets already bound the memory).
    max_length: tokens the model sees at once (default: its context); longer requests lose their first tokens.
    window: tokens per window of loglikelihood_rolling (default: max_length, at most 2048).
    max_gen_toks: generate_until's default token budget (a task's own max_gen_toks wins).
  """

  def __init__(self, ckpt: str | None = None, *, model=None, dtype: str | None = None, mesh: str | None = None,
               batch_size: int | str | None = 8, max_length: int | None = None, window: int | None = None,
               max_gen_toks: int = 256, **unused):
    super().__init__()
    if unused:
      log.info("gemma_jax ignores lm-eval model arguments %s", sorted(unused))
    if model is None:
      from .default_model import default_checkpoint  # noqa: PLC0415
      from .model import load  # noqa: PLC0415

      model = load(ckpt if ckpt is not None else default_checkpoint(), dtype=dtype,
                   mesh=None if mesh is None else str(mesh).replace(";", ","))
    self.model = model
    self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
    self.max_length = model.config.max_seq_len if max_length is None else int(max_length)
    self.window = min(self.max_length, evaluate.DEFAULT_WINDOW) if window is None else int(window)
    self.max_gen_toks = int(max_gen_toks)

  def _bar(self, what: str, disable: bool):
    bar = tqdm(desc=f"gemma_jax {what}", unit="req", disable=disable)

    def progress(done: int, total: int) -> None:
      if bar.total != total:
        bar.reset(total)
      bar.update(done)
    return bar, progress

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    bar, progress = self._bar("loglikelihood", disable_tqdm)
    with bar:
      got = evaluate.loglikelihood(self.model, [r.args[:2] for r in requests], self.batch_size, progress=progress,
                                   max_length=self.max_length)
    return [(g.logprob, g.is_greedy) for g in got]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    bar, progress = self._bar("loglikelihood_rolling", disable_tqdm)
    with bar:
      got = evaluate.rolling_loglikelihood(self.model, [r.args[0] for r in requests], self.window, self.window,
                                           self.batch_size, progress)
    return [total for total, _ in got]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Requests sharing generation settings run together; each keeps its place in the output."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
      kwargs = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      budget = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
      if kwargs.pop("do_sample", False) or kwargs.get("temperature", 0) not in (0, 0.0, None):
        log.warning("gemma_jax's generate_until is greedy; do_sample/temperature are ignored")
      groups.setdefault((tuple(until), budget), []).append(i)
    out = [""] * len(requests)
    with tqdm(total=len(requests), desc="gemma_jax generate_until", unit="req", disable=disable_tqdm) as bar:
      for (until, budget), idx in groups.items():
        if budget >= self.max_length:
          raise GemmaError(f"max_gen_toks {budget} leaves no room for a context in max_length {self.max_length}")
        texts = evaluate.generate_until(self.model, [requests[i].args[0] for i in idx], until, budget,
                                        self.batch_size, lambda n, _: bar.update(n))
        for i, text in zip(idx, texts):
          out[i] = text
    return out


if __name__ == "__main__":
  from lm_eval.__main__ import cli_evaluate

  cli_evaluate()
