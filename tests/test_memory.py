"""Importing must not hold two full copies of the weights in host memory (measured, not claimed)."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import gc, sys
import gemma_jax as gj
from gemma_jax.convert.gguf import open_reader
# VmHWM, this process image's own high-water mark: ru_maxrss would also count the parent's, which Linux
# carries across the (v)fork + exec that started this process (a pytest worker of several GiB).
def peak():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
reader = open_reader(sys.argv[1])  # the gguf package's parsed metadata: a fixed cost, not weights
del reader; gc.collect()
before = peak()
ckpt = gj.convert(sys.argv[1], sys.argv[2])
weights = gj.get_preset("gemma3_270m").param_count() * 4  # float32
print((peak() - before) / weights)
"""


@pytest.mark.slow
def test_gguf_conversion_holds_one_copy_of_the_weights(gguf_270m, tmp_path):
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(gguf_270m), str(tmp_path / "ckpt")],
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr
  ratio = float(out.stdout.strip().splitlines()[-1])
  # One float32 copy is 1.0; the memory-mapped GGUF file's pages count in RSS too (253 MB = 0.24), and
  # dequantization chunks and Orbax buffers add a little (measured total: 1.45). Two copies would be >= 2.24.
  assert ratio < 1.6, ratio
