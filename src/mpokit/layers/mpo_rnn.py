"""MPOLSTM and MPOGRU: nn.LSTM / nn.GRU whose gate matrices are MPO cores.

Every layer (and direction) holds weight_ih (G*H, in) and weight_hh (G*H, H) as MPOs (G = 4 gates
for LSTM, 3 for GRU); biases stay dense under torch's names. The forward is torch's recurrence,
written as a plain PyTorch loop over time:
  LSTM  i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh);  c' = s(f) c + s(i) tanh(g);  h' = s(o) tanh(c')
  GRU   r, z = s(split(W_ih x + b_ih + W_hh h + b_hh)[:2]);  n = tanh(x_n + b_in + r (W_hn h + b_hn))
        h' = (1 - z) n + z h
The input projection runs once for the whole sequence; the hidden one once per step. Each matrix
picks its path by FLOPs as MPOLinear does: the rebuilt matrix (rebuilt once per call) or the
cores applied one at a time (the low-rank layout as two GEMMs).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpokit.layers.base import MpokitLayer
from mpokit.layers.mpo import CONTRACT_OVERHEAD, FORWARD_MODES, LOWRANK_OVERHEAD, MPOCores, make_layout
from mpokit.ops.contract import contract_flops, dense_flops, reconstruct_flops, tt_apply
from mpokit.ops.tt import TTInfo

__all__ = ["MPOMatrix", "MPORNN", "MPOLSTM", "MPOGRU", "rnn_matrices"]


def rnn_matrices(rnn: nn.RNNBase) -> dict[str, torch.Tensor]:
    """torch's weight_ih_l{k}[_reverse] / weight_hh_l{k}[_reverse] of an LSTM or GRU, in torch's order."""
    return {n: getattr(rnn, n) for n in _weight_names(rnn.num_layers, 2 if rnn.bidirectional else 1)}


def _weight_names(num_layers: int, dirs: int, kind: str = "weight") -> list[str]:
    return [f"{kind}_{part}_l{k}{'_reverse' if d else ''}" for k in range(num_layers) for d in range(dirs)
            for part in ("ih", "hh")]


class MPOMatrix(MPOCores, nn.Module):
    """One (rows, cols) gate matrix as MPO cores (layers/mpo.MPOCores storage), with the two forward paths."""

    def __init__(self, rows, cols, out_dims, in_dims, bonds, device=None, dtype=None):
        super().__init__()
        self.rows, self.cols = rows, cols
        self._init_cores(out_dims, in_dims, bonds, device, dtype)

    def decompose_(self, weight: torch.Tensor, *, max_bond=None, cutoff=None, max_params=None) -> None:
        self._decompose(weight, max_bond=max_bond, cutoff=cutoff, max_params=max_params)

    def matrix(self) -> torch.Tensor:
        """The rebuilt matrix: with autograd when training, else cached until a core changes."""
        return self.full_weight() if self._needs_grad() else self.cached_weight()

    def contract_cost(self, batch: int, calls: int) -> tuple[float, float]:
        """(dense, contract) FLOPs of `calls` products with (batch, cols) inputs; dense rebuilds once."""
        shapes = [tuple(c.shape) for c in self.cores]
        dense = calls * dense_flops(batch, self.rows, self.cols)
        if self._needs_grad():
            dense += reconstruct_flops(shapes)
        if self.is_lowrank:
            r = self.bonds[0]
            lowrank = calls * (dense_flops(batch, r, self.cols) + dense_flops(batch, self.rows, r))
            return dense, (LOWRANK_OVERHEAD if self._needs_grad() else 1.0) * lowrank
        return dense, CONTRACT_OVERHEAD * calls * contract_flops(batch, shapes)

    def operator(self, batch: int, calls: int, mode: str):
        """x (batch, cols) -> x @ W.T (batch, rows), by the path `mode` ("auto" picks by FLOPs)."""
        if mode == "auto":
            dense, contract = self.contract_cost(batch, calls)
            mode = "contract" if contract < dense else "dense"
        if mode == "dense":
            w = self.matrix()
            return lambda x: x @ w.T
        if self.is_lowrank:
            u = self.cores[0].reshape(self.out_dims[0], -1)[: self.rows]  # (rows, r)
            v = self.cores[1].reshape(-1, self.in_dims[1])[:, : self.cols]  # (r, cols)
            return lambda x: (x @ v.T) @ u.T
        pad = math.prod(self.in_dims) - self.cols
        return lambda x: tt_apply(F.pad(x, (0, pad)) if pad else x, list(self.cores))[:, : self.rows]

    def spec(self) -> dict[str, Any]:
        return {"out_dims": self.out_dims, "in_dims": self.in_dims, "bonds": self.bonds}


class MPORNN(MpokitLayer, nn.Module, register=False):
    """Shared by MPOLSTM and MPOGRU: hyperparameters, MPO gate matrices, dense biases, the time loop."""

    gates: int  # 4 (LSTM) or 3 (GRU)
    dense_type: type

    def __init__(self, input_size, hidden_size, layouts: dict[str, dict], num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, forward_mode="auto", device=None, dtype=None):
        super().__init__()
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"expected forward_mode in {FORWARD_MODES}, got {forward_mode!r}")
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional, self.forward_mode = bool(bidirectional), forward_mode
        names = _weight_names(self.num_layers, self.num_directions)
        if sorted(layouts) != sorted(names):
            raise ValueError(f"expected layouts for {names}, got {sorted(layouts)}")
        self.mpo = nn.ModuleDict()
        for name in names:
            rows, cols = self.matrix_shape(name)
            lay = layouts[name]
            self.mpo[name] = MPOMatrix(rows, cols, lay["out_dims"], lay["in_dims"],
                                       lay.get("bonds") or [1] * (len(lay["out_dims"]) - 1), device, dtype)
        for name in _weight_names(self.num_layers, self.num_directions, "bias") if self.bias else ():
            setattr(self, name, nn.Parameter(torch.zeros(self.gates * self.hidden_size, device=device, dtype=dtype)))

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def matrix_shape(self, name: str) -> tuple[int, int]:
        """(G*H, in) of weight_ih_l{k}[_reverse], (G*H, H) of weight_hh_l{k}[_reverse]."""
        layer = int(name.split("_l")[1].split("_")[0])
        if "_hh_" in name:
            cols = self.hidden_size
        else:
            cols = self.input_size if layer == 0 else self.hidden_size * self.num_directions
        return self.gates * self.hidden_size, cols

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def empty_like(cls, rnn: nn.RNNBase, layouts: dict[str, dict], forward_mode="auto") -> "MPORNN":
        """A layer with rnn's hyperparameters and biases; cores zero until set_cores / decompose_."""
        check_rnn(rnn, cls.dense_type)
        w = rnn.weight_ih_l0
        layer = cls(rnn.input_size, rnn.hidden_size, layouts, num_layers=rnn.num_layers, bias=rnn.bias,
                    batch_first=rnn.batch_first, dropout=rnn.dropout, bidirectional=rnn.bidirectional,
                    forward_mode=forward_mode, device=w.device, dtype=w.dtype)
        for name in _weight_names(rnn.num_layers, layer.num_directions, "bias") if rnn.bias else ():
            getattr(layer, name).data.copy_(getattr(rnn, name).detach())
        return layer

    @classmethod
    def from_rnn(cls, rnn: nn.RNNBase, *, num_cores=3, lowrank=False, max_bond=None, cutoff=None, max_params=None,
                 forward_mode="auto") -> "MPORNN":
        """Decompose every gate matrix; max_params is a budget per matrix (as MPOLinear's)."""
        mats = rnn_matrices(rnn)
        layouts = {n: dict(zip(("out_dims", "in_dims"), make_layout(*w.shape, num_cores, lowrank=lowrank)))
                   for n, w in mats.items()}
        layer = cls.empty_like(rnn, layouts, forward_mode)
        for name, w in mats.items():
            layer.mpo[name].decompose_(w, max_bond=max_bond, cutoff=cutoff, max_params=max_params)
        return layer

    def core_params(self) -> int:
        return sum(m.core_params() for m in self.mpo.values())

    @property
    def info(self) -> dict[str, TTInfo | None]:
        return {n: m.info for n, m in self.mpo.items()}

    def to_dense(self) -> nn.RNNBase:
        w = self.mpo["weight_ih_l0"].cores[0]
        rnn = self.dense_type(self.input_size, self.hidden_size, num_layers=self.num_layers, bias=self.bias,
                              batch_first=self.batch_first, dropout=self.dropout, bidirectional=self.bidirectional,
                              device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for name, m in self.mpo.items():
                getattr(rnn, name).copy_(m.full_weight())
            for name in _weight_names(self.num_layers, self.num_directions, "bias") if self.bias else ():
                getattr(rnn, name).copy_(getattr(self, name))
        return rnn

    # ---- forward ---------------------------------------------------------------------------
    def cell(self, gx: torch.Tensor, h, hh, b_hh):
        """One step from the input projection gx (B, G*H) and the state; returns (h', state')."""
        raise NotImplementedError

    def _run(self, x: torch.Tensor, state, layer: int, direction: int):
        """One layer and direction over x (T, B, in); returns (outputs (T, B, H), final state)."""
        suffix = f"_l{layer}{'_reverse' if direction else ''}"
        t, b = x.shape[0], x.shape[1]
        ih = self.mpo[f"weight_ih{suffix}"].operator(t * b, 1, self.forward_mode)
        hh = self.mpo[f"weight_hh{suffix}"].operator(b, t, self.forward_mode)
        gx = ih(x.reshape(t * b, -1)).reshape(t, b, -1)  # (T, B, G*H)
        if self.bias:
            gx = gx + getattr(self, f"bias_ih{suffix}")
        b_hh = getattr(self, f"bias_hh{suffix}") if self.bias else None
        steps = range(t - 1, -1, -1) if direction else range(t)
        outs = [None] * t
        for s in steps:
            h, state = self.cell(gx[s], state, hh, b_hh)
            outs[s] = h
        return torch.stack(outs), state

    def _initial(self, hx, batch: int, x: torch.Tensor):
        """Per (layer, direction) initial states from hx, or zeros."""
        raise NotImplementedError

    def _final(self, states):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, hx=None):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected a padded tensor input, got {type(x).__name__} (packed sequences are not "
                             "supported by MPO RNN layers; pad the batch)")
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_size:
            raise ValueError(f"expected input (T, B, {self.input_size}), (B, T, {self.input_size}) with batch_first, "
                             f"or unbatched (T, {self.input_size}); got shape {tuple(x.shape)}")
        unbatched = x.dim() == 2
        if unbatched:
            x = x[:, None]  # (T, 1, in)
            hx = _map_state(hx, lambda t: t[:, None])
        elif self.batch_first:
            x = x.transpose(0, 1)  # (T, B, in)
        states = self._initial(hx, x.shape[1], x)
        finals, inp = [], x
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                out, st = self._run(inp, states[layer * self.num_directions + d], layer, d)
                outs.append(out)
                finals.append(st)
            inp = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]  # (T, B, D*H)
            if self.dropout and self.training and layer < self.num_layers - 1:
                inp = F.dropout(inp, self.dropout, training=True)
        out = inp
        hn = self._final(finals)
        if unbatched:
            return out[:, 0], _map_state(hn, lambda t: t[:, 0])
        return (out.transpose(0, 1) if self.batch_first else out), hn

    # ---- protocol -----------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "input_size": self.input_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "bias": self.bias, "batch_first": self.batch_first,
                "dropout": self.dropout, "bidirectional": self.bidirectional, "forward_mode": self.forward_mode,
                "matrices": {n: m.spec() for n, m in self.mpo.items()}}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device=None, dtype=None) -> "MPORNN":
        return cls(spec["input_size"], spec["hidden_size"], spec["matrices"], num_layers=spec["num_layers"],
                   bias=spec["bias"], batch_first=spec["batch_first"], dropout=spec["dropout"],
                   bidirectional=spec["bidirectional"], forward_mode=spec.get("forward_mode", "auto"),
                   device=device, dtype=dtype)

    def extra_repr(self) -> str:
        bonds = {n: m.bonds for n, m in self.mpo.items()}
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, bonds={bonds}")


