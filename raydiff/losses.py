"""Training objectives: DDPM / flow matching, CBDM, CCUA (UCL + AL), Dispersive Loss and
diffrop, as small pure functions.

The public functions take tensors, not models, so they can be used on any network:
``timestep_weight``, ``denoising_loss``, ``ucl_loss``, ``alignment_loss``, ``cbdm_loss``,
``dispersive_loss``, ``diffrop_loss``. ``compute_losses`` runs one forward pass of a raydiff
network (UNet or SiT) under a noise process (DDPM or flow matching) and returns every named
term. Definitions are in docs/METHOD.md, which follows the CCUA authors' released code and
lists where raydiff differs from it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raydiff.config import LossConfig
from raydiff.diffusion import GaussianDiffusion
from raydiff.flow import FlowMatching

Process = GaussianDiffusion | FlowMatching


def timestep_weight(t: torch.Tensor, T: int, power: float = 1.0, t_align: int = 0) -> torch.Tensor:
    """w(t) = (t/T)^p * [t >= t_align]; t_align = 0, p = 1 is the released code's t/T."""
    w = (t.float() / T) ** power
    return torch.where(t >= t_align, w, torch.zeros_like(w))


def regulariser_weight(process: Process, t: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Per-row weight of UCL, AL and diffrop: (t/T)^p [t >= t_align] under DDPM; under flow
    t^p or (1 - t)^p, by ``cfg.flow_weight_end`` (docs/METHOD.md, "SiT")."""
    if isinstance(process, FlowMatching):
        return process.regulariser_weight(t, cfg.flow_weight_end, cfg.weight_power)
    return timestep_weight(t, process.num_timesteps, cfg.weight_power, cfg.t_align)


def drop_labels(y: torch.Tensor, null_label: int, p: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each label by the null label with probability p (CFG training).

    Per-sample dropout is the DiT convention; returns (labels fed to the model, dropped mask).
    """
    dropped = torch.rand(y.shape, device=y.device, generator=generator) < p
    return torch.where(dropped, torch.full_like(y, null_label), y), dropped


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """L_ddpm: mean over batch and pixels of (target - prediction)^2, the target being eps
    (DDPM), x0 or v; ``weight`` is a per-row timestep weighting (min-SNR), None for uniform."""
    per_sample = _per_sample_mse(pred, target)
    return (per_sample if weight is None else weight * per_sample).mean()


def _gather_with_grad(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All rows of every data-parallel worker, gradients flowing back to their owners.

    Workers may hold different numbers of rows (all_gather needs equal shapes), so rows are
    padded to the largest count and cut again; ``offset`` is where this worker's rows start.
    """
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    counts = [torch.zeros(1, dtype=torch.long, device=z.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([z.shape[0]], device=z.device))
    counts = [int(c) for c in counts]
    padded = F.pad(z, (0, 0, 0, max(counts) - z.shape[0]))
    rows = all_gather(padded)
    keys = torch.cat([r[:n] for r, n in zip(rows, counts)])
    return keys, sum(counts[:rank])


def _is_data_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def ucl_loss(z: torch.Tensor, weight: torch.Tensor, temperature: float = 0.1,
             group_size: int | None = None) -> torch.Tensor:
    """Unsupervised contrastive loss: InfoNCE whose positive is the sample itself.

    l_i = -log( exp(1/tau) / (exp(1/tau) + sum_{j in N(i)} exp(s_ij / tau)) ), s_ij the cosine
    similarity of z_i and z_j, i.e. a pure repulsion between the samples of a batch.
    Returns sum_i weight_i * l_i / B over this worker's B rows; ``z`` is (B, ...).

    The negatives N(i) are the other rows of i's group: the *global* batch (every worker's rows,
    rank 0 first, when a process group is initialised) is cut into consecutive groups of
    ``group_size`` rows; ``None`` makes the whole global batch one group. The released UNet
    script computed UCL per GPU chunk of 32 rows, so a group of 32 reproduces it on any number
    of workers, and the value and gradients do not depend on how the batch is split.
    Rows whose weight is 0 are neither anchors nor negatives (raydiff skips their unconditional
    pass); the released code keeps them as negatives, which only touches t = 0 rows at
    t_align = 0. Under a process group every worker must call this function with the same
    number of rows; when the groups do not fall within workers, rows are all-gathered with
    gradients.
    """
    z = F.normalize(z.flatten(1).float(), dim=1)
    n = z.shape[0]
    valid = weight > 0
    if not _is_data_parallel() or (group_size is not None and n % group_size == 0):
        keys, key_valid, offset = z, valid, 0  # every group lies within this worker
    else:
        gathered, offset = _gather_with_grad(torch.cat([z, valid[:, None].to(z.dtype)], dim=1))
        keys, key_valid = gathered[:, :-1], gathered[:, -1] > 0.5
    if n == 0:
        return keys.sum() * 0.0  # keeps the graph connected
    rows = torch.arange(n, device=z.device) + offset
    cols = torch.arange(keys.shape[0], device=z.device)
    negative = key_valid[None, :] & (rows[:, None] != cols[None, :])
    if group_size is not None:
        negative &= (rows[:, None] // group_size) == (cols[None, :] // group_size)
    # l_i = log(1 + sum_j exp((s_ij - 1) / tau)) = softplus(logsumexp_j (s_ij - 1) / tau):
    # the same InfoNCE value, without the cancellation of logsumexp(...) - 1/tau in float32.
    # Non-negatives get the lowest finite logit, not -inf: a row with no negative then scores
    # softplus(-huge) = 0 with a finite gradient.
    # In float32 under bf16 autocast too: a bf16 s_ij near 1 keeps 8 bits, which (s - 1) / tau
    # would magnify, and float32's lowest value does not fit in bf16.
    with torch.autocast(z.device.type, enabled=False):
        logits = ((z @ keys.T - 1.0) / temperature).masked_fill(~negative,
                                                                 torch.finfo(z.dtype).min)
    per_sample = F.softplus(torch.logsumexp(logits, dim=1))
    return (torch.where(valid, weight.float(), 0.0) * per_sample).sum() / n


def alignment_loss(eps_cond: torch.Tensor, eps_uncond: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
    """AL: mean over batch and pixels of w(t_i) (eps_theta(x_t,t,y) - eps_theta(x_t,t,null))^2.

    No stop-gradient on either branch (as released).
    """
    if eps_cond.shape[0] == 0:
        return eps_cond.sum() * 0.0
    return (weight.float() * _per_sample_mse(eps_cond, eps_uncond)).mean()


def cbdm_loss(eps_y: torch.Tensor, eps_y_prime: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CBDM regulariser (Qin et al. 2023) with y' drawn from the class prior:

    mean_i w_i [ |eps(y) - sg(eps(y'))|^2 + 1/4 |sg(eps(y)) - eps(y')|^2 ], w_i = tau_cb t_i/T.
    """
    pull = _per_sample_mse(eps_y, eps_y_prime.detach())
    push = _per_sample_mse(eps_y.detach(), eps_y_prime)
    return (weight.float() * (pull + 0.25 * push)).mean()


def dispersive_loss(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Dispersive Loss, InfoNCE-L2 variant (Wang & He 2025) as released (``disp_loss`` of
    CCUA-SiT's transport.py): log mean_{i,j} exp(-|z_i - z_j|^2 / (D tau)) over all B^2
    ordered pairs of the rows of ``z`` (B, ...) flattened to D values, the B pairs (i, i)
    included. Its minimum pushes the rows apart; there is no positive pair."""
    z = z.flatten(1).float()
    B, D = z.shape
    # In float32 under bf16 autocast too; pdist computes each distance directly (no
    # |a|^2 + |b|^2 - 2ab cancellation), as the released code does.
    with torch.autocast(z.device.type, enabled=False):
        d = F.pdist(z).pow(2) / (D * temperature)  # the B (B - 1) / 2 pairs i < j
        logits = torch.cat([-d, -d, torch.zeros(B, device=z.device)])
        return torch.logsumexp(logits, dim=0) - 2 * math.log(B)


def diffrop_loss(out: torch.Tensor, y: torch.Tensor, partner: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
    """diffrop (CCUA-SiT's transport.py): 1 / (1 + d), d = mean_i w_i [y_i != y_pi(i)]
    |out_i - out_pi(i)|^2 (mean over pixels), pi = ``partner`` a random pairing of the rows
    (the released ``torch.randperm``); the mean runs over all B rows, pairs of one label
    included (they add 0). Gradients flow through both members of a pair."""
    differ = (y[partner] != y).float()
    d = (weight.float() * differ * _per_sample_mse(out, out[partner])).mean()
    return 1.0 / (1.0 + d)


UNCOND_ROW_MULTIPLE = 16  # CCUA's unconditional rows per step are padded to a multiple of this


def _ccua_terms(model: nn.Module, process: Process, x_t, t, y_in, dropped, target,
                weight, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """One forward of B + n_u rows: the conditional batch plus the unconditional rows needed.

    Rows with w(t) = 0 need no unconditional prediction. Rows whose label was dropped already
    are unconditional: their conditional pass supplies their UCL features, and their AL term
    is 0 by definition, so they are not run twice. AL compares the eps the two outputs imply,
    whatever the network predicts (for eps-prediction, the outputs themselves); under flow
    matching, the velocities. The released CCUA-SiT "parallel" mode also runs the
    unconditional rows in the same forward as the conditional ones.
    """
    B = x_t.shape[0]
    w = regulariser_weight(process, t, cfg)
    active = w > 0
    run_uncond = active & ~dropped
    u_idx = run_uncond.nonzero().squeeze(1)
    n_u = u_idx.numel()
    # The row count is rounded up to a multiple of UNCOND_ROW_MULTIPLE with rows that need no
    # unconditional pass (weight 0): a handful of batch shapes instead of one per count of
    # dropped labels, so the convolution kernels chosen for a shape are reused (oneDNN on CPU
    # rebuilds them for every new shape: 426 -> 254 ms per step of 64 on 2 cores, BENCHMARKS.md).
    rows = min(B, -(-n_u // UNCOND_ROW_MULTIPLE) * UNCOND_ROW_MULTIPLE)
    spare = (~run_uncond).nonzero().squeeze(1)[:rows - n_u]
    r_idx = torch.cat([u_idx, spare])
    w_u = torch.cat([w[u_idx], torch.zeros_like(w[spare])])
    null = torch.full_like(r_idx, model_null_label(model))
    out_all, z_all = model(torch.cat([x_t, x_t[r_idx]]), torch.cat([t, t[r_idx]]),
                           torch.cat([y_in, null]), return_features=True)
    out_c, out_u = out_all[:B], out_all[B:]
    z_c, z_u = z_all[:B], z_all[B:]
    # AL is computed on those rows (the padding weighs 0), then rescaled to a mean over all B.
    x_u, t_u = x_t[r_idx], t[r_idx]
    al = alignment_loss(process.comparable(x_u, t_u, out_c[r_idx]),
                        process.comparable(x_u, t_u, out_u), w_u) * (r_idx.numel() / B)
    # UCL sees all B rows in batch order (its groups are positions in the global batch); rows
    # with w = 0 keep their conditional features, which ucl_loss ignores.
    z = z_c.index_put((u_idx,), z_u[:n_u])
    group = None if cfg.global_negatives else cfg.ucl_group_size
    ucl = ucl_loss(z, w, cfg.temperature, group)
    main = denoising_loss(out_c, target, weight)
    return {"loss": main + cfg.ucl_weight * ucl + cfg.al_weight * al,
            process.term: main, "ucl": ucl, "al": al}


def _cbdm_terms(model: nn.Module, process: Process, x_t, t, y_in, dropped, target,
                weight, cfg: LossConfig, class_prior: torch.Tensor,
                generator) -> dict[str, torch.Tensor]:
    """CBDM's two passes; rows whose label was dropped for CFG get no regulariser, as in the
    released code (which drops whole batches and then skips CBDM for them). The weight is
    tau_cb times the noise level: t / T under DDPM, 1 - t under flow."""
    y_prime = torch.multinomial(class_prior.to(x_t.device), x_t.shape[0], replacement=True,
                                generator=generator)
    out_y, out_y_prime = model(torch.cat([x_t, x_t]), torch.cat([t, t]),
                               torch.cat([y_in, y_prime])).chunk(2)
    main = denoising_loss(out_y, target, weight)
    w = cfg.cbdm_tau * process.noise_level(t) * (~dropped).float()
    cb = cbdm_loss(process.comparable(x_t, t, out_y), process.comparable(x_t, t, out_y_prime), w)
    return {"loss": main + cb, process.term: main, "cbdm": cb}


def _dispersive_terms(model: nn.Module, process: Process, x_t, t, y_in, target, weight,
                      cfg: LossConfig) -> dict[str, torch.Tensor]:
    """One forward; Dispersive Loss on the features it names "dispersive" (SiT: the last
    block's tokens, the released ``act[-1]``; UNet: the bottleneck), over this worker's rows
    (the released code: one GPU's rows)."""
    out, z = model(x_t, t, y_in, return_features="dispersive")
    main = denoising_loss(out, target, weight)
    disp = dispersive_loss(z, cfg.dispersive_temperature)
    return {"loss": main + cfg.dispersive_weight * disp, process.term: main, "dispersive": disp}


def _diffrop_terms(model: nn.Module, process: Process, x_t, t, y, y_in, target, weight,
                   cfg: LossConfig, generator) -> dict[str, torch.Tensor]:
    """One forward; diffrop between each row and a random partner. The label test uses the
    labels before dropout, as the released code (its network drops labels inside)."""
    out = model(x_t, t, y_in)
    main = denoising_loss(out, target, weight)
    partner = torch.randperm(x_t.shape[0], device=x_t.device, generator=generator)
    dr = diffrop_loss(process.comparable(x_t, t, out), y, partner,
                      regulariser_weight(process, t, cfg))
    return {"loss": main + cfg.diffrop_weight * dr, process.term: main, "diffrop": dr}


def model_null_label(model: nn.Module) -> int:
    return getattr(model, "module", model).null_label


def compute_losses(model: nn.Module, process: Process, x0: torch.Tensor,
                   y: torch.Tensor, cfg: LossConfig, class_prior: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Draw t and the noise, noise the data ``x0`` (the flow's x1) and return the named loss
    terms; ``"loss"`` is the total, the regression term is named ``process.term`` ("ddpm" or
    "flow").

    ``class_prior`` (probabilities over the real classes) is where CBDM draws y' from;
    uniform when not given. ``model`` may be wrapped in DDP.
    """
    t, x_t, target = process.draw(x0, generator)
    y_in, dropped = drop_labels(y, model_null_label(model), cfg.label_dropout, generator)
    weight = process.loss_weight(t)
    if cfg.method == "ccua" and (cfg.ucl_weight > 0 or cfg.al_weight > 0):
        return _ccua_terms(model, process, x_t, t, y_in, dropped, target, weight, cfg)
    if cfg.method == "cbdm":
        if class_prior is None:
            num_classes = model_null_label(model)
            class_prior = torch.full((num_classes,), 1.0 / num_classes)
        return _cbdm_terms(model, process, x_t, t, y_in, dropped, target, weight, cfg,
                           class_prior, generator)
    if cfg.method == "dispersive" and cfg.dispersive_weight > 0:
        return _dispersive_terms(model, process, x_t, t, y_in, target, weight, cfg)
    if cfg.method == "diffrop" and cfg.diffrop_weight > 0:
        return _diffrop_terms(model, process, x_t, t, y, y_in, target, weight, cfg, generator)
    main = denoising_loss(model(x_t, t, y_in), target, weight)
    return {"loss": main, process.term: main}
