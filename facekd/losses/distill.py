"""Distillation losses for face recognition embeddings, chosen by name with `build_distill_loss`.

Every loss is an `nn.Module` called as `loss(student, teacher, labels) -> (loss, metrics)`:
`student` (B, D) and `teacher` (B, D') are raw embeddings, `labels` (B,) identity ids, `loss` a
scalar and `metrics` a dict of detached 0-d tensors to log. The teacher is always detached, so
no gradient reaches it even when its embeddings were computed with autograd on. Everything is
computed in float32 whatever the autocast precision of the models.

- `feature`: L2 or cosine distance between the L2-normalised embeddings (needs D == D');
- `rkd`: Relational KD (Park et al., CVPR 2019), distance and angle relations;
- `similarity`: Similarity-Preserving KD (Tung & Mori, ICCV 2019);
- `ekd`: Evaluation-oriented KD (Huang et al., CVPR 2022), across processes on the global batch,
  optionally with a cross-batch memory of past embeddings (facekd's extension: `memory`);
- `ekd+feature`: `ekd` plus `feature_weight` x `feature` (needs D == D').
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Iterable, Literal, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from facekd.config import ConfigModel, NonNegative, validated
from facekd.engine.distributed import all_gather_with_grad
from facekd.errors import ConfigError

DISTILL_METHODS = ("none", "feature", "rkd", "similarity", "ekd", "ekd+feature")
FEATURE_METRICS = ("l2", "cosine")
THRESHOLD_AVERAGES = ("bias_corrected", "paper")
EKD_LEVELS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
EKD_LOGGED_LEVEL = 1e-3
_NORM_EPS = 1e-12
_MEMORY_BUFFERS = ("memory_student", "memory_teacher", "memory_labels")

Metrics = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- helpers

class _FeatureOptions(ConfigModel):
    metric: Literal[FEATURE_METRICS]


class _RKDOptions(ConfigModel):
    distance_weight: NonNegative
    angle_weight: NonNegative


class _EKDOptions(ConfigModel):
    levels: Annotated[tuple[Annotated[float, Field(gt=0, lt=1)], ...], Field(strict=False)]
    temperature: float = Field(gt=0)
    top_k: Union[int, float]
    positive_weight: NonNegative
    negative_weight: NonNegative
    momentum: float = Field(gt=0, le=1)
    threshold_average: Literal[THRESHOLD_AVERAGES]
    memory: int = Field(ge=0)

    @field_validator("levels")
    @classmethod
    def _distinct_levels(cls, levels: tuple[float, ...]) -> tuple[float, ...]:
        """FPR levels, highest first."""
        if not levels:
            raise ValueError("needs at least one FPR level")
        if len(set(levels)) != len(levels):
            raise ValueError(f"must be distinct, got {list(levels)}")
        return tuple(sorted(levels, reverse=True))

    @field_validator("top_k", mode="before")
    @classmethod
    def _count_or_fraction(cls, top_k: Any) -> int | float:
        """An int >= 1 is a count of negatives, a float in (0, 1) a fraction of them."""
        if isinstance(top_k, bool) or not isinstance(top_k, (int, float)):
            raise ValueError(f"expected an int (a count) or a float in (0, 1) (a fraction), got {top_k!r}")
        if isinstance(top_k, int):
            if top_k < 1:
                raise ValueError(f"a count must be >= 1, got {top_k}")
        elif not 0 < top_k < 1:
            hint = f" (for a count write {int(top_k)})" if top_k >= 1 and top_k == int(top_k) else ""
            raise ValueError(f"a float is a fraction of the negatives and must lie in (0, 1), got {top_k}{hint}")
        return top_k


class _FeatureWeightOptions(ConfigModel):
    feature_weight: NonNegative


def _check_inputs(name: str, student: torch.Tensor, teacher: torch.Tensor,
                  labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (B, D) student and detached float32 (B, D') teacher; misuse raises ValueError."""
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"{name}: embeddings must be (batch, dim); got student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{name}: student and teacher batch sizes differ ({student.shape[0]} vs "
                         f"{teacher.shape[0]})")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != student.shape[0]):
        raise ValueError(f"{name}: labels must be (batch,) = ({student.shape[0]},), got {tuple(labels.shape)}")
    return student.float(), teacher.detach().float()


