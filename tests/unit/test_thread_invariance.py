"""MIR and Gaussian W2 give the same bits with one and with two torch threads.

A Dask worker runs one thread, the driver all of them; the README promises the same report to the
last bit. LAPACK's eigensolvers and Cholesky round differently by thread count (MIR values 3e-6
apart at hidden size 256 before they ran on one BLAS thread). Each thread count runs in its own
interpreter: ``torch.set_num_threads`` in this process would leave the OpenMP pool busy-waiting
and slow the other tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.heavy      # two interpreters that import torch

SCRIPT = r"""
import json, sys, hashlib
import numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
from driftlens import metrics as M, inference as I
from driftlens.stats import crossmodal as cells

out = {}
for d in (96, 256):
    g = torch.Generator().manual_seed(d)
    k, nv = 72, 2304
    v = torch.randn(nv, d, generator=g) * 3 + 1
    t = torch.randn(int(nv * 1.3), d, generator=g) @ torch.randn(d, d, generator=g) * 0.3
    cv = torch.as_tensor(np.repeat(np.arange(k), nv // k + 1)[:nv])
    ct = torch.as_tensor(np.repeat(np.arange(k), len(t) // k + 1)[:len(t)])
    value, lo, hi, boot = cells.mir_cell(v, t, cv, ct, k, I.bootstrap_counts(k, 100, 0), 0.95)
    out[d] = {"mir": M.mir(v, t).hex(), "cell": [value.hex(), lo.hex(), hi.hex()],
              "boot": hashlib.sha256(np.ascontiguousarray(boot, dtype=np.float64).tobytes()).hexdigest(),
              "gauss_w2": M.gaussian_w2(v, t).hex(), "threads": torch.get_num_threads()}
print(json.dumps(out))
"""


def _run(threads: int) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MKL_NUM_THREADS", None)
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(threads)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_mir_and_gaussian_w2_do_not_depend_on_the_thread_count():
    one, two = _run(1), _run(2)
    assert one["256"]["threads"] == 1 and two["256"]["threads"] == 2
    assert one == {d: {**r, "threads": 1} for d, r in two.items()}
