"""GRPO's arithmetic: group-normalised advantages, per-token log-probs and the clipped surrogate loss
with a k3 KL penalty. Pure torch, unit-tested against TRL's GRPOTrainer (trl 1.16) on fixed tensors.

Choices, all TRL's defaults (GRPOConfig):
  * advantages (r - mean_group) / (std_group + 1e-4), std with Bessel's correction (scale_rewards
    "group"); a group whose rewards are all equal gets advantage 0 and teaches nothing;
  * token-level ratio exp(logp - logp_old), clipped to [1 - ε, 1 + ε] (epsilon_low = epsilon_high);
  * KL to the reference per token with the k3 estimator exp(ref - logp) - (ref - logp) - 1, times β,
    added to the token's loss (beta 0: no reference forward at all);
  * the loss summed over every completion token of the whole batch and divided by their count across
    all ranks (loss_type "dapo", TRL's default): long and short completions weigh per token.
"""

from __future__ import annotations

ADV_EPS = 1e-4  # TRL's


def group_advantages(rewards, group_size: int):
    """[B] rewards, B = prompts × group_size in group order → [B] advantages."""
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)  # unbiased, as TRL's nanstd
    return ((groups - mean) / (std + ADV_EPS)).reshape(-1)


def token_logps(logits, input_ids):
    """[B, T-1] log-prob (fp32) of each next token under `logits` [B, T, V]: position t scores token t+1."""
    import torch

    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def token_loss(logps, old_logps, advantages, epsilon: float, beta: float = 0.0, ref_logps=None):
    """(per-token loss, per-token KL or None, per-token clipped flag), all [B, T]; `advantages` [B].

    loss = -min(ρ·A, clip(ρ, 1-ε, 1+ε)·A) + β·KL, ρ = exp(logp - logp_old). A token counts as clipped
    where the clip took effect on the objective (ρ < 1-ε with A < 0, or ρ > 1+ε with A > 0), as TRL's
    clip_ratio/region_mean."""
    import torch

    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    kl = None
    if beta != 0.0:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        loss = loss + beta * kl
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    return loss, kl, clipped
