"""Two `torchrun` node launches on this machine (--nnodes 2 --nproc_per_node 1, local rendezvous), as on a
cluster of two single-GPU nodes with a shared filesystem: both write into the same output folder."""

import os
import subprocess
import sys


def run_two_nodes(script_and_args, cwd, port: int, timeout: int = 600, env_extra=None) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    launches = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                                  "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                                  *script_and_args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank in (0, 1)]
    results = []
    for launch in launches:
        stdout, stderr = launch.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(launch.args, launch.returncode, stdout, stderr))
    return results
