"""Landmark heads: a global embedding (B, D) -> (B, 2, 40, 2) normalised (x, y) at ED and ES.

* ``mlp``: EchoGraphs' keypoint MLP (DOMAIN.md §3.2): Linear(D -> c_K) without activation (the
  "guiding layer"), then Linear + ELU down the channel list, then Linear(c_0 -> 160).
* ``gcn``: EchoGraphs' decoder idea (DOMAIN.md §3.1) with the node mapping made explicit: a
  Linear(D -> 80 * c_K) gives every node its features, then graph convolutions (torch-geometric
  ``GCNConv``) down the channel list to 2 outputs (x, y) per node. Node ``f * 40 + p`` is point p
  of frame f (0 = ED, 1 = ES). Edges: along each contour (p, p+1), across each chord (p, 39-p),
  and in time (ED p, ES p); ``graph="full"`` connects every pair (EchoGraphs used full graphs).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

N_FRAMES, N_POINTS = 2, 40
N_NODES = N_FRAMES * N_POINTS
HEADS: dict[str, type] = {}
GRAPHS = ("sparse", "full")


def register_head(name: str):
    def wrap(cls):
        HEADS[name] = cls
        return cls
    return wrap


def build_head(name: str, in_dim: int, **options) -> nn.Module:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    return HEADS[name](in_dim, **{k: v for k, v in options.items() if v is not None})


def node(frame: int, point: int) -> int:
    return frame * N_POINTS + point


def landmark_edges(graph: str = "sparse") -> list[tuple[int, int]]:
    """Undirected edge list (each pair once, i < j) of the landmark graph."""
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r}; choose one of {', '.join(GRAPHS)}")
    if graph == "full":
        return [(i, j) for i in range(N_NODES) for j in range(i + 1, N_NODES)]
    edges = set()
    for f in range(N_FRAMES):
        edges |= {(node(f, p), node(f, p + 1)) for p in range(N_POINTS - 1)}  # open contour
        edges |= {(node(f, p), node(f, N_POINTS - 1 - p)) for p in range(N_POINTS // 2)}  # chords
    edges |= {(node(0, p), node(1, p)) for p in range(N_POINTS)}  # time
    return sorted((min(a, b), max(a, b)) for a, b in edges)


def edge_index(graph: str = "sparse") -> torch.Tensor:
    e = torch.tensor(landmark_edges(graph), dtype=torch.long).t()
    return torch.cat([e, e.flip(0)], dim=1)  # both directions


@register_head("mlp")
class MLPHead(nn.Module):
    def __init__(self, in_dim: int, channels: list[int] | tuple[int, ...] = (256, 256, 256)):
        super().__init__()
        channels = list(channels)
        layers: list[nn.Module] = [nn.Linear(in_dim, channels[-1])]
        for c_in, c_out in zip(channels[::-1], channels[-2::-1]):
            layers += [nn.Linear(c_in, c_out), nn.ELU()]
        layers.append(nn.Linear(channels[0], N_NODES * 2))
        self.net = nn.Sequential(*layers)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(emb).view(-1, N_FRAMES, N_POINTS, 2)


@register_head("gcn")
class GCNHead(nn.Module):
    def __init__(self, in_dim: int, channels: list[int] | tuple[int, ...] = (16, 32, 32), graph: str = "sparse"):
        super().__init__()
        with warnings.catch_warnings():  # torch-geometric's import-time torch.jit.script deprecation noise
            warnings.simplefilter("ignore", FutureWarning)
            from torch_geometric.nn import GCNConv

        channels = list(channels)
        self.graph = graph
        self.register_buffer("edge_index", edge_index(graph), persistent=False)
        self.lift = nn.Linear(in_dim, N_NODES * channels[-1])
        dims = [channels[-1]] + channels[::-1] + [2]
        self.convs = nn.ModuleList(GCNConv(a, b, cached=False) for a, b in zip(dims[:-1], dims[1:]))
        self.act = nn.ELU()

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = self.lift(emb).view(emb.shape[0], N_NODES, -1)  # node dim -2: one static graph for the batch
        for i, conv in enumerate(self.convs):
            x = conv(x, self.edge_index)
            if i < len(self.convs) - 1:
                x = self.act(x)
        return x.view(-1, N_FRAMES, N_POINTS, 2)


class LandmarkModel(nn.Module):
    """Encoder + head: uint8 clip (B, 16, 112, 112) -> landmarks (B, 2, 40, 2) in [0, 1]."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(clip))
