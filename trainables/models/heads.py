"""Landmark heads: a global embedding (B, D) -> (B, 2, 40, 2) normalised (x, y) at ED and ES.

Every head starts with Dropout on the embedding (option ``dropout``, active in train mode only): a
nuisance parameter of the head that acts the same whatever the encoder regime (issue 8, part 3).

* ``mlp``: EchoGraphs' keypoint MLP (DOMAIN.md §3.2): Linear(D -> c_K) without activation (the
  "guiding layer"), then Linear + ELU down the channel list, then Linear(c_0 -> 160).
  Default (256, 256, 256): 304 k parameters at D = 512, 370 k at 768.
* ``gcn``: EchoGraphs' decoder (DOMAIN.md §3.1) with the node map made explicit: node ``f * 40 + p``
  is point p of frame f (0 = ED, 1 = ES). Linear(D -> 80 * c_K) gives every node its features, then
  graph layers (c_K -> c_K -> c_{K-1} ... -> c_0 -> 2, ELU between) output absolute (x, y) per node,
  with no output activation. Like EchoGraphs' SpiralConv, every layer is *anisotropic*: each
  neighbour relation or node pair has its own weights. The isotropic GCNConv used before cannot tell
  neighbours apart: on the complete graph its normalised adjacency is all 1/80, so all 80 predicted
  points were identical, and on the sparse graph its short fit ended at the mean-shape error (1.02).
  ``GRAPHS`` describes the graphs (``RelationalConv``, ``LearnedAdjacencyConv``; measurements there);
  both learn like the MLP (tests/test_heads.py). Default (16, 32, 32): 1.33 M / 1.34 M parameters
  (sparse / full) at D = 512, 1.98 M / 2.00 M at 768, between EchoGraphs' EFGCN (167 k) and EFGCNV2
  (2.4 M); the lift Linear(D -> 80 * 32) is most of it.

Both heads' last bias starts at the frame centre, so an untrained head points into the frame
(``start_at_frame_centre``: why, measured).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F

N_FRAMES, N_POINTS = 2, 40
# Every head's last bias starts here, so that an untrained head predicts the middle of the frame
# (landmarks are normalised to [0, 1]) rather than its corner: see ``start_at_frame_centre``.
FRAME_CENTRE = 0.5
N_NODES = N_FRAMES * N_POINTS
HEADS: dict[str, type] = {}
GRAPHS = {
    "sparse": "relational graph conv: self (root weight), contour-previous, contour-next, chord and time "
              "neighbours, each relation with its own weight matrix",
    "full": "complete graph with a learned weight per directed node pair (plus a root weight)",
}
RELATIONS = ("contour-previous", "contour-next", "chord", "time")  # the self relation is the root weight


def register_head(name: str):
    def wrap(cls):
        HEADS[name] = cls
        return cls
    return wrap


def head_options(name: str) -> list[str]:
    """The keyword options head ``name`` takes (besides ``in_dim``)."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    return [p for p in inspect.signature(HEADS[name].__init__).parameters if p not in ("self", "in_dim")]


def build_head(name: str, in_dim: int, **options) -> nn.Module:
    """Head ``name`` for embeddings of size ``in_dim``; None options mean the head's default."""
    valid = head_options(name)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for head {name!r}; valid: {', '.join(valid)}")
    return HEADS[name](in_dim, **options)


def check_graph(graph: str) -> None:
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}; choose one of {', '.join(GRAPHS)}")


def node(frame: int, point: int) -> int:
    return frame * N_POINTS + point


def relation_edges() -> dict[str, list[tuple[int, int]]]:
    """Directed (source, target) edges of each relation of the sparse graph, sorted.

    contour-previous: p-1 -> p and contour-next: p+1 -> p along each open contour (EchoGraphs' 40
    points walk up one wall and back down the other, DOMAIN.md §2.1); chord: 39-p -> p, the other end
    of the same chord; time: the same point p in the other frame. Every node has at most one source
    per relation, so mean and sum aggregation coincide (torch-geometric's RGCNConv, aggr="mean").
    """
    rel: dict[str, list[tuple[int, int]]] = {r: [] for r in RELATIONS}
    for f in range(N_FRAMES):
        for p in range(N_POINTS):
            if p > 0:
                rel["contour-previous"].append((node(f, p - 1), node(f, p)))
            if p < N_POINTS - 1:
                rel["contour-next"].append((node(f, p + 1), node(f, p)))
            rel["chord"].append((node(f, N_POINTS - 1 - p), node(f, p)))
            rel["time"].append((node(1 - f, p), node(f, p)))
    return {r: sorted(e) for r, e in rel.items()}


