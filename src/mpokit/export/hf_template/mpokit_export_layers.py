"""Written by `mpokit export --format hf` (copied verbatim): mpokit's layers as plain nn.Modules.

Each class is built from the spec mpokit wrote for the layer (config.json's `mpokit_layers`) and holds
its tensors under the names of mpokit's checkpoints (cores.K, qweight.packed/scale/offset, w_in, router...),
so the folder's safetensors load into them unchanged. Forward passes follow mpokit's float paths,
including its choice between contracting MPO cores and rebuilding the weight.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .mpokit_export_ops import (contract_flops, core_shapes, dequantize, expert_hidden, reconstruct_flops,
                                run_experts, tt_apply, tt_rows, tt_to_matrix, unpack_bits)


# ---- quantized storage ----------------------------------------------------------------------------
class FollowsDtype(nn.Module):
    """Layers without float parameters of their own compute in the model's dtype, followed through casts."""

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        try:
            self.compute_dtype = fn(torch.zeros((), dtype=self.compute_dtype)).dtype
        except Exception:  # a fn meant for real tensors only: the dtype stays
            pass
        return out


class QuantizedTensor(nn.Module):
    def __init__(self, rows, cols, bits, group_size, symmetric, zero_point):
        super().__init__()
        self.rows, self.cols, self.bits, self.group_size = rows, cols, bits, group_size
        groups = math.ceil(cols / group_size)
        self.register_buffer("packed", torch.zeros(math.ceil(rows * cols * bits / 8), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows, groups, dtype=torch.float16))
        offset = None if symmetric else torch.zeros(rows, groups, dtype=torch.uint8 if zero_point else torch.float16)
        self.register_buffer("offset", offset)

    def dequantize(self):
        codes = unpack_bits(self.packed, self.bits, self.rows * self.cols).reshape(self.rows, self.cols)
        return dequantize(codes, self.scale, self.offset, self.bits, self.group_size)

    def _apply(self, fn, recurse=True):  # .to(dtype) moves the 16-bit scales but keeps their type
        kept = {k: getattr(self, k).dtype for k in ("scale", "offset") if getattr(self, k) is not None}
        out = super()._apply(fn, recurse)
        for k, dtype in kept.items():
            setattr(self, k, getattr(self, k).to(dtype))
        return out


def _quantized(spec, rows, cols):
    zero_point = spec.get("zero_point", True)
    return QuantizedTensor(rows, cols, spec["bits"], spec["group_size"], spec["symmetric"], zero_point)


# ---- layers, built from the specs mpokit wrote (config.mpokit_layers) ----------------------------
class MPOLinear(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.in_features, self.out_features = spec["in_features"], spec["out_features"]
        self.out_dims, self.in_dims, self.forward_mode = spec["out_dims"], spec["in_dims"], spec["forward_mode"]
        self.cores = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in
                                      core_shapes(self.out_dims, self.in_dims, spec["bonds"]))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if spec.get("bias") else None
        self.rows, self.cols, self._cache = self.out_features, self.in_features, None

    def _needs_grad(self):
        return torch.is_grad_enabled() and any(c.requires_grad for c in self.cores)

    def full_weight(self):
        return tt_to_matrix(list(self.cores))[: self.rows, : self.cols]

    def cached_weight(self):  # rebuilt only when a core changes (outside autograd)
        key = tuple((id(c), c._version, c.device, c.dtype) for c in self.cores)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.full_weight().contiguous())
        return self._cache[1]

    def _apply(self, fn, recurse=True):
        self._cache = None
        return super()._apply(fn, recurse)

    @property
    def weight(self):
        return self.full_weight() if self._needs_grad() else self.cached_weight()

    def path(self, batch):
        """mpokit's choice: contract core by core when it costs fewer FLOPs than the dense matmul."""
        if self.forward_mode != "auto":
            return self.forward_mode
        shapes, grad = [tuple(c.shape) for c in self.cores], self._needs_grad()
        dense = 2 * batch * self.out_features * self.in_features + (reconstruct_flops(shapes) if grad else 0)
        lowrank = len(self.out_dims) == 2 and self.out_dims[1] == 1 and self.in_dims[0] == 1
        overhead = (1.25 if grad else 1.0) if lowrank else 2.0
        return "contract" if overhead * contract_flops(batch, shapes) < dense else "dense"

    def forward(self, x):
        lead, x2 = x.shape[:-1], x.reshape(-1, self.in_features)
        path = self.path(x2.shape[0])
        if path == "contract" and len(self.out_dims) == 2 and self.out_dims[1] == 1 and self.in_dims[0] == 1:
            u, v = self.cores[0].reshape(self.out_dims[0], -1), self.cores[1].reshape(-1, self.in_dims[1])
            y = F.linear(F.linear(x2, v[:, : self.in_features]), u[: self.out_features], self.bias)  # U (V x)
        elif path == "contract":
            xp = F.pad(x2, (0, math.prod(self.in_dims) - self.in_features))
            y = tt_apply(xp, list(self.cores))[:, : self.out_features]
            y = y + self.bias if self.bias is not None else y
        else:
            y = F.linear(x2, self.weight, self.bias)
        return y.reshape(*lead, self.out_features)


