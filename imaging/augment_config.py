"""The augmentation's knobs, shared by training (augment.*) and serving (the TTA passes); TensorFlow-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError
from core.sections import section_from_dict

FILL_MODES = ("nearest", "reflect", "wrap", "constant")


# Upper bounds of the augmentation strengths (standard deviations of normal draws, or Beta parameters).
AUGMENT_LIMITS = {"rotation": 180.0, "shear": 60.0, "zoom": 1.0, "shift": 4096.0, "mixup_alpha": 100.0,
                  "cutmix_alpha": 100.0}


@dataclass(frozen=True)
class AugmentConfig:
    """Every augmentation knob; a magnitude of 0 or a probability of 0 switches that transform off.

    Defaults follow the public flower notebooks: rotation 15*N(0,1) degrees, shear 5*N(0,1) degrees,
    zoom 1+N(0,1)/10 per axis, shift 16*N(0,1) px at 192 px (scaled with the output size).
    Colour jitter is off by default, as in those notebooks (colour is a strong cue between flower
    classes); brightness/contrast/saturation are fractions (0.1 = +-10%), hue a fraction of the circle.
    """

    enabled: bool = True  # false: no augmentation at all (only the resize)
    flip_left_right: bool = True  # random horizontal flip
    flip_up_down: bool = False  # random vertical flip
    rotation: float = 15.0  # degrees, times N(0,1)
    shear: float = 5.0  # degrees, times N(0,1)
    zoom: float = 0.1  # per axis: 1 + zoom * N(0,1)
    shift: float = 16.0  # pixels at shift_reference_size, times N(0,1)
    shift_reference_size: int = 192  # image size at which `shift` is given
    fill_mode: str = "nearest"  # outside the image: nearest | reflect | wrap | constant (black)
    brightness: float = 0.0  # max shift as a fraction of 255
    contrast: float = 0.0  # factor in 1 +- contrast
    saturation: float = 0.0  # factor in 1 +- saturation
    hue: float = 0.0  # rotation, fraction of the colour circle
    erase_prob: float = 0.0  # probability of random erasing per image
    erase_area: tuple[float, float] = (0.02, 0.2)  # erased area range, fraction of the image
    cutmix_prob: float = 0.0  # probability of CutMix per image (soft labels)
    cutmix_alpha: float = 1.0  # Beta(alpha, alpha) of the kept area
    mixup_prob: float = 0.0  # probability of MixUp per image (soft labels)
    mixup_alpha: float = 0.2  # Beta(alpha, alpha) of the mixing weight
    jit_compile: bool = True  # compile the pixel pass with XLA (false: same graph, slower)

    def __post_init__(self) -> None:
        for name in ("rotation", "shear", "zoom", "shift", "brightness", "contrast", "saturation", "hue"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        for name, limit in AUGMENT_LIMITS.items():  # beyond these the images are noise (or not finite)
            if getattr(self, name) > limit:
                raise ConfigError(f"augment.{name} must be <= {limit:g}, got {getattr(self, name)}")
        for name in ("erase_prob", "cutmix_prob", "mixup_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"augment.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.cutmix_prob + self.mixup_prob > 1.0:
            raise ConfigError(
                f"augment.cutmix_prob + augment.mixup_prob must be <= 1, got {self.cutmix_prob + self.mixup_prob}"
            )
        lo, hi = self.erase_area
        if not 0.0 < lo <= hi < 1.0:
            raise ConfigError(f"augment.erase_area must be (low, high) with 0 < low <= high < 1, got {self.erase_area}")
        if self.fill_mode not in FILL_MODES:
            raise ConfigError(f"augment.fill_mode must be one of {FILL_MODES}, got {self.fill_mode!r}")
        if self.brightness > 1 or self.contrast > 1 or self.saturation > 1 or self.hue > 0.5:
            raise ConfigError("augment.brightness/contrast/saturation must be <= 1 and augment.hue <= 0.5")
        if self.mixup_alpha <= 0 or self.cutmix_alpha <= 0:
            raise ConfigError("augment.mixup_alpha and augment.cutmix_alpha must be > 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentConfig:
        """Build from a mapping (a TOML table), typed like every section; unknown keys are named."""
        return section_from_dict(cls, values, "augment")

    @classmethod
    def off(cls) -> AugmentConfig:
        """A config with augmentation switched off (only the resize to the model size remains)."""
        return cls(enabled=False)

    @property
    def geometric(self) -> bool:
        """Whether any flip or affine transform is on."""
        return self.flip_left_right or self.flip_up_down or any(
            (self.rotation, self.shear, self.zoom, self.shift)
        )

    @property
    def colour(self) -> bool:
        """Whether any colour jitter is on."""
        return any((self.brightness, self.contrast, self.saturation, self.hue))

    @property
    def mixes_batches(self) -> bool:
        """Whether CutMix or MixUp is on."""
        return self.enabled and (self.cutmix_prob > 0 or self.mixup_prob > 0)
