"""Pre-training health signals and the watchdog that warns when a run stays collapsed or uniform.

A method computes its signals on the engine's log steps only (``SSLMethod.record_health``), without gradient,
and returns them from ``health()`` as named 0-dim tensors ``<level>_<signal>`` (levels ``enc``, ``dec0``, ...):

- ``z_std`` (every method): per-channel standard deviation of the L2-normalised projector output over the
  batch's pixels, averaged over channels and multiplied by ``sqrt(d)``: about 1 when the embeddings spread over
  the sphere, 0 when every pixel maps to the same vector (collapse). MIM has no projector: it reports the
  decoder output (the map its reconstruction head reads).
- ``protos`` (SlotCon family): prototypes in use, the distinct arg-max owners of the teacher's (centred)
  assignment over the batch's pixels; 1 is collapse, a growing count is healthy.
- ``entropy`` (SlotCon family): mean per-pixel entropy of the teacher's centred, sharpened assignment divided by
  its maximum ``ln K``: 1 is uniform (the teacher says nothing, the group loss stays at ``2 ln K``).
- ``center`` (SlotCon family): L2 norm of the teacher centre.
- ``pos_sim`` / ``neg_sim`` (DenseCL family): mean cosine similarity of the dense queries to their positive keys
  and to the queue's negatives; healthy runs see the positives rise well above the negatives.

Example:
    >>> dog = HealthWatchdog(patience=3)
    >>> for step in (10, 20, 30):
    ...     messages = dog.update(step, {"enc_z_std": 0.001})
    >>> messages[0][:60]
    'warning: step 30: enc_z_std has been 0.001 (collapse: below'
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Signal-name suffix of the projector spread and its collapse threshold (scaled so that 1 is healthy).
STD_SIGNAL = "z_std"
COLLAPSE_STD = 0.05
#: Signal-name suffix of the teacher assignment entropy (a fraction of ln K) and its "uniform" threshold.
ENTROPY_SIGNAL = "entropy"
UNIFORM_ENTROPY = 0.98


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Spread of embeddings ``z`` (N, D) or maps (B, D, H, W): per-channel std of the L2-normalised vectors,
    averaged over channels, times ``sqrt(D)`` (about 1 for vectors spread over the sphere, 0 at collapse).

    Example:
        >>> float(embedding_std(torch.ones(8, 4)))
        0.0
    """
    if z.ndim == 4:
        z = z.permute(0, 2, 3, 1).flatten(0, 2)
    z = F.normalize(z.detach().float(), dim=1)
    if len(z) < 2:
        return z.new_zeros(())
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])


@torch.no_grad()
def assignment_health(
    scores: torch.Tensor, center: torch.Tensor, temperature: float
) -> dict[str, torch.Tensor]:
    """Prototypes in use, entropy / ln K and centre norm of a teacher assignment.

    Args:
        scores: (B, K, H, W) teacher cosine scores.
        center: (1, K) teacher centre.
        temperature: teacher temperature.

    Example:
        >>> out = assignment_health(torch.zeros(2, 4, 3, 3), torch.zeros(1, 4), 0.07)
        >>> float(out["entropy"])
        1.0
    """
    k = scores.shape[1]
    logits = (scores.detach().float().permute(0, 2, 3, 1).flatten(0, 2) - center.float()) / temperature
    log_p = F.log_softmax(logits, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
    owners = logits.argmax(dim=1)
    in_use = torch.zeros(k, dtype=torch.bool, device=scores.device).scatter_(0, owners, True).sum()
    return {
        "protos": in_use.float(),
        ENTROPY_SIGNAL: entropy / math.log(k) if k > 1 else entropy * 0.0,
        "center": center.detach().float().norm(),
    }


class HealthWatchdog:
    """Warns once per signal when a run stays collapsed (``*_z_std`` below :data:`COLLAPSE_STD`) or uniform
    (``*_entropy`` above :data:`UNIFORM_ENTROPY`) for ``patience`` consecutive log steps.

    Args:
        patience: consecutive log steps a signal must stay bad before the warning (0 = never warn).

    Example:
        >>> dog = HealthWatchdog(patience=2)
        >>> dog.update(10, {"dec3_entropy": 0.999}), len(dog.update(20, {"dec3_entropy": 0.999}))
        ([], 1)
    """

    def __init__(self, patience: int = 5):
        self.patience = patience
        self.bad_for: dict[str, int] = {}
        self.warned: set[str] = set()

    def update(self, step: int, signals: dict[str, float]) -> list[str]:
        """Count the signals of one log step; returns the warning lines that fire now (each at most once)."""
        messages = []
        for name, value in signals.items():
            problem = _problem(name, float(value))
            self.bad_for[name] = self.bad_for.get(name, 0) + 1 if problem else 0
            if (
                problem
                and self.patience > 0
                and self.bad_for[name] >= self.patience
                and name not in self.warned
            ):
                self.warned.add(name)
                level = name.rsplit("_", 2)[0] if name.endswith(STD_SIGNAL) else name.rsplit("_", 1)[0]
                messages.append(
                    f"warning: step {step}: {name} has been {float(value):.3g} ({problem}) for {self.patience} "
                    f"log steps: level '{level}' is not learning; see README 'Is pre-training learning?'"
                )
        return messages


def _problem(name: str, value: float) -> str | None:
    if name.endswith(STD_SIGNAL) and value < COLLAPSE_STD:
        return f"collapse: below {COLLAPSE_STD}, healthy is about 1"
    if name.endswith(ENTROPY_SIGNAL) and value > UNIFORM_ENTROPY:
        return f"uniform assignment: above {UNIFORM_ENTROPY} of ln K"
    return None
