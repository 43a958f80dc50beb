"""`FeatureSpec`: one object that says what every stored tensor is (timm's `feature_info` idea).

Built from a UNet config dict (no diffusers import needed), an image size and a token length;
the extractor captures what it lists, the cache allocates arrays from it and stores it as JSON,
and heads are built from it. Nothing downstream hard-codes a channel count.

Naming is by **stride** = image size / feature size, like timm's `reduction`:
  - `s8 s16 s32 s64`: VPD's decoder features. For each UNet decoder level, the output of its second
    layer before upsampling (LDM `output_blocks` 1, 4, 7), and the final decoder output (11).
    In diffusers terms: `up_blocks[i].attentions[1]` for cross-attention levels,
    `up_blocks[i].resnets[1]` for plain levels, and the whole `up_blocks[-1]` output.
  - `attn_s16 attn_s32` (8 and 64 optional): cross-attention (`attn2`) softmax probabilities of the
    down and up blocks at that stride, averaged over heads and over the layers; channels = tokens L.

Joint-attention transformers (SD3's MMDiT, FLUX; `from_transformer`) give every feature at one
stride (16 = patch 2 x VAE 8), so their names carry the **block** and the stride (docs/DESIGN.md §5):
`j12_s16` (SD3 joint block 12), `d07_s16` (FLUX double-stream block 7), `x30_s16` (FLUX single-stream
block 30), and `attn_j12_s16`, ... for that block's text-token attention map (channels = the text
sequence length). UNet names never carry a letter, so the two schemes cannot collide.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

DEFAULT_STRIDES = (8, 16, 32, 64)
DEFAULT_ATTN_STRIDES = (16, 32)


@dataclass(frozen=True)
class TensorInfo:
    """One stored per-sample tensor: `(channels, size, size)` at `stride`."""

    name: str  # "s16", "attn_s32"
    kind: str  # "feature" | "attention"
    channels: int  # feature channels, or token length L for attention maps
    stride: int  # image size / spatial size
    size: int  # spatial side at the spec's image size
    modules: tuple[str, ...]  # diffusers module path(s) captured (attention: every attn2 averaged)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def nbytes(self, itemsize: int = 2) -> int:
        return self.channels * self.size * self.size * itemsize


@dataclass(frozen=True)
class FeatureSpec:
    image_size: int
    token_length: int
    text_dim: int  # text encoder hidden size (= UNet cross_attention_dim)
    latent_channels: int
    latent_stride: int  # VAE downsampling factor (8 for Stable Diffusion)
    tensors: tuple[TensorInfo, ...] = field(default_factory=tuple)

    # ---- lookup -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def features(self) -> list[TensorInfo]:
        """Feature tensors, coarsest first (s64, s32, ...), the order a top-down decoder walks them."""
        return sorted((t for t in self.tensors if t.kind == "feature"), key=lambda t: -t.stride)

    @property
    def attention(self) -> list[TensorInfo]:
        return sorted((t for t in self.tensors if t.kind == "attention"), key=lambda t: -t.stride)

    def __getitem__(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"no tensor {name!r} in spec (have {', '.join(self.names)})")

    def __contains__(self, name: str) -> bool:
        return any(t.name == name for t in self.tensors)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.latent_stride

    def bytes_per_sample(self, itemsize: int = 2) -> int:
        """Bytes of features + attention stored per sample per noise level (f16 by default)."""
        return sum(t.nbytes(itemsize) for t in self.tensors)

    def select(self, names) -> "FeatureSpec":
        """A spec restricted to `names` (e.g. the tensors a head reads)."""
        names = set(names)
        missing = names - set(self.names)
        if missing:
            raise KeyError(f"not in spec: {', '.join(sorted(missing))} (have {', '.join(self.names)})")
        return FeatureSpec(
            self.image_size, self.token_length, self.text_dim, self.latent_channels, self.latent_stride,
            tuple(t for t in self.tensors if t.name in names),
        )

    # ---- (de)serialisation: stored as the cache's `spec` attribute ----------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["tensors"] = [dict(asdict(t), modules=list(t.modules)) for t in self.tensors]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        tensors = tuple(TensorInfo(**dict(t, modules=tuple(t["modules"]))) for t in d["tensors"])
        return cls(
            image_size=int(d["image_size"]), token_length=int(d["token_length"]), text_dim=int(d["text_dim"]),
            latent_channels=int(d["latent_channels"]), latent_stride=int(d["latent_stride"]), tensors=tensors,
        )

    # ---- construction from a backbone config ----------------------------------------------------
    @classmethod
    def from_unet_config(
        cls,
        unet_config: dict,
        image_size: int = 512,
        token_length: int = 40,
        latent_stride: int = 8,
        strides=DEFAULT_STRIDES,
        attn_strides=DEFAULT_ATTN_STRIDES,
    ) -> "FeatureSpec":
        """The spec for a diffusers `UNet2DConditionModel` config (a plain dict)."""
        unet = UNetLevels.from_config(unet_config, latent_stride)
        if image_size % latent_stride:
            raise ValueError(f"image size {image_size} is not a multiple of the VAE stride {latent_stride}")
        features = [unet.feature(stride, image_size) for stride in sorted(strides)]
        attention = [unet.attention(stride, image_size, token_length) for stride in sorted(attn_strides)]
        return cls(
            image_size=image_size,
            token_length=token_length,
            text_dim=int(unet_config["cross_attention_dim"]),
            latent_channels=int(unet_config.get("in_channels", 4)),
            latent_stride=latent_stride,
            tensors=tuple(features + attention),
        )

    @classmethod
    def from_transformer(
        cls,
        transformer_config: dict,
        image_size: int,
        text_length: int,
        blocks=None,
        attn_blocks=None,
        latent_stride: int = 8,
    ) -> "FeatureSpec":
        """The spec for an `SD3Transformer2DModel` or `FluxTransformer2DModel` config (a plain dict).

        `blocks` / `attn_blocks`: block ids (`"j12"`, `"d07"`, `"x30"`) whose image-token hidden states /
        text-token attention maps are stored; None = `TransformerBlocks.default()`. `text_length`: the
        length of the text sequence the joint attention sees (the maps' channels; SD3: CLIP + T5 tokens).
        """
        layout = TransformerBlocks.from_config(transformer_config, latent_stride)
        if image_size % layout.stride:
            raise ValueError(f"image size {image_size} is not a multiple of the transformer's stride {layout.stride}")
        blocks = layout.default() if blocks is None else tuple(blocks)
        attn_blocks = layout.default() if attn_blocks is None else tuple(attn_blocks)
        size = image_size // layout.stride
        features = [TensorInfo(f"{b}_s{layout.stride}", "feature", layout.hidden, layout.stride, size,
                               (layout.module(b),)) for b in layout.check(blocks)]
        attention = [TensorInfo(f"attn_{b}_s{layout.stride}", "attention", text_length, layout.stride, size,
                                (layout.module(b) + ".attn",)) for b in layout.check(attn_blocks)]
        return cls(
            image_size=image_size,
            token_length=text_length,
            text_dim=int(transformer_config["joint_attention_dim"]),
            latent_channels=layout.latent_channels,
            latent_stride=latent_stride,
            tensors=tuple(features + attention),
        )


@dataclass(frozen=True)
class TransformerBlocks:
    """What a joint-attention transformer config says about its blocks, in forward order.

    SD3: `num_layers` joint blocks `j00..` (`transformer_blocks.i`). FLUX (its config has
    `num_single_layers`): double-stream blocks `d00..` (`transformer_blocks.i`), then single-stream
    blocks `x00..` (`single_transformer_blocks.i`). FLUX packs 2x2 latent patches into 64 input
    channels (patch_size 1 on the packed grid); SD3 patches with `patch_size` 2. Either way a token
    is 2x2 latent pixels: stride 16 with the x8 VAE.
    """

    ids: tuple[str, ...]  # every block, forward order
    hidden: int  # the blocks' width: heads x head dim
    latent_channels: int
    stride: int

    PATHS = {"j": "transformer_blocks", "d": "transformer_blocks", "x": "single_transformer_blocks"}

    @classmethod
    def from_config(cls, config: dict, latent_stride: int = 8) -> "TransformerBlocks":
        hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        if "num_single_layers" in config:  # FLUX: packed 2x2 patches
            ids = tuple(f"d{i:02d}" for i in range(int(config["num_layers"]))) + \
                tuple(f"x{i:02d}" for i in range(int(config["num_single_layers"])))
            return cls(ids, hidden, int(config["in_channels"]) // 4, latent_stride * 2)
        ids = tuple(f"j{i:02d}" for i in range(int(config["num_layers"])))
        return cls(ids, hidden, int(config["in_channels"]), latent_stride * int(config.get("patch_size", 2)))

    def default(self) -> tuple[str, ...]:
        """Blocks at 1/4, 1/2 and 3/4 of the depth (FLUX: double and single blocks counted as one stack).

        Why: features of diffusion transformers are most semantic in the middle of the stack (DIFT's
        finding for UNets, where the middle decoder level wins, holds for DiTs: the first blocks are
        still close to the patch embedding and the last ones specialise to the velocity output), and
        three evenly spaced blocks span it at 3 x hidden channels per sample. What limits more: disk,
        hidden x (S/16)^2 x 2 bytes per block (FLUX 3072 channels: 25 MB per block at 1024 px).
        """
        n = len(self.ids)
        return tuple(dict.fromkeys(self.ids[min(n - 1, (n * k) // 4)] for k in (1, 2, 3)))

    def check(self, blocks) -> tuple[str, ...]:
        unknown = [b for b in blocks if b not in self.ids]
        if unknown:
            raise ValueError(f"no block {', '.join(map(str, unknown))} in this transformer "
                             f"(blocks: {self.ids[0]}..{self.ids[-1]})")
        return tuple(blocks)

    def module(self, block: str) -> str:
        return f"{self.PATHS[block[0]]}.{int(block[1:])}"


@dataclass(frozen=True)
class UNetLevels:
    """What a UNet config says about its levels: lists per level, in down-block order (level 0 finest).

    Up block i mirrors down block n-1-i with one layer more (diffusers builds `layers_per_block + 1`:
    one per skip connection the mirrored down block hands over, its downsampler's included).
    """

    channels: tuple[int, ...]  # block_out_channels
    down_types: tuple[str, ...]
    up_types: tuple[str, ...]  # in up-block order (up block 0 is the coarsest)
    layers: tuple[int, ...]  # layers_per_block
    transformer_layers: tuple[int, ...]  # transformer_layers_per_block
    latent_stride: int

    @classmethod
    def from_config(cls, unet_config: dict, latent_stride: int) -> "UNetLevels":
        channels = tuple(unet_config["block_out_channels"])

        def per_level(value) -> tuple[int, ...]:  # diffusers takes one number for every level, or a list
            return tuple(value) if isinstance(value, (list, tuple)) else (value,) * len(channels)

        return cls(channels, tuple(unet_config.get("down_block_types") or ()),
                   tuple(unet_config.get("up_block_types") or ()),
                   per_level(unet_config.get("layers_per_block", 2)),
                   per_level(unet_config.get("transformer_layers_per_block", 1)), latent_stride)

    def down_stride(self, i: int) -> int:  # down block i runs at latent resolution / 2**i
        return self.latent_stride * 2**i

    def up_stride(self, i: int) -> int:  # up block i mirrors down block n-1-i
        return self.latent_stride * 2 ** (len(self.channels) - 1 - i)

    def feature(self, stride: int, image_size: int) -> TensorInfo:
        """`s{stride}`: the output of the second layer of the up block at `stride` (the last: the whole block)."""
        n = len(self.channels)
        ups = [i for i in range(n) if self.up_stride(i) == stride]
        if not ups or image_size % stride:
            raise ValueError(f"feature stride {stride} does not exist for this UNet at {image_size}px "
                             f"(available: {sorted(self.up_stride(i) for i in range(n))})")
        i = ups[0]
        if i == n - 1:
            module = f"up_blocks.{i}"
        elif "CrossAttn" in self.up_types[i]:
            module = f"up_blocks.{i}.attentions.1"
        else:
            module = f"up_blocks.{i}.resnets.1"
        return TensorInfo(f"s{stride}", "feature", self.channels[::-1][i], stride, image_size // stride, (module,))

    def attention(self, stride: int, image_size: int, token_length: int) -> TensorInfo:
        """`attn_s{stride}`: every cross-attention layer (`attn2`) of the down and up blocks at `stride`."""
        modules = []
        for i, kind in enumerate(self.down_types):
            if "CrossAttn" in kind and self.down_stride(i) == stride:
                modules += self._attn2(f"down_blocks.{i}", self.layers[i], self.transformer_layers[i])
        up_layers, up_transformer_layers = self.layers[::-1], self.transformer_layers[::-1]
        for i, kind in enumerate(self.up_types):
            if "CrossAttn" in kind and self.up_stride(i) == stride:
                modules += self._attn2(f"up_blocks.{i}", up_layers[i] + 1, up_transformer_layers[i])
        if not modules or image_size % stride:
            raise ValueError(f"no cross-attention layers at stride {stride} in this UNet")
        return TensorInfo(f"attn_s{stride}", "attention", token_length, stride, image_size // stride, tuple(modules))

    @staticmethod
    def _attn2(block: str, layers: int, transformer_layers: int) -> list[str]:
        return [f"{block}.attentions.{j}.transformer_blocks.{k}.attn2"
                for j in range(layers) for k in range(transformer_layers)]
