"""The CNN trunk: a torchvision ResNet cut after a chosen stage.

Stage numbering follows the ResNet paper: stage 1 is the stem (conv1, bn1, relu,
maxpool; stride 4), stages 2..5 are ``layer1``..``layer4`` (strides 4, 8, 16, 32).
"""

from __future__ import annotations

import hashlib
import io
import os

import torch
import torchvision
from torch import nn

from soho_core import storage
from soho_core.config import BackboneConfig

WEIGHTS_FORMAT = "soho-backbone/1"
CACHE_FORMAT = "soho-feature-cache/1"

_BUILDERS = {
    18: ("resnet18", "ResNet18_Weights"),
    34: ("resnet34", "ResNet34_Weights"),
    50: ("resnet50", "ResNet50_Weights"),
    101: ("resnet101", "ResNet101_Weights"),
    152: ("resnet152", "ResNet152_Weights"),
}
_STRIDES = {3: 8, 4: 16, 5: 32}


def _cached_imagenet_state(depth: int) -> dict[str, torch.Tensor]:
    """ImageNet weights of a torchvision ResNet, read from the local torch hub cache only.

    Reading the cached file ourselves (instead of ``weights.get_state_dict``) guarantees that a
    missing file is an error here rather than a silent download attempt on a cluster node.
    """
    weights = getattr(torchvision.models, _BUILDERS[depth][1]).IMAGENET1K_V1
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise RuntimeError(
            f"model.backbone.pretrained=true needs the torchvision ImageNet weights of ResNet-{depth} "
            f"in the local torch cache, but {path} does not exist. Put {weights.url} there "
            f"(or point TORCH_HOME at a cache that has it), or set model.backbone.pretrained=false "
            f"to start from random weights."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


class Backbone(nn.Module):
    """ResNet trunk up to ``cfg.out_stage``.

    Input: normalised images (B, 3, H, W). Output: features (B, out_channels, ceil(H/stride),
    ceil(W/stride)). Attributes ``stride`` and ``out_channels`` describe that output.
    """

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        if cfg.depth not in _BUILDERS:
            raise ValueError(f"model.backbone.depth must be one of {sorted(_BUILDERS)}, got {cfg.depth}")
        if cfg.out_stage not in _STRIDES:
            raise ValueError(f"model.backbone.out_stage must be 3, 4 or 5, got {cfg.out_stage}")
        net = getattr(torchvision.models, _BUILDERS[cfg.depth][0])(weights=None)
        if cfg.pretrained:
            net.load_state_dict(_cached_imagenet_state(cfg.depth))

        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        layers = [net.layer1, net.layer2, net.layer3, net.layer4][: cfg.out_stage - 1]
        self.stages = nn.ModuleList(layers)
        self.stride = _STRIDES[cfg.out_stage]
        self.out_channels = 64 * (2 ** (cfg.out_stage - 2)) * (4 if cfg.depth >= 50 else 1)
        self.frozen_stages = cfg.frozen_stages
        self.all_frozen = False  # set by freeze()
        self.channels_last = cfg.channels_last

        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def _frozen_modules(self) -> list[nn.Module]:
        # mmdet's convention, as in the release: 0 freezes the stem, k >= 1 the stem and the first
        # k residual stages, -1 nothing (a CNN trained from scratch must train its stem too).
        if self.all_frozen:
            return [self.stem, *self.stages]
        if self.frozen_stages < 0:
            return []
        return [self.stem, *self.stages[: self.frozen_stages]]

    def freeze(self) -> "Backbone":
        """Keep the whole CNN as it is: no gradients, and every batch norm on its running statistics
        (in training mode too), so an image's features do not depend on the batch it comes in."""
        self.all_frozen = True
        self.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        # Frozen stages keep their ImageNet running statistics: updating BN statistics of layers
        # whose affine parameters cannot adapt would shift every feature they produce.
        for module in self._frozen_modules():
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> features (B, out_channels, H/stride, W/stride)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.stem(images)
        for stage in self.stages:
            x = stage(x)
        return x


def save_backbone_weights(backbone: Backbone, cfg: BackboneConfig, uri: str) -> None:
    """Write ``backbone``'s weights (and its depth and out_stage) where ``model.backbone.weights``
    can load them."""
    buf = io.BytesIO()
    torch.save({"format": WEIGHTS_FORMAT, "depth": cfg.depth, "out_stage": cfg.out_stage,
                "state": {k: v.detach().cpu() for k, v in backbone.state_dict().items()}}, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())


def load_backbone_weights(backbone: Backbone, cfg: BackboneConfig) -> None:
    """Load ``cfg.weights`` (written by :func:`save_backbone_weights`) into ``backbone``; any
    mismatch is an error that names ``model.backbone.weights``."""
    uri = cfg.weights
    if not storage.exists(uri):
        raise FileNotFoundError(f"model.backbone.weights={uri!r} does not exist (write one with "
                                f"`soho probe --save-backbone`, or set it to '' to start from random weights)")
    data = storage.retrying(lambda: storage.read_bytes(uri), f"reading {uri}")
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"model.backbone.weights={uri!r} is not a readable weights file: {exc}") from exc
    if not isinstance(saved, dict) or saved.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"model.backbone.weights={uri!r} is not a {WEIGHTS_FORMAT} file "
                         f"(written by `soho probe --save-backbone`)")
    if (saved["depth"], saved["out_stage"]) != (cfg.depth, cfg.out_stage):
        raise ValueError(f"model.backbone.weights={uri!r} holds a ResNet-{saved['depth']} to stage "
                         f"{saved['out_stage']}, but the model is a ResNet-{cfg.depth} to stage {cfg.out_stage}")
    backbone.load_state_dict(saved["state"])


