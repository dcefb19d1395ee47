"""Several hosts: jax.distributed start-up, cluster detection, and sending process 0's text to the others.

Every process runs the same program on its own devices; once jax.distributed has started, jax.devices()
lists the devices of all hosts and meshes (sharding.make_mesh) span them. Nothing here builds a mesh.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np

from .errors import GemmaError


def cluster_detected(env: Mapping[str, str] | None = None) -> bool:
  """True when the environment says this process is one of several (so jax.distributed must start).

  JAX_COORDINATOR_ADDRESS (read by jax.distributed itself), a SLURM job step of several tasks, or an
  Open MPI job of several ranks. A TPU slice is not detectable from the environment alone: pass
  --distributed there (jax.distributed then reads the TPU metadata).
  """
  env = os.environ if env is None else env
  several = lambda key: env.get(key, "1").isdigit() and int(env.get(key, "1")) > 1
  return bool(env.get("JAX_COORDINATOR_ADDRESS")) or (bool(env.get("SLURM_JOB_ID")) and several("SLURM_NTASKS")) \
      or several("OMPI_COMM_WORLD_SIZE")


def initialize_distributed(*, coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """jax.distributed.initialize(), before anything else touches the devices.

  Unset arguments come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else from
  jax's cluster detection (TPU slices, SLURM, Open MPI, Kubernetes). Every process then sees all
  devices of all hosts (jax.devices()) and runs the same program.
  """
  env = os.environ
  num_processes = num_processes or (int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None)
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  try:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  except (RuntimeError, ValueError) as e:
    raise GemmaError(f"cannot start jax.distributed: {e} (give --coordinator HOST:PORT, --num-processes N "
                     "and --process-id I, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, "
                     "unless the cluster is detected)") from None


def broadcast_text(text: str | None) -> str | None:
  """Process 0's text on every process (None passes through): e.g. a chat line read from its stdin."""
  if jax.process_count() == 1:
    return text
  from jax.experimental import multihost_utils  # noqa: PLC0415

  data = b"\xff" if text is None else text.encode("utf-8")
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  buf = np.zeros(n, np.uint8)
  if jax.process_index() == 0:
    buf[:] = np.frombuffer(data, np.uint8)
  data = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf)))
  return None if data == b"\xff" else data.decode("utf-8")


__all__ = ["broadcast_text", "cluster_detected", "initialize_distributed"]
