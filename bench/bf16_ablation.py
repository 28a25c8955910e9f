"""Where bf16's disagreement with fp32 comes from: the text decoder's forward re-implemented with
switches, each variant keeping some part of a bf16 forward in fp32 (or, from fp32, adding one of
bf16's roundings or noise of its size), measured as greedy top-1 agreement with fp32,
teacher-forced on fp32's greedy tokens (whole-sequence forward, no engine), with the agreement on
positions whose fp32 top-1 margin exceeds 0.05 / 0.1 / 0.2 and the share of MoE routing decisions
that differ from fp32's. "plain bf16" is the forward before model/precision.py; "policy" is what
model/precision.py does (plus the MoE sum in fp32, which alone changes nothing). The numbers are in
bench/RESULTS.md (bf16 section).

    python bench/bf16_ablation.py tiny-scout bf16 16 64            # preset, weights, prompts, tokens
    python bench/bf16_ablation.py small-scout bf16 16 64 "plain bf16" "policy"
"""

import random
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import load
from model.rope import text_inv_freq, text_rope
from model.synth import synthesize
from model.text import causal_masks

torch.set_num_threads(1)
BF = torch.bfloat16


def norm(mod, x, o):
    out = F.rms_norm(x.float(), (x.shape[-1],), eps=mod.eps)
    w = mod.weight
    if o.get("norm_w32"):
        out = out * w.float() if w is not None else out
        return out.to(o.get('dt', BF))
    out = out.to(o.get('dt', BF))
    return out * w if w is not None else out


def rb(t):
    return t.to(BF).to(t.dtype)


_linear = F.linear


def linear_rin(x, w, b=None):
    return _linear(rb(x), w, b)


def attention(attn, x, positions, rope, mask, o):
    q, k, v = attn.qkv(x, positions, rope)
    if o.get("rin"):
        q, k, v = rb(q), rb(k), rb(v)
    if o.get("attn32"):
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=attn.scale, enable_gqa=True).transpose(0, 1)
    return attn.o_proj(out.to(o.get('dt', BF)).flatten(1))


def moe(ff, x, o):
    w = ff.router.weight
    if o.get("router32"):
        logits = F.linear(x.float(), w.float())
    else:
        logits = F.linear(x, w)
    top, ids = torch.topk(logits, ff.router.top_k, dim=-1)
    o.setdefault("routes", []).append(ids)
    t2 = torch.topk(logits.float(), 2, dim=-1).values
    o.setdefault("rmargin", []).append(t2[:, 0] - t2[:, 1])
    scores = torch.sigmoid(top.float())
    shared = ff.shared_expert(x)
    ex = ff.experts
    if o.get("experts32"):
        gu, dn = ex.gate_up_proj.float(), ex.down_proj.float()
        out = torch.zeros_like(x, dtype=torch.float32)
        for j in range(ids.shape[1]):
            xi = x.float() * scores[:, j:j + 1]
            if o.get("rin"):
                xi = rb(xi)
            g, u = torch.bmm(xi[:, None, :], gu[ids[:, j]]).squeeze(1).chunk(2, -1)
            a = F.silu(g) * u
            if o.get("rin"):
                a = rb(a)
            out += torch.bmm(a[:, None, :], dn[ids[:, j]]).squeeze(1)
        routed = out
    else:
        routed = ex(x, ids, scores)
    if o.get("moe_sum32"):
        return shared.float() + routed.float()
    return shared + routed.to(o.get('dt', BF))


def decode(model, ids, o):
    text = model.language_model
    positions = torch.arange(ids.shape[0])
    x = text.model.embed_tokens(ids)
    rope = text_rope(text_inv_freq(text.cfg), positions)
    masks = causal_masks(text.cfg, positions)
    r = x.float() if o.get("resid32") else x
    s = r  # what the next norm reads (fadd: the unrounded fp32 sum, residual kept in bf16)

    def add(r, d):
        if o.get("fadd"):
            s = r.float() + d.float()
            return s.to(r.dtype), s
        r = r + d.to(r.dtype)
        if o.get("rres"):
            r = rb(r)
        return r, r

    for i, layer in enumerate(text.model.layers):
        mask = masks[text.cfg.is_chunked(i)]
        a = attention(layer.self_attn, norm(layer.input_layernorm, s, o), positions, rope, mask, o)
        r, s = add(r, a)
        if o.get("noise"):
            r = r * (1 + o["noise"] * torch.randn(r.shape, generator=o["gen"]))
            s = r
        h = norm(layer.post_attention_layernorm, s, o)
        m = moe(layer.feed_forward, h, o) if layer.is_moe else layer.feed_forward(h)
        r, s = add(r, m)
    r = s
    h = norm(text.model.norm, r, o)
    if o.get("rhead"):
        h = rb(h)
    if o.get("head32"):
        return F.linear(h.float(), text.lm_head.weight.float())
    return text.lm_head(h).float()


def flipped_margins(m: torch.Tensor) -> str:
    return f"median {m.median():.4f} max {m.max():.4f}" if m.numel() else "none"