def check_rnn(rnn: nn.Module, kind: type) -> None:
    if type(rnn) is not kind:
        raise ValueError(f"expected an nn.{kind.__name__}, got {type(rnn).__name__}")
    if getattr(rnn, "proj_size", 0):
        raise ValueError(f"expected an LSTM without projections (proj_size=0), got proj_size={rnn.proj_size}")


def _map_state(hx, fn):
    if hx is None:
        return None
    return tuple(fn(t) for t in hx) if isinstance(hx, tuple) else fn(hx)


def _zeros_or(hx, shape, x) -> list[torch.Tensor]:
    if hx is None:
        return list(x.new_zeros(shape))
    if tuple(hx.shape) != shape:
        raise ValueError(f"expected a hidden state of shape {shape}, got {tuple(hx.shape)}")
    return list(hx)


class MPOLSTM(MPORNN):
    """Drop-in for nn.LSTM (proj_size=0) whose gate matrices are MPO cores."""

    gates, dense_type = 4, nn.LSTM

    def cell(self, gx, state, hh, b_hh):
        h, c = state
        g = gx + hh(h) if b_hh is None else gx + hh(h) + b_hh  # (B, 4H)
        i, f, gg, o = g.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)

    def _initial(self, hx, batch, x):
        shape = (self.num_layers * self.num_directions, batch, self.hidden_size)
        if hx is not None and not (isinstance(hx, tuple) and len(hx) == 2):
            raise ValueError("expected hx = (h_0, c_0) for an LSTM")
        h0, c0 = (None, None) if hx is None else hx
        return list(zip(_zeros_or(h0, shape, x), _zeros_or(c0, shape, x)))

    def _final(self, states):
        return torch.stack([h for h, _ in states]), torch.stack([c for _, c in states])


class MPOGRU(MPORNN):
    """Drop-in for nn.GRU whose gate matrices are MPO cores."""

    gates, dense_type = 3, nn.GRU

    def cell(self, gx, h, hh, b_hh):
        gh = hh(h) if b_hh is None else hh(h) + b_hh  # (B, 3H)
        xr, xz, xn = gx.chunk(3, dim=1)
        hr, hz, hn = gh.chunk(3, dim=1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        return h, h

    def _initial(self, hx, batch, x):
        if isinstance(hx, tuple):
            raise ValueError("expected hx = h_0 (a tensor) for a GRU, got a tuple")
        return _zeros_or(hx, (self.num_layers * self.num_directions, batch, self.hidden_size), x)

    def _final(self, states):
        return torch.stack(states)