def landmark_edges(graph: str = "sparse") -> list[tuple[int, int]]:
    """Undirected edge list (each pair once, i < j) of the landmark graph."""
    check_graph(graph)
    if graph == "full":
        return [(i, j) for i in range(N_NODES) for j in range(i + 1, N_NODES)]
    pairs = {(min(s, t), max(s, t)) for edges in relation_edges().values() for s, t in edges}
    return sorted(pairs)


def neighbour_index() -> torch.Tensor:
    """(80, 5) ordered neighbour list per node: self, then one source per relation in ``RELATIONS``
    order; index 80 (a zero row) where a relation has no source (the contour ends)."""
    index = torch.full((N_NODES, 1 + len(RELATIONS)), N_NODES, dtype=torch.long)
    index[:, 0] = torch.arange(N_NODES)
    for r, edges in enumerate(relation_edges().values(), start=1):
        for source, target in edges:
            index[target, r] = source
    return index


def start_at_frame_centre(bias: torch.Tensor) -> None:
    """Start an output bias at the frame centre. From a bias at 0, every point starts at the frame's
    corner, ~60 px from the ventricle, and a head at the low end of the spaces' head learning rates
    (1e-4) spent its short run getting there: on the embedded default's data (tiny encoder, k = 0,
    4 epochs) the MLP ended at 9.1 px, the GCN at 17.8 (sparse) and 31.3 px (full graph), against
    7.3-7.8 px for all three started here, and 7.0-7.3 at 1e-3 either way; bench/record_curves.py's
    best configuration (6 epochs) ended at 3.47 px instead of 4.73. A constant start: the same for
    every input, node and checkpoint key, so a trained head computes what it did. (The fits quoted
    in the graph layers' docstrings below were measured before it.)"""
    with torch.no_grad():
        bias.fill_(FRAME_CENTRE)


# --- graph layers -------------------------------------------------------------------------------

class RelationalConv(nn.Module):
    """Relational graph conv on the sparse graph = EchoGraphs' SpiralConv on a short ordered list.

    Node i gathers [self, contour-previous, contour-next, chord, time] (zeros where absent) and one
    Linear(5 * C_in -> C_out) maps the concatenation, so each relation has its own C_in x C_out block:
    the function of torch-geometric's RGCNConv(aggr="mean") with a root weight, written as a gather +
    matmul that keeps the batch dimension (no per-sample graph copies).

    Init: torch's default Linear init, not EchoGraphs' Xavier. With Xavier the initial outputs spread
    over nodes with std 0.7-0.8 (default init 0.04; the target shapes 0.07) and the short fit of
    tests/test_heads.py ends at 0.75 of the mean-shape error instead of 0.34-0.35 (MLP 0.32-0.33, the
    old isotropic GCNConv head 1.02). RGCNConv's per-relation Glorot init is worse still (outputs ~8 at
    init and 3.8x the mean-shape error after a fit, on an earlier version of the same task).
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.register_buffer("index", neighbour_index(), persistent=False)
        self.lin = nn.Linear(c_in * self.index.shape[1], c_out)  # torch's default init, not Xavier: see above

    @property
    def bias(self) -> torch.Tensor:
        return self.lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, 1))  # node 80: the zero row for missing neighbours
        return self.lin(x[:, self.index].flatten(2))  # (B, 80, 5 * C_in) -> (B, 80, C_out)


class LearnedAdjacencyConv(nn.Module):
    """Complete-graph conv with a learned weight per directed pair: out_i = R x_i + sum_j A_ij W x_j + b.

    A (80 x 80) tells every pair apart and R is the self (root) weight, so the layer is anisotropic
    where GCNConv's all-1/80 adjacency made every node the mean. Chosen by measurement: the short fit
    of tests/test_heads.py (500 Adam steps at 3e-3, cosine; held-out error / mean-shape error; the MLP
    0.32-0.33) gives this layer 0.29-0.30 (seeds 0-2), and these alternatives (seed 0; dense batched
    versions checked equal to torch-geometric's layers to 1e-7): TransformerConv (4 heads, root
    weight) 0.33 at ~4x this layer's CPU time, 0.38 with a learned node embedding added to the lifted
    features (0.38 on every layer); GATv2Conv (4 heads, root weight) 0.32, with the embedding 0.33,
    at ~100x; this layer without R 0.47 (near-identical nodes at init); A started at 1/80 0.30;
    a literal SpiralConv on the complete graph 2.5 with all 80 points identical after the fit (the
    ordered lists of nodes i and i+1 differ in two of 80 slots), 13.9 with torch's default init.
    The lift's per-node bias already acts as a node embedding, probably why adding one did not help.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.root = nn.Linear(c_in, c_out)
        self.lin = nn.Linear(c_in, c_out, bias=False)
        self.adj = nn.Parameter(torch.randn(N_NODES, N_NODES) / N_NODES)  # A = 0 would leave W no gradient

    @property
    def bias(self) -> torch.Tensor:
        return self.root.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.root(x) + torch.matmul(self.adj, self.lin(x))


