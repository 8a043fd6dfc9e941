"""The simulated machines' speed, kept apart from the cost model the conductor plans with.

A simulator whose hardware runs at the planner's own cost model tests a perfect predictor (issue #18). Here the
hardware comes from the calibration's recorded measurements (``*.samples.json`` beside a calibrated cost model:
every point's measured seconds beside the fitted ones):
- its curve is a refit of those samples after resampling each measurement by a measured/fitted ratio drawn from
  the same file (a bootstrap of the residuals): a machine as plausible as the calibrated one, but not the fit;
- each operation then takes that curve's time times another ratio drawn from the file: the spread the
  calibration saw between repeats of one size on a shared machine.
Transfers have no samples; they run at the base model's rates (said in every result's config).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from crescent.services.conductor.cluster import Tier
from crescent.services.conductor.cost_model import CostModel, fit_decode, fit_prefill


@dataclass
class Samples:
    """A calibration's points: (new, cached, seconds) for prefill, (batch, context, seconds) for decode, and the
    measured/fitted ratio of each."""

    prefill: list[tuple[int, int, float]]
    decode: list[tuple[int, int, float]]
    prefill_ratios: list[float]
    decode_ratios: list[float]

    @classmethod
    def load(cls, path: str | Path) -> Samples:
        data = json.loads(Path(path).read_text())
        try:
            pre = [(int(p["new"]), int(p["cached"]), float(p["measured_s"]), float(p["fitted_s"]))
                   for p in data["prefill"]]
            dec = [(int(p["batch"]), int(p["context_tokens"]), float(p["measured_s"]), float(p["fitted_s"]))
                   for p in data["decode"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a calibration samples file ({e})") from e
        if len(pre) < 3 or len(dec) < 3:
            raise ValueError(f"{path}: need at least 3 prefill and 3 decode samples")
        return cls([p[:3] for p in pre], [d[:3] for d in dec],
                   [p[2] / p[3] for p in pre if p[3] > 0], [d[2] / d[3] for d in dec if d[3] > 0])


@dataclass
class MeasuredHardware:
    """Duck-types the CostModel methods the simulator's machines call; every call draws its own noise."""

    curve: CostModel
    samples: Samples
    seed: int = 0
    noise: bool = True
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @classmethod
    def from_samples(cls, base: CostModel, samples: Samples, seed: int = 0, noise: bool = True) -> MeasuredHardware:
        """A bootstrapped refit of ``samples`` (see the module docstring); ``base`` gives transfers and units."""
        rng = random.Random(seed)
        pre = [(n, c, s * rng.choice(samples.prefill_ratios)) for n, c, s in samples.prefill]
        dec = [(b, c, s * rng.choice(samples.decode_ratios)) for b, c, s in samples.decode]
        curve = replace(base, prefill_s=fit_prefill(pre), decode_step_s=fit_decode(dec),
                        source=f"bootstrapped refit (seed {seed}) of the samples of: {base.source}")
        return cls(curve, samples, seed=seed + 1, noise=noise)

    def _spread(self, ratios: list[float]) -> float:
        return self.rng.choice(ratios) if self.noise else 1.0

    def prefill_time(self, new_tokens: int, cached_tokens: int = 0) -> float:
        return self.curve.prefill_time(new_tokens, cached_tokens) * self._spread(self.samples.prefill_ratios)

    def decode_step_time(self, batch: int, context_tokens: int) -> float:
        return self.curve.decode_step_time(batch, context_tokens) * self._spread(self.samples.decode_ratios)

    def transfer_time(self, tokens: int, tier: Tier) -> float:
        return self.curve.transfer_time(tokens, tier)

    def tiers_transfer_time(self, tiers: list[Tier], block_size: int) -> float:
        return self.curve.tiers_transfer_time(tiers, block_size)

    def describe(self) -> dict:
        """What a result's config records about the hardware."""
        return {"curve_prefill_s": self.curve.prefill_s, "curve_decode_step_s": self.curve.decode_step_s,
                "per_op_noise": self.noise, "seed": self.seed,
                "prefill_ratio_range": [round(min(self.samples.prefill_ratios), 3),
                                        round(max(self.samples.prefill_ratios), 3)],
                "decode_ratio_range": [round(min(self.samples.decode_ratios), 3),
                                       round(max(self.samples.decode_ratios), 3)],
                "curve_source": self.curve.source}