class MPOEmbedding(MPOLinear):
    def __init__(self, spec):
        super().__init__({**spec, "in_features": spec["embedding_dim"], "out_features": spec["num_embeddings"]})
        self.num_embeddings, self.embedding_dim, self.padding_idx = (spec["num_embeddings"], spec["embedding_dim"],
                                                                     spec.get("padding_idx"))

    def forward(self, ids):
        if self.forward_mode == "dense" or (self.forward_mode == "auto" and not self._needs_grad()):
            return F.embedding(ids, self.weight, self.padding_idx)
        rows = tt_rows(ids.reshape(-1), list(self.cores))[:, : self.embedding_dim]
        return rows.reshape(*ids.shape, self.embedding_dim)


class QuantLinear(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.in_features, self.out_features = spec["in_features"], spec["out_features"]
        self.qweight = _quantized(spec, self.out_features, self.in_features)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if spec.get("bias") else None

    @property
    def weight(self):
        return self.qweight.dequantize()

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.qweight.dequantize().to(x.dtype), bias)


class QuantEmbedding(FollowsDtype):
    def __init__(self, spec):
        super().__init__()
        self.num_embeddings, self.embedding_dim = spec["num_embeddings"], spec["embedding_dim"]
        self.qweight = _quantized(spec, self.num_embeddings, self.embedding_dim)
        self.padding_idx, self.compute_dtype = spec.get("padding_idx"), torch.get_default_dtype()

    @property
    def weight(self):
        return self.qweight.dequantize().to(self.compute_dtype)

    def forward(self, ids):
        q, flat = self.qweight, ids.reshape(-1)
        packed = q.packed.view(q.rows, q.cols * q.bits // 8)[flat]  # (n, row bytes): only the rows looked up
        offset = None if q.offset is None else q.offset[flat]
        rows = dequantize(unpack_bits(packed, q.bits, q.cols), q.scale[flat], offset, q.bits, q.group_size)
        return rows.to(self.compute_dtype).reshape(*ids.shape, q.cols)


class QuantMPOLinear(FollowsDtype):
    def __init__(self, spec):
        super().__init__()
        self.in_features, self.out_features, self.in_dims = spec["in_features"], spec["out_features"], spec["in_dims"]
        self.shapes, self.quantized = core_shapes(spec["out_dims"], spec["in_dims"], spec["bonds"]), spec["quantized"]
        self.qcores = nn.ModuleDict({str(k): _quantized(spec, s[0] * s[1], s[2] * s[3])
                                     for k, s in enumerate(self.shapes) if k in self.quantized})
        self.fcores = nn.ParameterDict({str(k): nn.Parameter(torch.zeros(s))
                                        for k, s in enumerate(self.shapes) if k not in self.quantized})
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if spec.get("bias") else None
        self.compute_dtype = torch.get_default_dtype()

    def cores(self):
        return [self.qcores[str(k)].dequantize().to(self.compute_dtype).reshape(s) if k in self.quantized
                else self.fcores[str(k)] for k, s in enumerate(self.shapes)]

    @property
    def weight(self):
        return tt_to_matrix(self.cores())[: self.out_features, : self.in_features]

    def forward(self, x):
        lead, x2, cores = x.shape[:-1], x.reshape(-1, self.in_features), self.cores()
        dense = 2 * x2.shape[0] * self.out_features * self.in_features + reconstruct_flops(self.shapes)
        if 2.0 * contract_flops(x2.shape[0], self.shapes) < dense:
            y = tt_apply(F.pad(x2, (0, math.prod(self.in_dims) - self.in_features)), cores)[:, : self.out_features]
            y = y + self.bias if self.bias is not None else y
        else:
            y = F.linear(x2, tt_to_matrix(cores)[: self.out_features, : self.in_features], self.bias)
        return y.reshape(*lead, self.out_features)


# ---- routed FFNs: experts stacked as w_in (E, g*m, d), w_out (E, m, d_out); g = 2 when gated -----
def _activation(name):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class ExpertRouter(nn.Module):
    def __init__(self, hidden_size, experts, router_hidden):
        super().__init__()
        self.net = (nn.Sequential(nn.Linear(hidden_size, router_hidden), nn.ReLU(), nn.Linear(router_hidden, experts))
                    if router_hidden > 0 else nn.Sequential(nn.Linear(hidden_size, experts)))

    def forward(self, x):
        return self.net(x)


class MoEFFN(nn.Module):
    """A dense FFN split into experts (MoEfication); experts 0..s-1 always run, the router picks top_k."""

    def __init__(self, spec):
        super().__init__()
        E, m, d, g = spec["num_experts"], spec["expert_size"], spec["hidden_size"], 2 if spec["gated"] else 1
        self.hidden_size, self.out_features, self.top_k = d, spec["out_features"], spec["top_k"]
        self.gated, self.forward_mode, self.shared = spec["gated"], spec["forward_mode"], spec.get("shared_experts", 0)
        self.act_fn = _activation(spec["act"])
        self.w_in = nn.Parameter(torch.zeros(E, g * m, d))
        self.b_in = nn.Parameter(torch.zeros(E, g * m)) if spec["bias_in"] else None
        self.w_out = nn.Parameter(torch.zeros(E, m, self.out_features))
        self.b_out = nn.Parameter(torch.zeros(self.out_features)) if spec["bias_out"] else None
        self.router = ExpertRouter(d, E - self.shared, spec["router_hidden"])
        self.register_buffer("neuron_order", torch.arange(E * m))  # dense position of each expert neuron

    def forward(self, x):
        lead, x2, s = x.shape[:-1], x.reshape(-1, self.hidden_size), self.shared
        sel = self.router(x2).topk(self.top_k, dim=-1).indices  # (T, k) routed experts
        b_in = None if self.b_in is None else self.b_in[s:]
        y = run_experts(self.forward_mode, x2, sel, self.w_in[s:], b_in, self.w_out[s:], self.act_fn, self.gated)
        if s:  # the always-on experts, as one dense slice
            gm = self.w_in.shape[1]
            b = None if self.b_in is None else self.b_in[:s].reshape(-1)
            h = F.linear(x2, self.w_in[:s].reshape(s * gm, -1), b).view(-1, s, gm)  # (T, s, g*m)
            h = expert_hidden(h, self.act_fn, self.gated)
            y = y + h.reshape(h.shape[0], -1) @ self.w_out[:s].reshape(-1, self.out_features)
        y = y + self.b_out if self.b_out is not None else y
        return y.reshape(*lead, self.out_features)


class UpcycledMoE(nn.Module):
    """Softmax router, top-k experts; top-2+ weights renormalised, top-1 weight p / p.detach()."""

    def __init__(self, spec):
        super().__init__()
        E, N, d, g = spec["num_experts"], spec["neurons"], spec["hidden_size"], 2 if spec["gated"] else 1
        self.hidden_size, self.out_features, self.top_k = d, spec["out_features"], spec["top_k"]
        self.gated, self.forward_mode, self.act_fn = spec["gated"], spec["forward_mode"], _activation(spec["act"])
        self.router = nn.Linear(d, E, bias=False)
        self.b_in = nn.Parameter(torch.zeros(E, g * N)) if spec["bias_in"] else None
        self.b_out = nn.Parameter(torch.zeros(self.out_features)) if spec["bias_out"] else None
        self.make_experts(spec, E, N, d, g)

    def make_experts(self, spec, E, N, d, g):
        self.w_in = nn.Parameter(torch.zeros(E, g * N, d))
        self.w_out = nn.Parameter(torch.zeros(E, N, self.out_features))

    def expert_weights(self):
        return self.w_in, self.w_out

    def forward(self, x):
        lead, x2 = x.shape[:-1], x.reshape(-1, self.hidden_size)
        probs = F.softmax(self.router(x2).float(), dim=-1)  # (T, E)
        top, sel = probs.topk(self.top_k, dim=-1)
        scale = top / top.detach() if self.top_k == 1 else top / top.sum(-1, keepdim=True)
        w_in, w_out = self.expert_weights()
        y = run_experts(self.forward_mode, x2, sel, w_in, self.b_in, w_out, self.act_fn, self.gated,
                        scale.to(x2.dtype))
        y = y + self.b_out if self.b_out is not None else y
        return y.reshape(*lead, self.out_features)


class ExpertMPO(nn.Module):
    """E matrices as MPOs sharing the central core (most parameters); the other cores are per expert."""

    def __init__(self, layout, num_experts):
        super().__init__()
        self.rows, self.cols, self.num_experts = layout["rows"], layout["cols"], num_experts
        shapes = core_shapes(layout["out_dims"], layout["in_dims"], layout["bonds"])
        self.central = max(range(len(shapes)), key=lambda k: math.prod(shapes[k]))
        self.cores = nn.ParameterList(nn.Parameter(torch.zeros(s if k == self.central else (num_experts, *s)))
                                      for k, s in enumerate(shapes))

    def matrices(self):  # (E, rows, cols)
        mats = [tt_to_matrix([c if k == self.central else c[e] for k, c in enumerate(self.cores)])
                for e in range(self.num_experts)]
        return torch.stack(mats)[:, : self.rows, : self.cols]


class MPOEFFN(UpcycledMoE):
    def make_experts(self, spec, E, N, d, g):
        self.mpos = nn.ModuleDict({n: ExpertMPO(lay, E) for n, lay in spec["layouts"].items()})

    def expert_weights(self):
        mats = {n: m.matrices() for n, m in self.mpos.items()}
        w_in = torch.cat([mats["gate"], mats["up"]], dim=1) if self.gated else mats["up"]  # (E, g*N, d)
        return w_in.contiguous(), mats["down"].transpose(1, 2).contiguous()  # (E, N, d_out)


class Passthrough(nn.Identity):
    """Stands where a routed FFN absorbed a model's own module (BERT's activation and output.dense)."""

    def __init__(self, spec=None):
        super().__init__()


LAYERS = {cls.__name__: cls for cls in (MPOLinear, MPOEmbedding, QuantLinear, QuantEmbedding, QuantMPOLinear,
                                        MoEFFN, UpcycledMoE, MPOEFFN, Passthrough)}

