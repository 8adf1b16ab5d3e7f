"""The two-node loopback cluster fixture itself: both nodes register and a task lands on each."""

import pytest

pytestmark = pytest.mark.integration


def test_two_nodes_run_tasks_on_both(ray_two_nodes):
    import ray

    assert ray_two_nodes.alive_nodes() == 2
    ray.init(address=ray_two_nodes.address)
    try:
        @ray.remote(num_cpus=2)
        def where():
            import time

            time.sleep(3)  # hold the node's CPUs so the second task must go to the other node
            return ray.get_runtime_context().get_node_id()

        # 2 CPUs each: two 2-CPU tasks in flight together must use both nodes.
        nodes = set(ray.get([where.remote() for _ in range(2)]))
        assert len(nodes) == 2
    finally:
        ray.shutdown()
