"""The published forward contract (DOMAIN.md §5, §6, §6.1).

``build_encoder(name, weights=PATH)`` on a uint8 (B, 16, 112, 112) clip must return the embedding
that the published pipeline returns for the same frames: cosine >= 0.9999 and max |diff| <= 1 % of
max |embedding|. The reference below is written from DOMAIN.md alone, not from the encoders: per
frame OpenCV on uint8 frames (EchoPrime: 10 % crop per side, cubic to 224; PanEcho: area to 256,
centre crop 224), torchvision's mvit_v2_s with its Dropout + Linear(768->512) head, and a
FrameTransformer-like module that reshapes (B, 3, T, H, W) to (B*T, 3, H, W) with no permute.
Checkpoints hold random (but non-trivial) weights in the published file layouts.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from trainables.models.encoders import ENCODERS, build_encoder
from trainables.models.freezing import freeze, group_parameters
from trainables.models.preprocess import PREPROCESS_VERSION, echoprime_preprocess, panecho_preprocess

COSINE_MIN, DIFF_RATIO_MAX = 0.9999, 0.01
T = 16
EP_MEAN = torch.tensor([29.110628, 28.076836, 29.096405])  # DOMAIN.md §5, 0-255 scale
EP_STD = torch.tensor([47.989223, 46.456997, 47.20083])
IN_MEAN = torch.tensor([0.485, 0.456, 0.406])  # DOMAIN.md §6, 0-1 scale
IN_STD = torch.tensor([0.229, 0.224, 0.225])


# --- clips ------------------------------------------------------------------------------------

def random_clips(b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, T, 112, 112), dtype=torch.uint8, generator=g)


def echo_clip() -> torch.Tensor:
    """A grey echo-like clip (sector, speckle, a beating LV) from the synthetic data generator."""
    from trainables.data.synthetic import _video

    frames = _video(np.random.default_rng(5), max_frames=T)["frames"][:T]
    return torch.from_numpy(np.stack(frames))[None]


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    return torch.cat([random_clips(), echo_clip()])  # B = 3: two random, one echo-like


# --- reference preprocessing: per frame, uint8, OpenCV, as published ----------------------------

def bgr(frame: np.ndarray) -> np.ndarray:
    return np.repeat(frame[:, :, None], 3, axis=2)  # the AVIs hold grey in all three channels


def echoprime_frame(frame: np.ndarray) -> np.ndarray:
    """crop_and_scale(zoom=0.1) of a square frame: aspect crop is a no-op, cut 11 px per side, cubic."""
    img = bgr(frame)
    pad = round(int(img.shape[1] * 0.1))
    img = img[pad:-pad, pad:-pad]
    return cv2.resize(img, (224, 224), interpolation=cv2.INTER_CUBIC)  # uint8 (224, 224, 3)


def panecho_frame(frame: np.ndarray) -> np.ndarray:
    """Area resize to 256, then CenterCrop(224) (offset 16)."""
    img = cv2.resize(bgr(frame), (256, 256), interpolation=cv2.INTER_AREA)
    return img[16:240, 16:240]  # uint8 (224, 224, 3)


def reference_input(name: str, clip: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, 112, 112) -> the published model input (B, 3, T, 224, 224)."""
    out = []
    for video in clip.numpy():
        frames = {"echoprime": echoprime_frame, "panecho": panecho_frame}[name]
        x = torch.as_tensor(np.stack([frames(f) for f in video]), dtype=torch.float32)  # (T, H, W, 3)
        if name == "echoprime":
            x = (x - EP_MEAN) / EP_STD
        else:
            x = (x / 255 - IN_MEAN) / IN_STD
        out.append(x.permute(3, 0, 1, 2))  # (3, T, H, W): both datasets return channel-major clips
    return torch.stack(out)


# --- reference models --------------------------------------------------------------------------

