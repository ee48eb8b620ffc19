"""SoE training (Cui et al., NeurIPS 2022), after the official code's `loss_base` trainer.

Every batch: PGD examples crafted against the whole ensemble (the selected sub-model's
logits), then one SGD step on soft(clean) + soft(adversarial), where for each input

    soft = sum_i w_i * CE(z_i, y)  +  lambda * BCE(r_i, p_i[y]),   w = softmax_i(r) (detached)

r_i = max softmax(z_i) * sigmoid(a_i) is sub-model i's rectified confidence and p_i[y] its
(detached) probability of the true class: the confidence head learns to predict how right its
sub-model is, and the sub-models are weighted by their predicted confidence. Deviations from
the paper and the official code: docs/baselines.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dwf import attacks
from dwf.config import SoEConfig
from dwf.models.soe import SoE
from dwf.runtime import choice, draw_seed
from dwf.train import Objective, crafting


def soe_loss(model: SoE, x: torch.Tensor, y: torch.Tensor, confidence_weight: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The adaptive-training loss on one batch, and the ensemble's (selected) logits (N, C)."""
    logits, aux = model.outputs(x)  # (N, M, C), (N, M)
    p = logits.softmax(-1)
    confidence = p.amax(-1)  # (N, M)
    right = logits.argmax(-1) == y[:, None]
    # official: the max-probability gets no gradient where the sub-model is already right
    confidence = torch.where(right, confidence.detach(), confidence)
    r = confidence * torch.sigmoid(aux)
    p_true = (p * F.one_hot(y, p.shape[-1])[:, None, :]).sum(-1).detach()  # (N, M)
    with torch.autocast(x.device.type, enabled=False):  # CUDA autocast refuses BCE; r is fp32
        head_loss = F.binary_cross_entropy(r, p_true)
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(logits.shape[1]),
                         reduction="none").view_as(r)  # (N, M)
    w = r.detach().softmax(1)  # soft assignment by predicted confidence
    loss = (w * ce).sum(1).mean() + confidence_weight * head_loss
    return loss, model.select(logits, r)


def soe_batch(model: SoE, x: torch.Tensor, y: torch.Tensor, cfg: SoEConfig,
              rng: torch.Generator) -> Objective:
    """PGD on the whole ensemble, then the loss on the clean and the adversarial batch."""
    steps = choice(cfg.pgd_steps, rng)
    seed = draw_seed(rng) if cfg.random_start else None
    with crafting(model, cfg.attack_bn):
        x_adv = attacks.pgd(model, x, y, eps=cfg.pgd_eps, alpha=cfg.pgd_alpha, steps=steps,
                            random_start=cfg.random_start, seed=seed)
    loss_clean, out_clean = soe_loss(model, x, y, cfg.confidence_weight)
    loss_adv, out_adv = soe_loss(model, x_adv, y, cfg.confidence_weight)
    return Objective(loss_clean + loss_adv, torch.cat([out_clean, out_adv]), torch.cat([y, y]))
