"""Two simulated nodes (tests/multinode.py) sharing the output folder give the labels, scores and pairs of one
process, byte for byte, and each shared file is written once, by the global main process. Generation and training
are checked the same way in test_generation.py and test_train.py."""

import shutil

import pytest

from bad_input_world import TOY_ENVIRONMENT, build_world_apart
from multinode import run_two_nodes
from popalign.toy.small_run import STAGE_ENTRY_POINTS, stage_arguments

pytestmark = pytest.mark.slow  # four two-node launches


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    return build_world_apart(tmp_path_factory.mktemp("multinode") / "world")


@pytest.mark.parametrize("stage, outputs, port", [
    ("classify", ["images/train/labels_toy.csv"], 29561),
    ("score", ["images/train/quality_toy.csv"], 29562),
    ("pairs", ["preferences/pairs.csv", "preferences/pairs.summary.json"], 29563),
])
def test_two_nodes_write_the_files_of_one_process(one_process_run, tmp_path, stage, outputs, port):
    world = tmp_path / "world"
    shutil.copytree(one_process_run, world)
    job_files = {"classify": ".labels_toy.*", "score": ".quality_toy.*", "pairs": None}[stage]
    for path in [*(world / output for output in outputs), *(world.glob(f"images/train/{job_files}") if job_files else [])]:
        path.unlink()
    nodes = run_two_nodes([*STAGE_ENTRY_POINTS[stage].split(), *stage_arguments()[stage]], world, port=port, env_extra=TOY_ENVIRONMENT)
    assert all(node.returncode == 0 for node in nodes), nodes[0].stderr[-2000:] + nodes[1].stderr[-2000:]
    for output in outputs:
        assert (world / output).read_bytes() == (one_process_run / output).read_bytes(), output
    # written once: by the global main process only, and through a temporary file that is gone
    assert "wrote" not in nodes[1].stdout and "->" not in nodes[1].stdout
    assert not list(world.rglob("*.tmp"))
    if stage in ("classify", "score"):
        prefix = ".labels_toy" if stage == "classify" else ".quality_toy"
        parts = sorted(path.name for path in (world / "images/train").glob(f"{prefix}.part*.jsonl"))
        assert parts == [f"{prefix}.part0.jsonl", f"{prefix}.part1.jsonl"]  # each process appends to its own part file
