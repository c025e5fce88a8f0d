"""Two processes under torchrun (gloo on CPU): the ranks end with identical parameters, equal (up to float
summation order) to one process training on the whole batches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
import yaml
from safetensors.torch import load_file

from qkv.train.config import Config
from qkv.train.ddp import DistContext, shard_rows
from qkv.train.trainer import build_trainer

# accumulate 2 exercises no_sync; no dropout, so the one-process run is the same computation. A larger Adam
# epsilon: the keys' bias has a zero gradient in exact arithmetic (softmax ignores a constant shift), and
# Adam with eps 1e-9 would turn float noise of 1e-10 there into steps of nearly lr, differently in each run.
SECTIONS = {
    "model": {"dropout": 0.0},
    "training": {"max_steps": 12, "accumulate": 2, "valid_every": 12, "adam_eps": 1e-4},
    "output": {"checkpoint_every": 6},
}

WORKER = textwrap.dedent(
    """
    import sys

    import torch
    from safetensors.torch import save_file

    from qkv.models.checkpoint import tied_keys
    from qkv.train.config import load_config
    from qkv.train.ddp import distributed_session
    from qkv.train.trainer import build_trainer

    torch.set_num_threads(1)
    config = load_config(sys.argv[1])
    with distributed_session("cpu") as ctx:
        trainer = build_trainer(config, ctx, echo=lambda line: None)
        result = trainer.run()
        state = trainer.model.state_dict()
        aliases = tied_keys(state)
        tensors = {k: v.contiguous() for k, v in state.items() if k not in aliases}
        save_file(tensors, f"{sys.argv[2]}/rank{ctx.rank}.safetensors", metadata={"step": str(result.step)})
    """
)


def test_shards_are_disjoint_and_cover_the_batch():
    rows = range(7)
    shards = [shard_rows(rows, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]


def test_two_processes_keep_identical_parameters(tmp_path, make_config):
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(make_config(tmp_path / "ddp_run", **SECTIONS)), encoding="utf-8")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER, encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(worker),
            str(config),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # Only rank 0 writes: one log, checkpoints from rank 0's state.
    assert (tmp_path / "ddp_run" / "checkpoints" / "step_00000012.safetensors").is_file()

    single = build_trainer(
        Config.from_dict(make_config(tmp_path / "single_run", **SECTIONS)), DistContext(), echo=lambda line: None
    )
    single.run()
    state = single.model.state_dict()
    for key, t in rank0.items():
        torch.testing.assert_close(t, state[key], rtol=0, atol=1e-6, msg=key)
