"""Two "hosts" on one machine: Linux network namespaces joined by a veth pair, each with its own address and one
torchrun (c10d rendezvous through the first host's address, as on a cluster). A 4D grid of 2 hosts x 2 processes
(data 2 across the hosts, row 2 within each) trains with losses equal to one process, and its sharded checkpoint
resumes on one process. Skips with the reason where namespaces cannot be made (no root, no CAP_NET_ADMIN)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from test_reliability import losses
from test_reliability_grid import assert_equal_losses, write_config
from test_train import run_config
from tetra.parallel.launch import free_port
from tetra.train import trainer

SUBNET = "10.77.{}.{}"


def _ip(*arguments: str, namespace: str | None = None) -> subprocess.CompletedProcess:
    command = ["ip", *(["netns", "exec", namespace, "ip"] if namespace else []), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts() -> Iterator[list[tuple[str, str, str]]]:
    """[(namespace, interface, address)] for two hosts joined by one link; removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` tool (iproute2) is not installed")
    tag = f"{os.getpid() % 100000}"
    subnet = os.getpid() % 200 + 10
    hosts = [(f"tetra-h{index}-{tag}", f"tv{index}-{tag}", SUBNET.format(subnet, index + 1)) for index in range(2)]
    made = []
    try:
        for namespace, _, _ in hosts:
            result = _ip("netns", "add", namespace)
            if result.returncode != 0:
                pytest.skip(f"cannot make a network namespace here ({result.stderr.strip()}); needs root or "
                            "CAP_NET_ADMIN")
            made.append(namespace)
        (ns0, if0, _), (ns1, if1, _) = hosts
        steps = [("link", "add", if0, "type", "veth", "peer", "name", if1),
                 ("link", "set", if0, "netns", ns0), ("link", "set", if1, "netns", ns1)]
        for step in steps:
            result = _ip(*step)
            if result.returncode != 0:
                pytest.skip(f"cannot make a veth pair here: {result.stderr.strip()}")
        for namespace, interface, address in hosts:
            for step in (("addr", "add", f"{address}/24", "dev", interface), ("link", "set", interface, "up"),
                         ("link", "set", "lo", "up")):
                result = _ip(*step, namespace=namespace)
                assert result.returncode == 0, result.stderr
        yield hosts
    finally:
        for namespace in made:
            _ip("netns", "delete", namespace)


def test_two_hosts_train_a_grid_equal_to_one_process(prepared_data, tmp_path, two_hosts):
    sections = {"train": {"max_steps": 4, "warmup_steps": 1}, "run": {"checkpoint_every": 2}}
    config_path = write_config(prepared_data, tmp_path, "hosts", **sections)
    port = free_port()
    endpoint = f"{two_hosts[0][2]}:{port}"
    launches = []
    for node_rank, (namespace, interface, address) in enumerate(two_hosts):
        command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "torch.distributed.run",
                   "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node_rank),
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", f"hosts-{port}",
                   # torchrun guesses which node hosts the store from the hostname, which all namespaces share
                   "--rdzv-conf", f"is_host={int(node_rank == 0)}",
                   "--local-addr", address, "-m", "tetra", "train", str(config_path), "--no-progress",
                   "parallel.data=2", "parallel.row=2", "parallel.gemm_layout=out_in"]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": interface}  # gloo talks over the link, not loopback
        launches.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=env))
    errors = []
    for launch in launches:
        _, err = launch.communicate(timeout=300)
        errors.append((launch.returncode, err[-3000:]))
    assert all(code == 0 for code, _ in errors), errors

    whole_batch = {**sections, "train": {**sections["train"], "batch_size": 8}}  # data 2 x 4 sequences
    one = trainer.train(*run_config(prepared_data, tmp_path / "one", **whole_batch), show_progress=False)
    assert_equal_losses(losses(tmp_path / "hosts"), losses(one.run_dir))
    written = tmp_path / "hosts" / "checkpoints" / "step-0000002"
    assert (written / "shards" / ".metadata").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(written, resumed / "checkpoints" / written.name)
    trainer.train(*run_config(prepared_data, resumed, **whole_batch), resume="auto", show_progress=False)
    assert_equal_losses(losses(resumed), {s: v for s, v in losses(one.run_dir).items() if s > 2})
