"""Several Ray nodes (ray.cluster_utils.Cluster): expert shards land on distinct nodes through
their custom resources and the placement group, and the cluster still serves exact tokens."""

import grpc
import pytest
import ray

from deployments.engine.engine import Engine
from deployments.engine.params import SamplingParams
from deployments.expert_shard import NAMESPACE, POOL_NAME
from deployments.pb import herd_pb2 as pb
from deployments.pb import herd_pb2_grpc
from tests.cluster.conftest import Served, free_port, start_serve


@pytest.fixture(scope="module")
def multinode(checkpoint):
    from ray import serve
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    # Serve spreads replicas over nodes, so expert nodes keep a CPU beyond their shard's.
    nodes = [cluster.add_node(num_cpus=2, resources={"expert_node": 1}) for _ in range(3)]
    ray.init(address=cluster.address, namespace="herd-tests", log_to_driver=False)
    cluster.wait_for_nodes()
    start_serve(http_port := free_port(), grpc_port := free_port())
    served = Served(http_port, grpc_port, checkpoint)
    served.deploy(experts={"mode": "sharded", "num_shards": 3, "placement_strategy": "SPREAD",
                           "num_cpus_per_shard": 1, "resources_per_shard": {"expert_node": 1}})
    yield served, {n.node_id for n in nodes}
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_shards_on_distinct_expert_nodes(multinode):
    _, expert_nodes = multinode
    pool = ray.get_actor(POOL_NAME, namespace=NAMESPACE)
    infos = ray.get([h.info.remote() for h, _ in ray.get(pool.shards_and_ranges.remote())])
    assert len({i["node_id"] for i in infos}) == 3
    assert {i["node_id"] for i in infos} == expert_nodes
    assert sorted(tuple(i["experts"]) for i in infos) == [(0, 1), (1, 3), (3, 4)]


def test_serves_exact_tokens(multinode, checkpoint):
    served, _ = multinode
    offline = Engine.from_pretrained(checkpoint)
    ids = [offline.tokenizer.bos_id] + [(i * 13) % 500 + 3 for i in range(25)]
    want = offline.generate([ids], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].token_ids
    stub = herd_pb2_grpc.HerdStub(grpc.insecure_channel(served.grpc))
    req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids),
                             sampling=pb.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert [t for c in stub.Generate(req, timeout=120) for t in c.token_ids] == want