def _zero_like(x: torch.Tensor) -> torch.Tensor:
    # keeps the graph, so the student still gets a (zero) gradient (DDP needs every parameter used)
    return x.sum() * 0.0


def _gather_plain(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0, without gradient (same shape on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


# ----------------------------------------------------------------------------- feature

class FeatureDistill(nn.Module):
    """Pointwise embedding distillation on L2-normalised embeddings (needs D == D').

    metric 'l2': mean over the batch of ||s - t||^2 (summed over dims), in [0, 4];
    metric 'cosine': mean of 1 - cos(s, t), in [0, 2] (for unit vectors l2 = 2 * cosine).
    """

    def __init__(self, metric: Literal["l2", "cosine"] = "l2"):
        super().__init__()
        self.metric = validated(_FeatureOptions, {"metric": metric}, "feature").metric

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
        student, teacher = _check_inputs("feature", student, teacher)
        if student.shape[1] != teacher.shape[1]:
            raise ConfigError(f"feature: student embedding size {student.shape[1]} differs from the teacher's "
                              f"{teacher.shape[1]}; pointwise distillation needs equal sizes (use rkd, "
                              f"similarity or ekd, which compare relations)")
        if student.shape[0] == 0:
            return _zero_like(student), {}
        s = F.normalize(student, dim=1, eps=_NORM_EPS)
        t = F.normalize(teacher, dim=1, eps=_NORM_EPS)
        if self.metric == "l2":
            loss = (s - t).pow(2).sum(dim=1).mean()
        else:
            loss = (1.0 - (s * t).sum(dim=1)).mean()
        return loss, {}


# ----------------------------------------------------------------------------- rkd

def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix with an exact zero diagonal and finite gradients everywhere."""
    squared = x.pow(2).sum(dim=1)
    d2 = (squared.unsqueeze(1) + squared.unsqueeze(0) - 2.0 * x @ x.t()).clamp_min(_NORM_EPS)
    off_diagonal = 1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype)
    return d2.sqrt() * off_diagonal


def _angle_potentials(x: torch.Tensor) -> torch.Tensor:
    """(B, B, B) cosines: [i, j, k] = cos of the angle at x_i between x_j and x_k (0 when degenerate)."""
    directions = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=2, eps=_NORM_EPS)  # [i, j] = unit(x_j - x_i)
    return directions @ directions.transpose(1, 2)


class RKDDistill(nn.Module):
    """Relational KD (Park et al., CVPR 2019), computed on L2-normalised embeddings (D may differ from D').

    Distance term: smooth-L1 (Huber, beta 1) between the student's and teacher's pairwise
    distance matrices, each divided by its mean over the B(B-1) off-diagonal pairs.
    Angle term: smooth-L1 between the (B, B, B) angle potentials, [i, j, k] = the cosine of the
    angle at e_i between e_j and e_k (through normalised difference vectors).
    As in the authors' code, each smooth-L1 is the mean over all B^2 (resp. B^3) entries,
    degenerate ones (zero in both) included. Memory is O(B^2 D + B^3). A batch of fewer than 2
    gives 0. Metrics: rkd_distance, rkd_angle (unweighted terms).
    """

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0):
        super().__init__()
        options = validated(_RKDOptions, {"distance_weight": distance_weight, "angle_weight": angle_weight}, "rkd")
        self.distance_weight, self.angle_weight = options.distance_weight, options.angle_weight

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"

    @staticmethod
    def _normalised_distances(x: torch.Tensor) -> torch.Tensor:
        d = _pairwise_distances(x)
        pairs = x.shape[0] * (x.shape[0] - 1)
        return d / (d.sum() / pairs).clamp_min(_NORM_EPS)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
        student, teacher = _check_inputs("rkd", student, teacher)
        if student.shape[0] < 2:
            zero = _zero_like(student)
            return zero, {"rkd_distance": zero.detach(), "rkd_angle": zero.detach()}
        s = F.normalize(student, dim=1, eps=_NORM_EPS)
        t = F.normalize(teacher, dim=1, eps=_NORM_EPS)
        distance = F.smooth_l1_loss(self._normalised_distances(s), self._normalised_distances(t), beta=1.0)
        angle = F.smooth_l1_loss(_angle_potentials(s), _angle_potentials(t), beta=1.0)
        loss = self.distance_weight * distance + self.angle_weight * angle
        return loss, {"rkd_distance": distance.detach(), "rkd_angle": angle.detach()}


# ----------------------------------------------------------------------------- similarity preserving

class SimilarityPreserving(nn.Module):
    """Similarity-Preserving KD (Tung & Mori, ICCV 2019) on the embeddings (D may differ from D').

    G = F F^T with each row L2-normalised, for student and teacher (raw embeddings, as in the
    paper); loss = ||G_s - G_t||_F^2 / B^2.
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
        student, teacher = _check_inputs("similarity", student, teacher)
        batch = student.shape[0]
        if batch == 0:
            return _zero_like(student), {}
        g_s = F.normalize(student @ student.t(), dim=1, eps=_NORM_EPS)
        g_t = F.normalize(teacher @ teacher.t(), dim=1, eps=_NORM_EPS)
        return (g_s - g_t).pow(2).sum() / (batch * batch), {}


# ----------------------------------------------------------------------------- ekd

def ekd_threshold_indices(num_negatives: int, levels: Iterable[float]) -> list[int]:
    """0-based positions, in the negatives sorted by decreasing similarity, of each level's threshold.

    Position floor(level * N_neg) (the reference code's `N // (1/level)`), so that at most
    level * N_neg negatives lie strictly above the threshold; 0 (the largest negative) when
    level * N_neg < 1."""
    if num_negatives < 1:
        raise ValueError("ekd_threshold_indices: needs at least one negative pair")
    # the tiny relative slack makes e.g. 1e-3 * 3000 count as 3, not 2.9999999
    return [min(num_negatives - 1, int(math.floor(level * num_negatives * (1.0 + 1e-9)))) for level in levels]


class EKDLoss(nn.Module):
    """Evaluation-oriented KD (Huang et al., CVPR 2022), following the authors' TFace code.

    Each step, on every process:
    1. the student embeddings are all-gathered with gradient and the teacher embeddings and
       labels without, so every rank computes the same loss on the global batch (local batches
       must have the same size on every rank);
    2. on L2-normalised embeddings, cosine similarities of all pairs i < j, student and teacher;
       a pair is positive when both labels agree;
    3. per FPR level, a threshold: the negatives sorted by decreasing similarity, the one at
       0-based position floor(level * N_neg) (`ekd_threshold_indices`; the reference code's
       `N // anchor`), for student and teacher separately. When level * N_neg < 1 that is the
       largest negative: a level means something only when N_neg >= 1 / level. With P
       identities x K images in a global batch of B = P*K, N_neg = B(B-1)/2 - P*K(K-1)/2,
       so level 1e-6 needs N_neg >= 1e6, i.e. B of about 1415 or more; 1e-3 needs B >= 46 or so;
    4. thresholds are smoothed across steps by a moving average kept in buffers (checkpointed,
       with the number of updates t): thr = (1 - m_t) * thr + m_t * batch_thr, momentum being
       the weight of the new batch (0.01 in the paper). `threshold_average`:
       - 'bias_corrected' (default): m_t = momentum / (1 - (1 - momentum)^t), i.e. thr is
         Adam's bias-corrected average, a zero-started EMA divided by 1 - (1 - momentum)^t:
         sum_i momentum (1 - momentum)^(t-i) batch_thr_i / (1 - (1 - momentum)^t). Early
         batches do not outweigh later ones, so a run much shorter than 1 / momentum steps
         follows the moving thresholds (about the mean of the last min(t, 1 / momentum) batches);
       - 'paper': m_t = momentum, the first update taking the batch value (the paper's code
         starts from zeros instead, a warm-up bias this avoids): the first batch keeps a weight
         (1 - momentum)^(t-1), made for runs of ~1e5 steps.
       Both take the first batch's value at t = 1. Buffers change only in training mode, under
       no_grad, and before the loss uses them (as in the paper's code). In eval mode the stored
       thresholds are used, or the batch's if none were stored yet;
    5. soft rank r(s) = sum over levels of sigmoid((s - thr_level) / temperature), students'
       similarities against the student thresholds, teachers' against the teacher's
       (the paper's code clamps the sigmoid's argument to [-50, 50]; `torch.sigmoid` is
       stable without it);
    6. loss = positive_weight * MSE(r_s, r_t) over all positive pairs + negative_weight *
       MSE over the top_k negatives with the largest STUDENT similarity (all of them when
       there are fewer; `top_k`: an int is a count, a float f in (0, 1) means
       ceil(f * N_neg) of them). MSE is a mean, as in the paper's code. An empty set of
       positives (or negatives) contributes 0; without negatives the thresholds are not updated;
    7. cross-batch memory (`memory` M > 0; facekd's extension, not in the paper or TFace, after
       Wang et al.'s XBM, CVPR 2020): a FIFO of the last M global-batch entries (student
       embedding, detached; teacher embedding; label), all L2-normalised and identical on every
       rank. The current batch's pairs with the memory's entries of OTHER identities are
       negatives that join steps 3 and 6 (the thresholds and the hard-negative set; the
       memory's side carries no gradient), so N_neg grows from about B^2/2 to B^2/2 + B*M and
       low FPR levels mean something with a small batch (B 128 with M 8192: over 1e6
       negatives, 1e-6). Pairs with the memory's entries of the same identity are not used.
       The batch is queued after its loss, in training mode only; the memory is in the buffers
       (checkpointed) and starts empty, so M = 0 is plain EKD exactly.

    Gradient: thresholds carry none. Each rank's gathered copy sends its gradient back to the
    owning rank, summed over ranks (see `all_gather_with_grad`), so a rank's raw gradient is
    world_size times the single-process full-batch gradient; DDP's averaging makes it exact.
    Metrics: ekd_pos and ekd_neg (the weighted terms, summing to the loss) and, when 1e-3 is a
    level, ekd_thr_student / ekd_thr_teacher (the smoothed thresholds at FPR 1e-3); with a
    memory, ekd_memory (its entries used this step). Compute and memory are O(B^2 + B*M) in
    the global batch B.
    """

    def __init__(self, levels: Iterable[float] = EKD_LEVELS, temperature: float = 0.01, top_k: int | float = 2000,
                 positive_weight: float = 0.02, negative_weight: float = 0.01, momentum: float = 0.01,
                 threshold_average: Literal["bias_corrected", "paper"] = "bias_corrected", memory: int = 0):
        super().__init__()
        self.options = options = validated(_EKDOptions, {
            "levels": levels, "temperature": temperature, "top_k": top_k, "positive_weight": positive_weight,
            "negative_weight": negative_weight, "momentum": momentum, "threshold_average": threshold_average,
            "memory": memory}, "ekd")
        self.levels, self.temperature, self.top_k = options.levels, options.temperature, options.top_k
        self.positive_weight, self.negative_weight = options.positive_weight, options.negative_weight
        self.momentum, self.threshold_average = options.momentum, options.threshold_average
        logged = [i for i, level in enumerate(self.levels) if math.isclose(level, EKD_LOGGED_LEVEL)]
        self._logged_level = logged[0] if logged else None
        self.register_buffer("student_thresholds", torch.zeros(len(self.levels)))
        self.register_buffer("teacher_thresholds", torch.zeros(len(self.levels)))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        self.memory = options.memory
        if self.memory:  # sized by the first batch (or by a loaded state): entries oldest first
            self.register_buffer("memory_student", torch.zeros(0, 0))
            self.register_buffer("memory_teacher", torch.zeros(0, 0))
            self.register_buffer("memory_labels", torch.zeros(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the memory's buffers take the saved shapes (its fill and the embedding sizes)
        for name in _MEMORY_BUFFERS if self.memory else ():
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def memory_entries(self) -> int:
        """Entries in the cross-batch memory now (0 without one)."""
        return self.memory_labels.numel() if self.memory else 0

    @torch.no_grad()
    def _enqueue(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> None:
        """Append the batch's unit embeddings and labels, keeping the newest `memory` entries."""
        def keep(name: str, new: torch.Tensor) -> None:
            old = getattr(self, name)
            setattr(self, name, (torch.cat([old, new]) if old.numel() else new)[-self.memory:].clone())

        keep("memory_student", student.detach().float())
        keep("memory_teacher", teacher.detach().float())
        keep("memory_labels", labels.detach().long())

    @torch.no_grad()
    def _negative_pool(self, neg_s: torch.Tensor, neg_t: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every negative's similarity, detached: the batch's (`neg_s`, `neg_t`) then the batch's
        (unit s, t) with the memory's entries, batch-row-major, those of the same identity -inf
        (they sort last); and the number of real negatives."""
        if not self.memory_entries:
            return neg_s.detach(), neg_t, neg_s.numel()
        same = labels.unsqueeze(1) == self.memory_labels.to(labels.device).unsqueeze(0)
        cross_s = (s.detach() @ self.memory_student.to(s).t()).masked_fill_(same, -math.inf)
        cross_t = (t @ self.memory_teacher.to(t).t()).masked_fill_(same, -math.inf)
        count = neg_s.numel() + same.numel() - int(same.sum())
        return torch.cat([neg_s.detach(), cross_s.flatten()]), torch.cat([neg_t, cross_t.flatten()]), count

    def _hard_negatives(self, chosen: torch.Tensor, neg_s: torch.Tensor, pool_t: torch.Tensor,
                        s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student (with gradient) and teacher similarities of the pool's negatives at `chosen`,
        the batch's first: the memory's are recomputed from the chosen pairs only, so the
        gradient never spans the whole (B, M) block."""
        if not self.memory_entries:
            return neg_s[chosen], pool_t[chosen]
        from_batch, from_memory = chosen[chosen < neg_s.numel()], chosen[chosen >= neg_s.numel()]
        offset = from_memory - neg_s.numel()  # into the (B, M) block, row-major
        row, col = offset // self.memory_entries, offset % self.memory_entries
        memory = (s[row] * self.memory_student.to(s)[col]).sum(dim=1)  # gradient on the batch's side only
        return torch.cat([neg_s[from_batch], memory]), pool_t[torch.cat([from_batch, from_memory])]

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.model_dump().items())

    def update_momentum(self, t: int) -> float:
        """Weight of the new batch in the t-th threshold update (t >= 1)."""
        if t == 1:
            return 1.0
        if self.threshold_average == "paper":
            return self.momentum
        return self.momentum / (1.0 - (1.0 - self.momentum) ** t)

    def num_hardest(self, num_negatives: int) -> int:
        """How many of `num_negatives` negatives the negative term uses (`top_k`: count or fraction)."""
        if isinstance(self.top_k, float):
            # the tiny relative slack makes e.g. 0.1 * 30 count as 3, not 3.0000000000000004 -> 4
            return min(num_negatives, math.ceil(self.top_k * num_negatives * (1.0 - 1e-9)))
        return min(num_negatives, self.top_k)

    @torch.no_grad()
    def batch_thresholds(self, negatives: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """This batch's threshold per level (in `self.levels` order) from 1-D negative similarities,
        of which `count` (all by default) are real and the rest -inf."""
        indices = ekd_threshold_indices(negatives.numel() if count is None else count, self.levels)
        top = torch.topk(negatives.detach(), k=max(indices) + 1, sorted=True).values
        return top[torch.tensor(indices, device=top.device)]

    @torch.no_grad()
    def _thresholds(self, neg_s: torch.Tensor, neg_t: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher thresholds to use this step, updating the buffers in training mode."""
        if count == 0:
            return self.student_thresholds.clone(), self.teacher_thresholds.clone()
        batch_s, batch_t = self.batch_thresholds(neg_s, count), self.batch_thresholds(neg_t, count)
        if self.training:
            self.threshold_updates.add_(1)
            m = self.update_momentum(int(self.threshold_updates))
            if m == 1.0:
                self.student_thresholds.copy_(batch_s)
                self.teacher_thresholds.copy_(batch_t)
            else:
                self.student_thresholds.mul_(1.0 - m).add_(batch_s.to(self.student_thresholds), alpha=m)
                self.teacher_thresholds.mul_(1.0 - m).add_(batch_t.to(self.teacher_thresholds), alpha=m)
        elif int(self.threshold_updates) == 0:
            return batch_s, batch_t
        return self.student_thresholds.clone(), self.teacher_thresholds.clone()

    def soft_rank(self, similarities: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """Number of thresholds each similarity lies above, softened by a sigmoid of `temperature`."""
        thresholds = thresholds.to(similarities)
        return torch.sigmoid((similarities.unsqueeze(1) - thresholds.unsqueeze(0)) / self.temperature).sum(dim=1)

    def _rank_mse(self, s: torch.Tensor, t: torch.Tensor, thr_s: torch.Tensor, thr_t: torch.Tensor,
                  like: torch.Tensor) -> torch.Tensor:
        if s.numel() == 0:
            return _zero_like(like)
        return F.mse_loss(self.soft_rank(s, thr_s), self.soft_rank(t, thr_t))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        student, teacher = _check_inputs("ekd", student, teacher, labels)
        student = all_gather_with_grad(student)
        with torch.no_grad():
            teacher = _gather_plain(teacher)
            labels = _gather_plain(labels.to(student.device))
        s = F.normalize(student, dim=1, eps=_NORM_EPS)
        t = F.normalize(teacher, dim=1, eps=_NORM_EPS)
        n = s.shape[0]
        rows, cols = torch.triu_indices(n, n, offset=1, device=s.device)
        sim_s = (s @ s.t())[rows, cols]
        sim_t = (t @ t.t())[rows, cols]
        positive = labels[rows] == labels[cols]
        neg_s = sim_s[~positive]
        pool_s, pool_t, count = self._negative_pool(neg_s, sim_t[~positive], s, t, labels)
        thr_s, thr_t = self._thresholds(pool_s, pool_t, count)

        pos_term = self._rank_mse(sim_s[positive], sim_t[positive], thr_s, thr_t, student)
        hardest = torch.topk(pool_s, k=self.num_hardest(count)).indices
        neg_term = self._rank_mse(*self._hard_negatives(hardest, neg_s, pool_t, s), thr_s, thr_t, student)
        pos_term = self.positive_weight * pos_term
        neg_term = self.negative_weight * neg_term
        metrics = {"ekd_pos": pos_term.detach(), "ekd_neg": neg_term.detach()}
        if self._logged_level is not None:
            metrics["ekd_thr_student"] = thr_s[self._logged_level].detach().clone()
            metrics["ekd_thr_teacher"] = thr_t[self._logged_level].detach().clone()
        if self.memory:
            metrics["ekd_memory"] = torch.tensor(float(self.memory_entries), device=s.device)
            if self.training:
                self._enqueue(s, t, labels)
        return pos_term + neg_term, metrics


class EKDFeatureLoss(nn.Module):
    """`ekd` + feature_weight x `feature`: EKD's pair relations (on the global batch) plus
    pointwise matching of the L2-normalised embeddings (on the local batch; needs D == D').

    `ekd_options` are EKDLoss's; its buffers live under `ekd.`. Metrics: EKD's, and
    `feature` (the weighted feature term; ekd_pos + ekd_neg + feature = the loss).
    """

    def __init__(self, feature_weight: float = 1.0, metric: Literal["l2", "cosine"] = "l2", **ekd_options: Any):
        super().__init__()
        self.feature_weight = validated(_FeatureWeightOptions, {"feature_weight": feature_weight},
                                        "ekd+feature").feature_weight
        self.ekd = EKDLoss(**ekd_options)
        self.feature = FeatureDistill(metric)

    def extra_repr(self) -> str:
        return f"feature_weight={self.feature_weight}"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        ekd, metrics = self.ekd(student, teacher, labels)
        feature, _ = self.feature(student, teacher, labels)
        feature = self.feature_weight * feature
        return ekd + feature, {**metrics, "feature": feature.detach()}


# ----------------------------------------------------------------------------- registry

_LOSSES: dict[str, tuple[type[nn.Module], tuple[type[ConfigModel], ...]]] = {
    "feature": (FeatureDistill, (_FeatureOptions,)),
    "rkd": (RKDDistill, (_RKDOptions,)),
    "similarity": (SimilarityPreserving, ()),
    "ekd": (EKDLoss, (_EKDOptions,)),
    "ekd+feature": (EKDFeatureLoss, (_EKDOptions, _FeatureWeightOptions, _FeatureOptions)),
}


def distill_options(method: str) -> tuple[str, ...]:
    """Names of the options `build_distill_loss(method, ...)` accepts."""
    if method == "none":
        return ()
    if not isinstance(method, str) or method not in _LOSSES:
        raise ConfigError(f"distill.method: unknown method {method!r}; choose one of {', '.join(DISTILL_METHODS)}")
    return tuple(name for options in _LOSSES[method][1] for name in options.model_fields)


def build_distill_loss(method: str, **options: Any) -> nn.Module | None:
    """The distillation loss named `method` (one of DISTILL_METHODS) built with `options`; None for 'none'."""
    valid = distill_options(method)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        choices = ", ".join(valid) if valid else "none"
        raise ConfigError(f"distill.{unknown[0]}: unknown option for method {method!r}; valid options: {choices}")
    if method == "none":
        return None
    return _LOSSES[method][0](**options)