def sinusoid(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    pe = torch.zeros(length, dim)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


class RefFrameTransformer(nn.Module):
    """PanEcho's backbone per DOMAIN.md §6; attribute names give the published key names."""

    def __init__(self, channel_major: bool = True):
        super().__init__()
        from torchvision.models import convnext_tiny

        self.encoder = nn.Module()
        self.encoder.model = convnext_tiny()
        self.encoder.model.classifier[-1] = nn.Identity()
        layer = nn.TransformerEncoderLayer(768, 8, dim_feedforward=768, dropout=0.0, activation="relu",
                                           batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.time_encoder = nn.Module()
        self.time_encoder.pe = nn.Parameter(sinusoid(T, 768)[None], requires_grad=False)
        self.channel_major = channel_major

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if not self.channel_major:  # true RGB frames: the old, wrong layout (negative control)
            x = x.transpose(1, 2)
        f = self.encoder.model(x.reshape(b * t, c, h, w)).reshape(b, t, 768)
        return self.transformer(f + self.time_encoder.pe[0, :t]).mean(1)


def ref_echoprime() -> nn.Module:
    from torchvision.models.video import mvit_v2_s

    m = mvit_v2_s()
    m.head[-1] = nn.Linear(768, 512)  # head = Sequential(Dropout(0.5), Linear)
    return m


@torch.no_grad()
def random_model(build, seed: int) -> nn.Module:
    """``build()`` with non-trivial random weights, the same whatever ran before (eval mode).

    Non-trivial random weights: torchvision's ConvNeXt starts with layer scales of 1e-6 (every
    block an identity), norms start at 1 and 0, and its 0.02-std Linears make attention nearly
    uniform: any of these would hide a wrong layout. PyTorch's default Linear/Conv2d init, random
    norms and biases, and layer scales in 0.1..1 do not."""
    with torch.random.fork_rng():  # leaves the global RNG of other tests alone
        torch.manual_seed(seed)
        model = build()
        model.apply(lambda m: m.reset_parameters() if isinstance(m, (nn.Linear, nn.Conv2d)) else None)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)) and m.bias is not None:
            m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
    for name, p in model.named_parameters():
        if name.endswith("layer_scale"):
            p.copy_(0.1 + 0.9 * torch.rand(p.shape, generator=g))
    return model.eval()


# --- comparison ---------------------------------------------------------------------------------

def agreement(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Worst clip's cosine and max |diff| / max |ref embedding|."""
    cos = torch.nn.functional.cosine_similarity(ours.double(), ref.double(), dim=1).min().item()
    ratio = ((ours - ref).abs().amax(1) / ref.abs().amax(1)).max().item()
    return cos, ratio


def assert_published(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    cos, ratio = agreement(ours, ref)
    print(f"{what}: cosine {cos:.7f}, max|diff|/max|emb| {ratio:.2e}")
    assert cos >= COSINE_MIN and ratio <= DIFF_RATIO_MAX, (what, cos, ratio)


# --- fixtures: checkpoints in the published layouts, reference embeddings -------------------------

@pytest.fixture(scope="module")
def echoprime(tmp_path_factory, clips):
    """(reference model, our encoder loaded from a plain mvit_v2_s state dict, reference embeddings)."""
    ref = random_model(ref_echoprime, seed=11)
    path = tmp_path_factory.mktemp("ep") / "echo_prime_encoder.pt"
    torch.save(ref.state_dict(), path)  # published: plain mvit_v2_s keys, head.1.* = the 512 head
    enc = build_encoder("echoprime", weights=str(path)).eval()
    with torch.no_grad():
        expected = ref(reference_input("echoprime", clips))
    return ref, enc, expected


@pytest.fixture(scope="module")
def panecho(tmp_path_factory, clips):
    """(reference model, our encoder loaded from {'weights': multi-task state}, reference input,
    reference embeddings)."""
    ref = random_model(RefFrameTransformer, seed=12)
    weights = {f"encoder.{k}": v for k, v in ref.state_dict().items()}  # incl. encoder.time_encoder.pe
    weights["EF_head.1.weight"], weights["EF_head.1.bias"] = torch.randn(1, 768), torch.zeros(1)  # task head
    path = tmp_path_factory.mktemp("pe") / "panecho.pt"
    torch.save({"weights": weights}, path)
    enc = build_encoder("panecho", weights=str(path)).eval()
    x = reference_input("panecho", clips)
    with torch.no_grad():
        expected = ref(x)
    return ref, enc, x, expected


# --- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, frame, preprocess", [("echoprime", echoprime_frame, echoprime_preprocess),
                                                     ("panecho", panecho_frame, panecho_preprocess)])
def test_preprocessing_matches_opencv_within_one_grey_level(name, frame, preprocess, clips):
    prep = preprocess()
    ours = prep.resample(clips)  # (B, T, 224, 224), before normalisation
    ref = torch.from_numpy(np.stack([[frame(f) for f in video] for video in clips.numpy()]))
    assert ref.shape == (3, T, 224, 224, 3) and (ref[..., 0] == ref[..., 2]).all()
    diff = (ours - ref[..., 0].float()).abs()
    share = (diff > 0).float().mean().item()
    print(f"{name}: max {diff.max().item():.0f} grey level, {share:.3%} of pixels differ")
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.1
    # and the normalised model input, 1 grey level at most
    std = EP_STD if name == "echoprime" else IN_STD * 255
    x = prep(clips)
    assert x.shape == (3, 3, T, 224, 224) and x.dtype == torch.float32
    assert (x - reference_input(name, clips)).abs().max() <= 1 / std.min() + 1e-4


