"""
The two ways the GPU path crashed before its first step, reproduced on a CPU:

1. Under `deepspeed --num_gpus 8` every process sees all 8 GPUs and starts on cuda:0,
   while DeepSpeed binds rank k's NCCL group to cuda:LOCAL_RANK. train.py must select
   cuda:LOCAL_RANK before its first collective or CUDA allocation. A recording stand-in
   for torch.cuda follows the current device; the collectives and the model build
   record which device was current when they ran.
2. The ZeRO-3 reader filled each partition with .numpy() of it, which raises for a GPU
   tensor. Here the partition is a tensor that is not on the CPU (meta, or a stand-in
   that reports cuda:0 and refuses .numpy() as a CUDA tensor does), for fp32, bf16 and
   fp16 checkpoints.
"""


import pytest
import torch
from safetensors.torch import save_file

import models
import train
from train_helpers import write_tiny_data


class FakeCuda:
    """torch.cuda as seen by one process of an 8-GPU node: available, device 0 current."""

    def __init__(self):
        self.current, self.calls = 0, []

    def is_available(self):
        return True

    def device_count(self):
        return 8

    def set_device(self, i):
        self.calls.append(("set_device", int(getattr(i, "index", i))))
        self.current = int(getattr(i, "index", i))

    def current_device(self):
        return self.current


class Stop(Exception):
    pass


@pytest.mark.parametrize("local_rank", [1, 5])
def test_train_selects_cuda_local_rank_before_its_first_collective_and_the_model_build(
        tmp_path, monkeypatch, local_rank):
    import deepspeed
    deepspeed.get_accelerator()                      # the CPU accelerator, cached before the fake
    write_tiny_data(tmp_path / "data")
    cuda = FakeCuda()
    for name in ("is_available", "device_count", "set_device", "current_device"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    for k, v in dict(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE="8",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT="29999").items():
        monkeypatch.setenv(k, v)

    def record(what, stop=False):
        def f(*a, **k):
            cuda.calls.append((what, cuda.current))
            if stop:
                raise Stop
        return f
    monkeypatch.setattr(deepspeed, "init_distributed", record("init_distributed"))
    monkeypatch.setattr(torch.distributed, "broadcast", record("broadcast"))
    monkeypatch.setattr(torch.distributed, "all_reduce", record("all_reduce"))
    monkeypatch.setattr(train, "build", record("build", stop=True))      # loads the model: allocates
    with pytest.raises(Stop):
        train.main(["--model", "tiny", "--data_dir", str(tmp_path / "data"), "--out_dir",
                    str(tmp_path / "run"), "--global_batch", "8", "--zero_stage", "0"])
    assert cuda.calls[0] == ("set_device", local_rank), cuda.calls
    assert [c for c in cuda.calls[1:] if c[0] != "set_device"] == [
        ("init_distributed", local_rank), ("build", local_rank)]


def test_train_refuses_a_local_rank_beyond_the_visible_gpus(tmp_path, monkeypatch):
    cuda = FakeCuda()
    for name in ("is_available", "device_count", "set_device"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    monkeypatch.setenv("LOCAL_RANK", "8")
    with pytest.raises(models.UserError, match="LOCAL_RANK is 8 but this process sees 8 GPUs"):
        train.select_device()
    assert cuda.calls == []


class OnGPU(torch.Tensor):
    """A CPU tensor that reports cuda:0 and refuses .numpy() the way a CUDA tensor does;
    everything else (copy_, narrow, view) runs as on the CPU, so the values can be read."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    def numpy(self, *a, **k):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("src", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("dst", ["float32", "bfloat16", "float16"])
def test_the_partitioned_reader_fills_a_partition_that_is_not_on_the_cpu(tmp_path, src, dst):
    torch.manual_seed(0)
    w = torch.randn(7, 30).to(getattr(torch, src))
    save_file({"w": w, "other": torch.zeros(3)}, tmp_path / "model.safetensors")
    entry = models.checkpoint_index(str(tmp_path))["w"]
    start, count = 50, 64                            # a partition: elements [50, 114) of 210
    out = torch.full((count,), -1.0, dtype=getattr(torch, dst)).as_subclass(OnGPU)
    with pytest.raises(TypeError, match="numpy"):    # the stand-in refuses as CUDA would
        out.view(torch.uint8).numpy()
    with open(entry[0], "rb") as f:
        models.read_flat(f, entry, start, out)
    expected = w.flatten()[start:start + count].to(getattr(torch, dst))
    assert torch.equal(out.as_subclass(torch.Tensor), expected)
    meta = torch.empty(count, dtype=getattr(torch, dst), device="meta")
    with open(entry[0], "rb") as f:
        models.read_flat(f, entry, start, meta)      # no .numpy() of a tensor off the CPU
