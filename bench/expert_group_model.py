"""Modelled (not measured) decode step time of one engine replica: all experts on one GPU vs an
engine GPU + expert GPUs exchanging each MoE layer's rows over NCCL (bench/RESULTS.md, "expert group
on GPUs, modelled"). Memory-bound decode (weight reads at HBM bandwidth, compute ignored), uniform
top-1 routing, no micro-batch overlap (attention and experts serial), bf16, balanced shards.

    python bench/expert_group_model.py
"""

from __future__ import annotations

HBM = 3.35e12  # H100 SXM HBM3, bytes/s
EXPERT = 3 * 5120 * 8192 * 2  # one routed expert of Scout/Maverick in bf16 (gate, up, down)
ROW = 5120 * 2 + 4 + 4  # one token sent: hidden state (bf16), expert id (int32), gate score (fp32)
BATCHES = (1, 2, 8, 32, 64, 128, 256, 512)


def experts_hit(num_experts: int, batch: int) -> float:
    """Distinct experts a layer reads at `batch` tokens (uniform top-1 routing)."""
    return num_experts * (1 - ((num_experts - 1) / num_experts) ** batch)


def step_times(num_experts: int, moe_layers: int, dense_bytes: float, expert_gpus: int, remote: float,
               link_bytes_s: float, latency_s: float, host_s: float) -> list[tuple]:
    """(batch, experts hit per layer, exchange us per layer, all-in-one ms, sharded ms, ratio) per batch.
    `remote`: the fraction of rows that cross the slow link; `latency_s`: one message's fixed cost;
    `host_s`: host-side cost per MoE layer (Python, launches, syncs) on top of the exchange."""
    rows = []
    for b in BATCHES:
        hit = experts_hit(num_experts, b)
        t_all = (dense_bytes + moe_layers * hit * EXPERT) / HBM
        per_shard = max(hit / expert_gpus, 1.0) * EXPERT / HBM  # the busiest shard, one expert at least
        exchange = 2 * latency_s + 2 * b * ROW * remote / link_bytes_s  # dispatch + combine
        t_sharded = dense_bytes / HBM + moe_layers * (per_shard + exchange + host_s)
        rows.append((b, hit, 1e6 * exchange, 1e3 * t_all, 1e3 * t_sharded, t_all / t_sharded))
    return rows


SETUPS = {
    # 1 engine GPU + 3 expert GPUs on one node, NVLink (~150 GB/s achieved by DeepEP intranode),
    # ~3 us per small NCCL send/recv (nccl-tests, 2 H100)
    "Scout (16 experts, 48 MoE layers), 1 engine + 3 expert GPUs, NVLink":
        dict(num_experts=16, moe_layers=48, dense_bytes=22e9, expert_gpus=3, remote=1.0, link_bytes_s=150e9,
             latency_s=3e-6),
    # 1 engine GPU + 15 expert GPUs over 2 nodes; 8 of 15 shards across one 400 Gb/s NIC (~50 GB/s),
    # ~12 us per small message over the network (NCCL's own tuning model: base 6.6 us + 5 us NET)
    "Maverick (128 experts, 24 MoE layers), 1 engine + 15 expert GPUs, 2 nodes, InfiniBand":
        dict(num_experts=128, moe_layers=24, dense_bytes=28e9, expert_gpus=15, remote=8 / 15, link_bytes_s=50e9,
             latency_s=12e-6),
}

if __name__ == "__main__":
    for host_s in (0.0, 50e-6):
        for name, setup in SETUPS.items():
            print(f"{name}; host overhead {1e6 * host_s:.0f} us per MoE layer")
            for b, hit, exchange, t_all, t_sharded, ratio in step_times(**setup, host_s=host_s):
                print(f"  batch {b:4d}: {hit:5.1f} experts hit/layer, exchange {exchange:6.1f} us/layer, "
                      f"all-in-one {t_all:6.1f} ms, sharded {t_sharded:6.1f} ms, ratio {ratio:.2f}")
