"""popalign.distributed: every Accelerator it makes keeps DDP's gradients in the all-reduce buckets (no second copy of
the gradients), checked on the handlers and on a model wrapped in DDP over 2 CPU processes; and its gloo process group
is destroyed when the process exits, before the interpreter's teardown (where gloo's threads can abort the process)."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent


def test_the_ddp_handler_gets_bucket_views_and_keeps_its_other_settings():
    from accelerate.utils import DistributedDataParallelKwargs, GradScalerKwargs

    from popalign.distributed import with_gradient_bucket_views

    [added] = with_gradient_bucket_views([])
    assert isinstance(added, DistributedDataParallelKwargs) and added.gradient_as_bucket_view
    scaler = GradScalerKwargs(init_scale=2.0)
    given = DistributedDataParallelKwargs(find_unused_parameters=True)
    handlers = with_gradient_bucket_views([scaler, given])
    assert handlers[0] is scaler
    assert handlers[1].to_kwargs() == {"find_unused_parameters": True, "gradient_as_bucket_view": True}
    assert not given.gradient_as_bucket_view  # the caller's handler is not changed


# Two processes: a model prepared by make_accelerator's Accelerator is DDP with bucket views, and after a backward,
# an optimizer step and zero_grad(set_to_none=True) (as the trainer does), the next backward's gradients still share
# one bucket's storage (without bucket views every gradient has its own). An exit handler registered before the
# Accelerator runs after make_accelerator's (exit handlers run last in, first out) and records whether the process group
# was already gone.
WORKER = textwrap.dedent("""
    import atexit
    import os
    import sys

    import torch
    import torch.distributed as dist
    from popalign.distributed import make_accelerator

    def record_process_group():
        with open(os.path.join(sys.argv[1], f"exit{os.environ['RANK']}.txt"), "a") as log:
            print(f"initialized at exit {dist.is_initialized()}", file=log)

    atexit.register(record_process_group)

    def main():  # as the stages do: the model and the Accelerator are a function's locals
        accelerator = make_accelerator()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        assert accelerator.num_processes == 2 and isinstance(model, torch.nn.parallel.DistributedDataParallel)
        for _ in range(2):
            accelerator.backward(model(torch.ones(4, 8)).sum())
            storages = {parameter.grad.untyped_storage().data_ptr() for parameter in model.parameters()}
            with open(os.path.join(sys.argv[1], f"rank{accelerator.process_index}.txt"), "a") as log:
                print(f"storages {len(storages)} bucket_view {model.gradient_as_bucket_view}", file=log)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    main()
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_over_two_processes_keeps_gradients_in_its_buckets(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                                "--master_port", str(free_port()), str(script), str(tmp_path)], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    for rank in (0, 1):  # 2 steps each: the 4 gradients in one bucket
        assert (tmp_path / f"rank{rank}.txt").read_text().splitlines() == ["storages 1 bucket_view True"] * 2
        assert (tmp_path / f"exit{rank}.txt").read_text().splitlines() == ["initialized at exit False"]


def test_a_launch_that_asked_for_fsdp_and_got_plain_data_parallel_is_refused(tmp_path):
    """On a machine without a GPU an FSDP config (version 2, no state sync) starts as multi-process data parallel:
    make_accelerator stops instead of training undistributed."""
    config = tmp_path / "fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n"
                      "  fsdp_sync_module_states: false\n  fsdp_cpu_ram_efficient_loading: false\n"
                      "  fsdp_auto_wrap_policy: NO_WRAP\nmixed_precision: 'no'\nnum_machines: 1\nnum_processes: 2\n"
                      "use_cpu: false\n")
    script = tmp_path / "worker.py"
    script.write_text("from popalign.distributed import make_accelerator\nmake_accelerator()\nprint('trained')\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config), "--main_process_port",
         str(port), str(script)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    assert completed.returncode != 0 and "trained" not in completed.stdout
    assert "the launcher asked for FSDP (ACCELERATE_USE_FSDP=true) but accelerate runs MULTI_CPU" in completed.stderr
