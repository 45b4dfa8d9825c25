"""DeCon: joint encoder-decoder contrastive pre-training around a per-level method head (Quetin et al.).

The wrapped method's auxiliary layers (a "head": projector, prototypes, predictor, centre, with their teacher
copies) sit on the encoder's last level and, replicated, on each supervised decoder level:

    loss = alpha * L_enc + (1 - alpha) * mean_l L_dec[l]

- **SlotCon / DenseCL** (encoder only, ``ssl.decoder.preset: none``): no decoder level, alpha = 1; the decoder is
  not even run.
- **DeCon-SL** (``ssl.decoder.preset: sl``): one decoder level (by default the decoder output that feeds the
  segmentation head).
- **DeCon-ML** (``ssl.decoder.preset: ml``): several decoder levels (deep supervision) plus channel dropout on the
  encoder features entering the decoder through skip connections; alpha = 0 (decoder losses only) is the paper's
  best with dropout 0.5.

Any registered method whose builder calls :func:`build_decon` takes decoder supervision (``ssl.decoder``).

The teacher is an EMA copy of the student network and heads (cosine momentum 0.99 -> 1, one step per optimiser
step); it runs without dropout and without gradient. Decoder levels are average-pooled to at most
``dec_grid`` x ``dec_grid`` before their heads: a U-Net's levels are 14 x 14 to 224 x 224 at 224 px, and a
4096-wide projector on every pixel would cost many times the encoder head. With the default ``dec_grid`` 7 each
level's head costs about one encoder head, and sees the same 7 x 7 grid as the encoder's (each cell averages the
level's finer features); a larger ``dec_grid`` (``ssl.decoder.grid``; 0: no pooling) gives the decoder heads a
finer grid at a higher cost. The paper's FPN and FCN decoder outputs have 256 channels (at 1/4 and 1/16 of the
input); the U-Net's finest level has 16, and ``ssl.decoder.levels`` can supervise a coarser, wider level instead.

Example:
    >>> method = build_method(load_config("configs/pretrain/decon_ml.yaml"))   # decon_med.ssl.build_method
    >>> out = method(batch)                       # {"loss", "enc", "dec", "dec0", ...}
    >>> out["loss"].backward(); optimizer.step(); method.after_step(step, total_steps)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from decon_med.config import MomentumSchedule, PretrainConfig
from decon_med.distributed import shuffle_batch, unshuffle_batch
from decon_med.errors import ConfigError
from decon_med.models.network import build_network, features, level_channels
from decon_med.ssl.base import SettingError, SSLMethod
from decon_med.ssl.ema import cosine_momentum, frozen_copy, update_momentum

#: Builds the head of one level: ``factory(in_channels, is_decoder) -> nn.Module``. The head is called as
#: ``head(s1, s2, t1, t2, box1, box2, flip1, flip2) -> {"loss", parts...}`` and has ``update_teacher(momentum)``
#: (called once per optimiser step). Each head class sets ``symmetric``: ``False`` means the head only uses the
#: student map of view 1 and the teacher map of view 2 (the others are passed as ``None`` and never computed).
HeadFactory = Callable[[int, bool], nn.Module]


class DeCon(SSLMethod):
    """Encoder head + one head per supervised decoder level, alpha-weighted, with an EMA teacher.

    Args:
        network: the student smp model (exported after pre-training).
        head_factory: builds a level's head from its channel count (see ``HeadFactory``).
        levels: supervised decoder levels (0 = coarsest; negative counts from the finest); empty = encoder only.
        alpha: weight of the encoder loss; 1 runs the encoder only, 0 computes no encoder loss at all.
        skip_dropout: Dropout2d probability on skip connections (student only).
        dec_grid: pool decoder levels to at most this grid (0 = no pooling).
        in_channels: input channels (to probe the level widths).
        teacher_momentum: EMA momentum of the teacher (the start of the cosine schedule, or the constant).
        momentum_schedule: ``cosine`` (teacher_momentum -> 1, SlotCon) or ``constant`` (DenseCL).
        shuffle_teacher_bn: under torchrun, run the teacher on a share of the global batch shuffled across
            processes and restore the order after (MoCo's shuffle BN); nothing changes in one process.
        export_teacher: export and fine-tune the teacher (EMA) network instead of the student.
    """

    def __init__(
        self,
        network: nn.Module,
        head_factory: HeadFactory,
        levels: Sequence[int] = (),
        alpha: float = 1.0,
        skip_dropout: float = 0.0,
        dec_grid: int = 7,
        in_channels: int = 3,
        teacher_momentum: float = 0.99,
        momentum_schedule: MomentumSchedule = "cosine",
        shuffle_teacher_bn: bool = False,
        export_teacher: bool = False,
    ):
        super().__init__()
        if alpha == 0.0 and not levels:
            raise SettingError("alpha", "0 leaves no loss without a decoder level")
        enc_channels, dec_channels = level_channels(network, in_channels)
        self.levels = _resolve_levels(levels, len(dec_channels), type(network).__name__)
        self.alpha = alpha
        self.dec_grid = dec_grid
        self.teacher_momentum = teacher_momentum
        self.momentum_schedule = momentum_schedule
        self.shuffle_teacher_bn = shuffle_teacher_bn
        self.export_prefix = "teacher." if export_teacher else "network."
        self.network = network
        self.teacher = frozen_copy(network)
        self.enc_head = head_factory(enc_channels[-1], False)
        self.dec_heads = nn.ModuleList(head_factory(dec_channels[level], True) for level in self.levels)
        self.skip_dropout = nn.Dropout2d(skip_dropout) if skip_dropout > 0 else None
        self.symmetric = all(h.symmetric for h in (self.enc_head, *self.dec_heads))

    @property
    def uses_decoder(self) -> bool:
        return len(self.dec_heads) > 0 and self.alpha < 1.0

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        views = (batch["view1"], batch["view2"])
        geometry = (batch["box1"], batch["box2"], batch["flip1"], batch["flip2"])
        decoder = self.uses_decoder
        # An asymmetric head needs the student on view 1 and the teacher on view 2 only.
        student = [
            features(self.network, v, self.skip_dropout, decoder=decoder)
            if self.symmetric or i == 0
            else None
            for i, v in enumerate(views)
        ]
        with torch.no_grad():
            teacher = [
                self._teacher_features(v, decoder) if self.symmetric or i == 1 else None
                for i, v in enumerate(views)
            ]

        def maps(part: int, level: int) -> list[torch.Tensor | None]:
            """Student view 1, view 2, teacher view 1, view 2 of one level (``None`` where not computed)."""
            return [None if f is None else f[part][level] for f in (*student, *teacher)]

        out: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=views[0].device)
        self._health = {}
        for head in (self.enc_head, *self.dec_heads):
            head.record_health = self.record_health
        if self.alpha > 0:
            enc = self.enc_head(*maps(0, -1), *geometry)
            loss = loss + self.alpha * enc["loss"]
            out.update(_parts("enc", enc))
            self._collect_health("enc", self.enc_head)
        if decoder:
            level_losses = []
            for level, head in zip(self.levels, self.dec_heads, strict=True):
                dec = head(*(None if m is None else self._pool(m) for m in maps(1, level)), *geometry)
                level_losses.append(dec["loss"])
                out.update(_parts(f"dec{level}", dec))
                self._collect_health(f"dec{level}", head)
            dec_loss = torch.stack(level_losses).mean()
            loss = loss + (1.0 - self.alpha) * dec_loss
            out["dec"] = dec_loss.detach()
        out["loss"] = loss
        return out

    def health(self) -> dict[str, torch.Tensor]:
        """The health signals of every level that computed a loss in the last recorded forward pass, named
        ``<level>_<signal>`` (``enc_z_std``, ``dec3_entropy``, ...; see :mod:`decon_med.ssl.health`)."""
        return dict(getattr(self, "_health", {}))

    def _collect_health(self, prefix: str, head: nn.Module) -> None:
        if self.record_health:
            self._health.update({f"{prefix}_{k}": v for k, v in getattr(head, "last_health", {}).items()})

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> dict[str, float]:
        """EMA update of the teacher network and of every head's teacher layers."""
        if self.momentum_schedule == "constant":
            momentum = self.teacher_momentum
        else:
            momentum = cosine_momentum(step, total_steps, start=self.teacher_momentum)
        update_momentum(self.network, self.teacher, momentum)
        for head in (self.enc_head, *self.dec_heads):
            head.update_teacher(momentum)
        return {"momentum": momentum}

    def check_data(self, images_per_epoch: int) -> list[str]:
        """The warnings of every head that has a ``check_data`` (a level's head may hold a queue), once each."""
        messages: list[str] = []
        for head in (self.enc_head, *self.dec_heads):
            if hasattr(head, "check_data"):
                messages += [m for m in head.check_data(images_per_epoch) if m not in messages]
        return messages

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [
            (n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher.")
        ]

    def _teacher_features(self, x: torch.Tensor, decoder: bool) -> tuple[list, list]:
        """The teacher's levels of ``x``; with ``shuffle_teacher_bn``, computed on a shuffled share of the global
        batch (only the levels the heads read are brought back, the others are ``None``)."""
        if not self.shuffle_teacher_bn:
            return features(self.teacher, x, None, decoder=decoder)
        local, inverse = shuffle_batch(x)
        enc, dec = features(self.teacher, local, None, decoder=decoder)
        used_enc = {len(enc) - 1} if self.alpha > 0 else set()  # the encoder head reads the last level only
        used_dec = set(self.levels) if decoder else set()
        enc = [unshuffle_batch(m, inverse) if i in used_enc else None for i, m in enumerate(enc)]
        dec = [unshuffle_batch(m, inverse) if i in used_dec else None for i, m in enumerate(dec)]
        return enc, dec

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.dec_grid and max(x.shape[-2:]) > self.dec_grid:
            return F.adaptive_avg_pool2d(x, self.dec_grid)
        return x


def _parts(prefix: str, result: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"loss": l, "group": g}`` -> ``{prefix: l, prefix_group: g}`` (detached, for logging)."""
    return {(prefix if key == "loss" else f"{prefix}_{key}"): value.detach() for key, value in result.items()}


def _resolve_levels(levels: Sequence[int], num_levels: int, arch: str) -> list[int]:
    resolved = []
    for level in levels:
        if not -num_levels <= level < num_levels:
            raise SettingError(
                "levels",
                f"level {level} is out of range for {arch} with {num_levels} decoder levels (use "
                f"0..{num_levels - 1} or -{num_levels}..-1)",
            )
        resolved.append(level % num_levels)
    if len(set(resolved)) != len(resolved):
        raise SettingError("levels", f"{list(levels)} names the same level twice")
    return resolved


#: Config key of each :class:`DeCon` argument that :func:`build_decon` fills from the config.
DECODER_KEYS: dict[str, str] = {
    "levels": "ssl.decoder.levels",
    "alpha": "ssl.decoder.alpha",
    "skip_dropout": "ssl.decoder.skip_dropout",
    "dec_grid": "ssl.decoder.grid",
}


def head_width(cfg: PretrainConfig, is_decoder: bool) -> int:
    """Hidden width of a level's head: ``ssl.dim_hidden``, or ``ssl.decoder.dim_hidden`` on a decoder level when
    it is set."""
    width = cfg.ssl.decoder.dim_hidden
    return width if is_decoder and width is not None else cfg.ssl.dim_hidden


def build_decon(
    cfg: PretrainConfig,
    heads: HeadFactory,
    export_teacher: bool | None = None,
    shuffle_teacher_bn: bool = False,
) -> DeCon:
    """A per-level-head method of a config: the network of ``cfg.model``, one head of ``heads`` on the encoder's
    last level and, with decoder supervision (``cfg.ssl.decoder``), on each supervised decoder level.

    ``export_teacher`` is the method's choice for ``ssl.export_branch: auto`` (``None``: the registered method's
    ``export``). An argument that does not fit the network is a :class:`~decon_med.errors.ConfigError` naming its key.

    Example:
        >>> method = build_decon(cfg, slotcon_heads(cfg))      # what the slotcon method's builder does
    """
    from decon_med.ssl import registry

    s = cfg.ssl
    if s.export_branch != "auto":
        export_teacher = s.export_branch == "teacher"
    elif export_teacher is None:
        export_teacher = registry.get(s.method).export == "teacher"
    network = build_network(cfg.model, in_channels=cfg.data.in_channels, classes=1)
    try:
        return DeCon(
            network,
            heads,
            levels=s.decoder.levels,
            alpha=s.decoder.alpha,
            skip_dropout=s.decoder.skip_dropout,
            dec_grid=s.decoder.grid,
            in_channels=cfg.data.in_channels,
            teacher_momentum=s.teacher_momentum,
            momentum_schedule=s.momentum_schedule,
            shuffle_teacher_bn=shuffle_teacher_bn,
            export_teacher=export_teacher,
        )
    except SettingError as exc:
        raise ConfigError(f"config key '{DECODER_KEYS.get(exc.setting, exc.setting)}': {exc}") from exc
