"""The default --ram inside a memory cgroup (a container, a systemd unit with MemoryMax):
sized from what the group leaves, not the machine's memory (the kernel kills a process
at its group's limit without a word). Fake cgroup trees, v1 and v2, under tmp_path."""

import pytest

from moespeq_cli.errors import UsageError
from moespeq_cli.runtime.planning import planner

MB = 2**20


def tree(tmp_path, files: dict[str, str], self_cgroup: str):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    proc = tmp_path / "self-cgroup"
    proc.write_text(self_cgroup)
    return str(root), str(proc)


def test_v1_the_tightest_of_the_group_and_its_ancestors_with_page_cache_counted_as_left(tmp_path):
    root, proc = tree(
        tmp_path,
        {
            "memory/memory.limit_in_bytes": "9223372036854771712\n",  # the root: no limit
            "memory/jobs/memory.limit_in_bytes": f"{1000 * MB}\n",
            "memory/jobs/memory.usage_in_bytes": f"{100 * MB}\n",
            "memory/jobs/mine/memory.limit_in_bytes": f"{300 * MB}\n",
            "memory/jobs/mine/memory.usage_in_bytes": f"{200 * MB}\n",
            "memory/jobs/mine/memory.stat": f"cache 1\ntotal_inactive_file {50 * MB}\n",
        },
        "4:memory:/jobs/mine\n3:cpuset:/\n",
    )
    assert planner.cgroup_memory(root, proc) == (300 * MB, 150 * MB)


def test_v2_memory_max_and_a_namespaced_group_seen_at_the_mount_s_root(tmp_path):
    files = {
        "cgroup.controllers": "memory\n",
        "memory.max": f"{512 * MB}\n",
        "memory.current": f"{112 * MB}\n",
        "memory.stat": f"anon 1\ninactive_file {12 * MB}\n",
    }
    root, proc = tree(tmp_path, files, "0::/\n")
    assert planner.cgroup_memory(root, proc) == (512 * MB, 412 * MB)
    # a container's cgroup namespace names a path the mount does not have: its root is the group
    proc2 = tmp_path / "other"
    proc2.write_text("0::/../../system.slice/docker-1.scope\n")
    assert planner.cgroup_memory(root, str(proc2)) == (512 * MB, 412 * MB)


@pytest.mark.parametrize("limit", ["max\n", "9223372036854771712\n"])
def test_no_limit_is_no_cgroup_figure(tmp_path, limit):
    root, proc = tree(tmp_path, {"cgroup.controllers": "", "memory.max": limit, "memory.current": "5\n"}, "0::/\n")
    assert planner.cgroup_memory(root, proc) is None
    assert planner.cgroup_memory(str(tmp_path / "none"), str(tmp_path / "none")) is None


def test_the_default_ram_comes_from_the_group_where_it_is_tighter(monkeypatch):
    """A 300 MB group on a 24 GiB machine: the budget is what the group leaves less a
    quarter of its limit (1 GiB would be all of it), said so; a budget too small for the
    model says where it came from and what to do, not "raise --ram" for a --ram never given."""
    monkeypatch.setattr(planner, "cgroup_memory", lambda: (300 * MB, 200 * MB))
    monkeypatch.setattr(planner, "machine_memory", lambda: (24 * 2**30, 20 * 2**30))
    assert planner.memory_info() == (300 * MB, 200 * MB)
    ram, source = planner.default_ram()
    assert ram == 200 * MB - 75 * MB
    assert "memory cgroup limit" in source

    class Cfg:
        top_k, num_experts, moe_layers = 2, 8, [0]

    with pytest.raises(UsageError, match=r"the RAM left for experts, .*\(memory left under .*give --ram"):
        planner.host_plan(Cfg, 100 * MB, ram, 0, source)
    with pytest.raises(UsageError, match=r"--ram .* -- raise --ram$"):
        planner.host_plan(Cfg, 100 * MB, ram, 0)