CONVS = {"sparse": RelationalConv, "full": LearnedAdjacencyConv}


# --- heads --------------------------------------------------------------------------------------

@register_head("mlp")
class MLPHead(nn.Module):
    def __init__(self, in_dim: int, channels: list[int] | tuple[int, ...] = (256, 256, 256),
                 dropout: float = 0.0):
        super().__init__()
        channels = list(channels)
        layers: list[nn.Module] = [nn.Dropout(dropout), nn.Linear(in_dim, channels[-1])]
        for c_in, c_out in zip(channels[::-1], channels[-2::-1]):
            layers += [nn.Linear(c_in, c_out), nn.ELU()]
        layers.append(nn.Linear(channels[0], N_NODES * 2))
        self.net = nn.Sequential(*layers)
        start_at_frame_centre(self.net[-1].bias)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb).view(-1, N_FRAMES, N_POINTS, 2)


@register_head("gcn")
class GCNHead(nn.Module):
    def __init__(self, in_dim: int, channels: list[int] | tuple[int, ...] = (16, 32, 32),
                 graph: str = "sparse", dropout: float = 0.0):
        super().__init__()
        check_graph(graph)
        channels = list(channels)
        self.graph = graph
        self.dropout = nn.Dropout(dropout)
        self.lift = nn.Linear(in_dim, N_NODES * channels[-1])
        dims = [channels[-1]] + channels[::-1] + [2]
        self.convs = nn.ModuleList(CONVS[graph](a, b) for a, b in zip(dims[:-1], dims[1:]))
        start_at_frame_centre(self.convs[-1].bias)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = self.lift(self.dropout(emb)).view(emb.shape[0], N_NODES, -1)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.elu(x)
        return x.view(-1, N_FRAMES, N_POINTS, 2)


class LandmarkModel(nn.Module):
    """Encoder + head: uint8 clip (B, 16, 112, 112) -> landmarks (B, 2, 40, 2) in [0, 1].

    Under bf16 autocast only the encoder runs in bf16: the head runs in fp32 on an fp32 embedding,
    because regressing coordinates to a fraction of a pixel needs more than bf16's 8 mantissa bits
    (1/112 of the frame is already at its resolution limit near 1.0).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, clip: torch.Tensor | None = None, prefix=None) -> torch.Tensor:
        """Landmarks of ``clip``, or of a batch whose frozen part ``prefix()`` was computed (or
        cached) before: then only the trainable suffix and the head run. Through a DDP wrapper,
        pass ``prefix=`` as a keyword."""
        if prefix is None:
            return self.run_head(self.encoder(clip))
        enc = self.encoder
        return self.run_head(prefix if enc.split == enc.n_blocks else enc.forward_suffix(prefix, enc.split))

    # --- the frozen part on its own (trainables/feature_cache.py) -------------------------------
    @property
    def has_prefix(self) -> bool:
        """Whether something before the trainable part is frozen (split > 0), so worth caching."""
        return bool(self.encoder.split)

    @torch.no_grad()
    def prefix(self, clip: torch.Tensor):
        """What ``encoder(clip)`` computes under no_grad: the blocks before ``split``, plus the final
        group when every block is frozen (k = 0: then this is the embedding). Frozen modules are in
        eval mode whatever the model's mode, so it draws no random numbers."""
        enc = self.encoder
        h = enc.forward_prefix(clip, enc.split)
        return enc.finish(h) if enc.split == enc.n_blocks else h

    def prefix_samples(self, h) -> list:
        enc = self.encoder
        return list(h.unbind(0)) if enc.split == enc.n_blocks else enc.prefix_samples(h)

    def prefix_batch(self, samples: list):
        enc = self.encoder
        return torch.stack(samples) if enc.split == enc.n_blocks else enc.prefix_batch(samples)

    def run_head(self, embedding: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embedding.device.type, enabled=False):
            return self.head(embedding.float())