VARIANTS = {
    "plain bf16": {},
    "norm weight in fp32": {"norm_w32": 1},
    "router fp32": {"router32": 1},
    "attention fp32": {"attn32": 1},
    "experts fp32": {"experts32": 1},
    "moe sum fp32": {"moe_sum32": 1},
    "lm_head out fp32": {"head32": 1},
    "residual fp32": {"resid32": 1},
    "norm weight + router + logits fp32": {"norm_w32": 1, "router32": 1, "head32": 1},
    "policy": {"norm_w32": 1, "router32": 1, "head32": 1, "resid32": 1, "moe_sum32": 1},
    "same + fused add (bf16 residual, fp32 sum)": {"norm_w32": 1, "router32": 1, "head32": 1, "fadd": 1},
    "fp32 + noise 2^-9/sqrt3 per layer": {"dt": torch.float32, "noise": 2**-9 / 3**0.5},
    "fp32, lm_head input rounded": {"dt": torch.float32, "rhead": 1},
    "fp32, residual rounded per layer": {"dt": torch.float32, "rres": 1},
    "fp32, all GEMM inputs rounded": {"dt": torch.float32, "rin": 1, "experts32": 1},
    "all of the above": {"norm_w32": 1, "router32": 1, "head32": 1, "resid32": 1, "moe_sum32": 1,
                         "attn32": 1, "experts32": 1},
}


def main():
    preset = sys.argv[1]
    wdtype = {"bf16": BF, "fp32": torch.float32}[sys.argv[2]]
    n_prompts, new = int(sys.argv[3]), int(sys.argv[4])
    only = sys.argv[5:] or list(VARIANTS)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(8, 40))] for _ in range(n_prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(tmp, preset, seed=5, dtype=wdtype, progress=False)
        m32 = load(tmp, dtype=torch.float32)
        m16 = load(tmp, dtype=BF)
    seqs, want, logit32 = [], [], []
    with torch.inference_mode():
        for p in prompts:
            seq = list(p)
            for _ in range(new):  # greedy fp32, whole-sequence forward each step
                seq.append(int(m32.logits(seq)[-1].argmax()))
            full = m32.logits(seq[:-1])[len(p) - 1:]
            assert full.argmax(-1).tolist() == seq[len(p):]
            seqs.append(torch.tensor(seq[:-1]))
            want.append(torch.tensor(seq[len(p):]))
            logit32.append(full)
        logits32 = torch.cat(logit32)
        tokens32 = torch.cat(want)
        top2 = logits32.topk(2, -1).values
        margin = top2[:, 0] - top2[:, 1]
        print(f"{preset} weights {sys.argv[2]}: {len(tokens32)} positions; fp32 logit std {logits32.std():.3f}, "
              f"|logit| max {logits32.abs().max():.2f}; margin quantiles 10/25/50%: "
              f"{margin.quantile(0.1):.4f} {margin.quantile(0.25):.4f} {margin.quantile(0.5):.4f}; "
              f"share with margin < 0.01/0.05/0.1: {(margin < 0.01).float().mean():.3f} "
              f"{(margin < 0.05).float().mean():.3f} {(margin < 0.1).float().mean():.3f}")
        ref_routes, ref_rm = [], []
        for s_, p in zip(seqs, prompts, strict=True):
            o32 = {"dt": torch.float32}
            out = decode(m32, s_, o32)
            assert torch.allclose(out, m32.logits(s_), atol=1e-4)
            ref_routes.append(torch.stack(o32["routes"])[:, len(p) - 1:])  # [layers, n, k]
            ref_rm.append(torch.stack(o32["rmargin"])[:, len(p) - 1:])
        routes32 = torch.cat(ref_routes, 1)
        router_margin = torch.cat(ref_rm, 1)
        print(f"  router top-1 margin (fp32, all MoE layers x positions): quantiles 1/5/10/50%: "
              f"{[round(router_margin.quantile(q).item(), 4) for q in (0.01, 0.05, 0.1, 0.5)]}")
        for name in only:
            o = VARIANTS[name]
            model = m32 if o.get("dt") == torch.float32 else m16
            outs, routes = [], []
            F.linear = linear_rin if o.get("rin") else _linear
            for s_, p in zip(seqs, prompts, strict=True):
                oo = dict(o)
                if "noise" in oo:
                    oo["gen"] = torch.Generator().manual_seed(len(routes))
                outs.append(decode(model, s_, oo)[len(p) - 1:])
                routes.append(torch.stack(oo["routes"])[:, len(p) - 1:])
            got, got_routes = torch.cat(outs), torch.cat(routes, 1)
            ok = got.argmax(-1) == tokens32
            rflip = (got_routes != routes32).any(-1)  # [layers, n]
            anyr = rflip.any(0)
            dl = (got - logits32).abs()
            parts = " ".join(f">{t}:{ok[margin > t].float().mean():.4f}" for t in (0.05, 0.1, 0.2))
            print(f"  {name:28s} agree {ok.float().mean():.4f} ({int((~ok).sum())} flips) {parts} "
                  f"|dlogit| mean {dl.mean():.4f} max {dl.max():.2f}; route flips {rflip.float().mean():.4f} "
                  f"(pos with any {anyr.float().mean():.3f}); agree where no route flip "
                  f"{ok[~anyr].float().mean():.4f}, token flips at pos with route flip {int((~ok & anyr).sum())}; "
                  f"fp32 router margin at route flips: {flipped_margins(router_margin[rflip])}")


if __name__ == "__main__":
    main()