def test_echoprime_embedding_is_the_published_one(echoprime, clips):
    _, enc, expected = echoprime
    with torch.no_grad():
        assert_published(enc(clips), expected, "echoprime")


def test_panecho_embedding_is_the_published_one(panecho, clips):
    _, enc, _, expected = panecho
    with torch.no_grad():
        assert_published(enc(clips), expected, "panecho")


def test_panecho_true_rgb_frames_are_not_the_published_model(panecho):
    """Negative control: the per-frame RGB layout the encoder used to feed fails the criterion
    (on the echo-like clip alone, to keep the test short)."""
    ref, _, x, expected = panecho
    rgb = RefFrameTransformer(channel_major=False).eval()
    rgb.load_state_dict(ref.state_dict())
    with torch.no_grad():
        cos, ratio = agreement(rgb(x[-1:]), expected[-1:])
    print(f"panecho true-RGB layout (negative control): cosine {cos:.4f}, max|diff|/max|emb| {ratio:.2e}")
    assert cos < COSINE_MIN and ratio > DIFF_RATIO_MAX


def test_echoprime_without_the_zoom_crop_is_not_the_published_model(echoprime, clips):
    """Negative control: the uncropped input (the old preprocessing) fails the criterion."""
    ref, _, expected = echoprime
    frames = clips[:1].float().flatten(0, 1)[:, None]
    x = torch.nn.functional.interpolate(frames, size=(224, 224), mode="bicubic").clamp(0, 255)
    x = (x.reshape(1, 1, T, 224, 224) - EP_MEAN.view(1, 3, 1, 1, 1)) / EP_STD.view(1, 3, 1, 1, 1)
    with torch.no_grad():
        cos, ratio = agreement(ref(x), expected[:1])
    print(f"echoprime without the crop (negative control): cosine {cos:.4f}, max|diff|/max|emb| {ratio:.2e}")
    assert cos < COSINE_MIN and ratio > DIFF_RATIO_MAX


@pytest.mark.parametrize("k", [0, 1])
def test_echoprime_embedding_has_no_dropout_for_any_k(echoprime, k):
    """Only which parameters train changes with k: the embedding is the same in train and eval mode."""
    _, enc, _ = echoprime
    final = enc.groups()["final"]
    assert not any(isinstance(m, nn.Dropout) for item in final for m in item.modules())
    tokens = torch.randn(2, 1 + 8 * 7 * 7, 768, generator=torch.Generator().manual_seed(k))
    try:
        freeze(enc, k)
        assert any(p.requires_grad for p in group_parameters(final)) == (k > 0)
        with torch.no_grad():
            train = enc.train().finish((tokens, (8, 7, 7)))
            evaluated = enc.eval().finish((tokens, (8, 7, 7)))
        assert torch.equal(train, evaluated)
    finally:
        freeze(enc, "all")  # as the fixture built it
        enc.eval()


def test_preprocess_versions_are_declared():
    for name, spec in ENCODERS.items():
        assert spec.build.preprocess_version, name  # a feature cache keys on it
    assert ENCODERS["echoprime"].build.preprocess_version == PREPROCESS_VERSION["echoprime"]
    assert ENCODERS["panecho"].build.preprocess_version == PREPROCESS_VERSION["panecho"]
    assert len({spec.build.preprocess_version for spec in ENCODERS.values()}) == len(ENCODERS)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["echoprime", "panecho"])
def test_published_embedding_on_gpu(name, request, clips):
    """The same contract on CUDA (float32), against the CPU reference; preprocessing under bf16
    autocast still gives the published uint8 frames."""
    fixture = request.getfixturevalue(name)
    enc, expected = fixture[1], fixture[-1]
    enc.cuda()
    try:
        with torch.no_grad():
            assert_published(enc(clips.cuda()).cpu(), expected, f"{name} on cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                frames = enc.published_input.resample(clips.cuda()).cpu()
        assert frames.dtype == torch.float32
        assert (frames - enc.published_input.cpu().resample(clips)).abs().max() <= 1
    finally:
        enc.cpu()