def cnn_digest(backbone: Backbone, how: str) -> str:
    """A name for what ``backbone`` computes: its architecture and weights, and ``how`` it runs
    (device, precision, memory layout). Two CNNs with the same digest give an image the same
    features, so a :class:`FeatureCache` saved under it may serve either."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(backbone).__name__} stride={backbone.stride} {how}".encode())
    for name, tensor in backbone.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FeatureCache:
    """A frozen CNN's features, kept per image so that an image seen again is not run again.

    Only exact while the CNN and its batch norms cannot change (:meth:`Backbone.freeze`): an
    image's features then depend on its padded pixels and its valid size alone, which make the
    key (a hash). Up to ``max_bytes`` of features are kept; images met after that are computed
    every time. ``hits`` and ``misses`` count images served from the cache and computed.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._store: dict[bytes, torch.Tensor] = {}
        self._loaded = 0  # entries read by load(): save() writes only when there are more

    def load(self, uri: str) -> int:
        """Add the features a :meth:`save` of the same CNN left at ``uri`` (nothing if there is no
        file), within the budget; returns how many. A file that cannot be read is an error that
        names it: it may be deleted, and is then rebuilt."""
        if not storage.exists(uri):
            return 0
        try:
            saved = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
            if saved.get("format") != CACHE_FORMAT:
                raise ValueError(f"not a {CACHE_FORMAT} file")
        except Exception as exc:
            raise ValueError(f"feature cache {uri!r} is unreadable ({exc}); delete it and it is rebuilt") from exc
        added = 0
        for key, feat in saved["features"].items():
            size = feat.numel() * feat.element_size()
            key = bytes.fromhex(key)
            if key in self._store or self.used + size > self.max_bytes:
                continue
            self._store[key] = feat
            self.used += size
            added += 1
        self._loaded = len(self._store)
        return added

    def save(self, uri: str) -> bool:
        """Write every kept feature to ``uri`` (atomically) if this cache holds more than it loaded."""
        if len(self._store) <= self._loaded:
            return False
        buf = io.BytesIO()
        torch.save({"format": CACHE_FORMAT, "features": {k.hex(): v for k, v in self._store.items()}}, buf)
        storage.write_bytes_atomic(uri, buf.getvalue())
        self._loaded = len(self._store)
        return True

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def _key(image: torch.Tensor, size: torch.Tensor) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((tuple(image.shape), str(image.dtype), size.tolist())).encode())
        h.update(image.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()

    def __call__(self, images: torch.Tensor, image_sizes: torch.Tensor, compute) -> torch.Tensor:
        """images (B, 3, H, W) uint8 as the loaders give them, image_sizes (B, 2) their valid sizes;
        ``compute(rows)`` gives the features (b, C, h, w) of the images at those rows. Returns
        (B, C, h, w)."""
        keys = [self._key(im, sz) for im, sz in zip(images, image_sizes)]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if not missing:
            return torch.stack([self._store[k] for k in keys])
        fresh = compute(missing)
        rows = dict(zip(missing, fresh))
        for i in missing:
            feat = rows[i].detach()
            size = feat.numel() * feat.element_size()
            if keys[i] not in self._store and self.used + size <= self.max_bytes:
                self._store[keys[i]] = feat.clone()
                self.used += size
        if len(missing) == len(keys):
            return fresh
        return torch.stack([rows[i] if i in rows else self._store[k] for i, k in enumerate(keys)])
