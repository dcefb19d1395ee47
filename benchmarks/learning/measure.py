"""Exact match of a checkpoint on held-out prompts (task.py's test.jsonl), greedy, as a markdown table.

  python benchmarks/learning/measure.py --data /tmp/code/test.jsonl [--ckpt RUN/final] [--limit 200]
  python benchmarks/learning/measure.py --data /tmp/chat/test.jsonl --ckpt RUN/final --json-out m.json

Without --ckpt: the embedded default model (the base Gemma 3 270M), i.e. the base rate.

{"prompt", "response"} lines: the model gets exactly what training saw before the response (<bos> +
encode(prompt)) and generates greedily until a stop id (EOS, <end_of_turn>) or max_new_tokens. An answer is
an exact match when the row stopped at EOS and its text before the stop equals the response (both
stripped): an answer that goes on after the right letters is wrong, since a user would read the rest too.

{"messages"} lines (one user turn, then the model's answer): the prompt is the chat template ChatSession
sends (Tokenizer.chat_turn: the user turn, then <start_of_turn>model), and an answer counts when it stops
with <end_of_turn> and its text equals the model turn's. "stops" is the fraction that ended with
<end_of_turn> at all (right or wrong), the chat CLI's stopping behaviour.

"prefix" is lenient: the expected answer starts the generated text, whatever follows and whether or not it
stopped. It shows that a base model's 0 is not an artefact of the strict rule.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo root: gemma_jax


def read(path: pathlib.Path, limit: int | None) -> list[dict]:
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return rows[:limit] if limit else rows


def kind_of(row: dict) -> str:
  """The task kind, for the per-kind rows of the table: code or sum (task.py's two kinds)."""
  text = row["prompt"] if "prompt" in row else row["messages"][0]["content"]
  return "sum" if " plus " in text else "code"


def prompt_and_answer(row: dict, tok) -> tuple[list[int], str, int]:
  """(prompt ids, expected text, the stop id a right answer ends with), as data.py builds the example."""
  if "prompt" in row:
    return tok.encode(row["prompt"]), row["response"].strip(), tok.eos_id
  turns = row["messages"]
  system = turns[0]["content"] if turns[0]["role"] == "system" else None
  turns = turns[1:] if system is not None else turns
  if [t["role"] for t in turns] != ["user", "model"]:
    raise SystemExit(f"measure.py scores one user turn and its answer, got roles {[t['role'] for t in turns]}")
  return tok.chat_turn(turns[0]["content"], first=True, system=system), turns[1]["content"].strip(), tok.end_of_turn_id


def measure(model, rows: list[dict], batch: int = 50, max_new_tokens: int | None = None) -> list[dict]:
  """One record per row: the prompt, the expected and generated text, whether it stopped right and matched."""
  tok = model.tokenizer
  items = [prompt_and_answer(r, tok) for r in rows]
  if max_new_tokens is None:  # the longest answer, its stop id and a little room to show what follows
    max_new_tokens = max(len(tok.encode(a, add_bos=False)) for _, a, _ in items) + 5
  out = []
  for start in range(0, len(items), batch):
    chunk = items[start:start + batch]
    # The last chunk is padded with copies of its first prompt: one compiled batch size for every chunk.
    prompts = [p for p, _, _ in chunk] + [chunk[0][0]] * (batch - len(chunk))
    news = model.generate_ids(prompts, max_new_tokens=max_new_tokens)[:len(chunk)]
    for row, (prompt, answer, stop), new in zip(rows[start:], chunk, news):
      stopped = bool(new) and new[-1] in model.stop_ids()
      text = model.decode_text(new[:-1] if stopped else new).strip()
      out.append({"kind": kind_of(row), "prompt": model.decode_text(prompt), "expected": answer, "got": text,
                  "stop": new[-1] if stopped else None, "right_stop": stopped and new[-1] == stop,
                  "exact": stopped and new[-1] == stop and text == answer, "prefix": text.startswith(answer)})
  return out


def summary(records: list[dict]) -> dict[str, dict]:
  """Per kind and "all": n, exact, right_stop and prefix fractions."""
  groups = collections.defaultdict(list)
  for r in records:
    groups[r["kind"]].append(r)
  if len(groups) > 1:
    groups["all"] = records
  return {k: {"n": len(v), **{m: sum(r[m] for r in v) / len(v) for m in ("exact", "right_stop", "prefix")}}
          for k, v in groups.items()}


def table(summ: dict[str, dict], chat: bool) -> str:
  stop = "stops with <end_of_turn>" if chat else "stops with EOS"
  lines = [f"| kind | n | exact match | {stop} | prefix (lenient) |", "|---|---|---|---|---|"]
  for k, s in summ.items():
    lines.append(f"| {k} | {s['n']} | {s['exact']:.1%} | {s['right_stop']:.1%} | {s['prefix']:.1%} |")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data", required=True, help="test.jsonl of task.py (prompt/response or messages)")
  ap.add_argument("--ckpt", help="checkpoint (default: the embedded Gemma 3 270M, the base model)")
  ap.add_argument("--limit", type=int, default=None, help="the first N rows only")
  ap.add_argument("--batch", type=int, default=50, help="prompts per generate call")
  ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the longest answer + 5")
  ap.add_argument("--show", type=int, default=5, help="print this many answers")
  ap.add_argument("--json-out", help="also write the summary and every record here")
  args = ap.parse_args()

  import gemma_jax as gj
  from gemma_jax import default_model

  ckpt = args.ckpt or str(default_model.default_checkpoint())
  rows = read(pathlib.Path(args.data), args.limit)
  t0 = time.perf_counter()
  model = gj.load(ckpt, dtype="float32")
  records = measure(model, rows, batch=min(args.batch, len(rows)), max_new_tokens=args.max_new_tokens)
  seconds = time.perf_counter() - t0
  summ = summary(records)
  chat = "messages" in rows[0]
  print(f"{ckpt} on {args.data} ({len(rows)} prompts, greedy, {seconds:.0f} s with load and compile)\n")
  print(table(summ, chat))
  if args.show:
    print("\n| prompt | expected | got | stop |\n|---|---|---|---|")
    for r in records[:args.show]:
      print(f"| {r['prompt']!r} | {r['expected']!r} | {r['got']!r} | {r['stop']} |")
  if args.json_out:
    pathlib.Path(args.json_out).write_text(json.dumps({"ckpt": ckpt, "data": args.data, "summary": summ,
                                                       "seconds": seconds, "records": records}, indent=1) + "\n")


if __name__ == "__main__":
  main()
