"""Load encoder weights from a local path or object-store URI, or torchvision's pretrained weights.

EchoPrime and PanEcho weights are never downloaded by this project (their licences forbid
redistribution); the user points ``--weights`` at their own copy. Loading uses
``torch.load(weights_only=True)`` (no pickled code runs), checks a SHA-256 when given, and maps
the published key names explicitly (each encoder's ``load_published``).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import pickle

import torch

TORCHVISION = "torchvision"


def read_bytes(uri: str, s3_endpoint: str | None = None) -> bytes:
    from trainables.data import storage

    try:
        fs, path = storage.open_fs(uri, s3_endpoint)
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file {uri} not found") from None
    except Exception as exc:
        raise storage.storage_error(uri, s3_endpoint, exc, "read weights from") from exc


def load_weights(encoder, weights: str, sha256: str | None = None, s3_endpoint: str | None = None) -> None:
    if weights == TORCHVISION:
        return load_torchvision(encoder)
    data = read_bytes(weights, s3_endpoint)
    if sha256:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256.lower():
            raise ValueError(f"weights {weights}: sha256 {actual} does not match the expected {sha256}")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        from trainables.loop import unpickling_problem

        code, what = unpickling_problem(exc)
        if code:
            raise ValueError(f"weights {weights}: refused to load: the file holds Python objects other than "
                             f"tensors and plain data, which could run code ({what})") from None
        raise ValueError(f"weights {weights}: not a loadable PyTorch state dict ({what})") from None
    except Exception as exc:
        raise ValueError(f"weights {weights}: not a loadable PyTorch state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    encoder.load_published(state)


def load_torchvision(encoder) -> None:
    spec = getattr(encoder, "torchvision_weights", None)
    if spec is None:
        raise ValueError(f"encoder {encoder.registry_name!r} has no torchvision pretrained weights; "
                         f"pass --weights PATH_OR_URI to your own checkpoint")
    module, enum_name = spec
    weights = getattr(importlib.import_module(module), enum_name).DEFAULT
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:
        raise RuntimeError(
            f"cannot download torchvision weights {enum_name}.{weights.name} ({type(exc).__name__}: {exc}). "
            f"Offline? Download {weights.url} on a machine with network access and pass --weights /path/to/"
            f"{weights.url.rsplit('/', 1)[-1]} (a local path or s3:// URI).") from None
    encoder.load_published(state)
