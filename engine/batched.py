"""Local training of a whole cohort at once: the clients' adapters stacked, one batched step for all.

Each client's adapter parameters become one row of a stacked tensor ``[K, ...]``; a step runs the kind's
``stacked_forward`` (its layers as batched GEMMs over the rows), or, for a kind without one, its own
``forward`` under ``torch.vmap`` (``torch.func.functional_call`` with the row as the parameters; the same
numbers with more dispatch: 0.6 ms of a 3.7 ms step at K = 4 for attai), takes the gradient of the sum of
the clients' losses (client k's loss depends on row k only, so row k of the gradient is exactly its own
gradient) and applies Adam to the stack. The sequential path (``engine.training.train_locally``, one
client and one 32-row step at a time) spends ~2.7 ms a step in Python and dispatch for ~0.1 ms of
arithmetic; here that overhead is paid once per step for the cohort. A kind with a hand-written backward
(``stacked_backward``, engine.stacked_backward: autograd's kernels in autograd's order) skips autograd's graph
as well where the step has no local penalty: at K = 4 that takes a quickstart step from 2.0 to 1.75 ms.

What stays each client's own, so the results equal the sequential path's:

- its random stream: a client's batches are drawn from its own generator, in the same order (all epochs'
  permutations up front, which is what the sequential loop draws between its steps);
- its schedule: clients with fewer rows run out of batches earlier. At step s the clients that still have a
  batch are grouped by batch size (the last batch of an epoch is shorter) and each group is one vmap call,
  so no batch is padded and the in-batch contrastive loss sees exactly the sequential batch;
- its optimiser: ``StackedAdam`` gives torch's single-tensor Adam's bits (``torch.optim.adam._single_tensor_adam``,
  what ``torch.optim.Adam`` runs on the CPU: L2 decay added to the gradient, lerp for the first moment,
  mul/addcmul for the second, bias corrections from the client's own step count) on the stack's rows, in
  five passes over the stacks instead of eight (``StackedAdam._update`` says how); only clients that had a
  batch at a step take it. Its state goes in and out in ``torch.optim.Adam.state_dict()`` form, so both paths
  (and resume) share it. torch's fused CPU Adam alone would be faster still, but its exactly rounded square
  root differs from ``torch.sqrt`` in the last bit for about one element in 150, and fed back through twenty
  rounds that moves quickstart's accuracies by up to half a point, so it is not used for the step.

Measured on the reference CPU (tests/test_speed_paths.py): trained parameters, optimiser moments and
accuracies are bit for bit the sequential path's for every batchable kind, with FedProx's penalty and with
moments kept across rounds. The one difference is the *reported* loss value: the sequential
``F.cross_entropy`` reduces its mean with ATen's cascade sum, the vmapped one with a plain vectorised sum,
so a logged loss can differ in its last bit or two (relative ~1e-7). Gradients are not affected (they do
not depend on how the mean was summed). On another BLAS or on CUDA the batched matmuls may also sum in
another order; the tests hold both paths to 1e-5.

Only kinds whose forward is a pure function of (parameters, features) batch: ``BATCHABLE``. LoRA and
prompt learning run a CLIP encoder in the loop and stay sequential.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from engine.adapters.base import Adapter
from engine.losses import LOSSES
from engine.presets import TrainSection
from engine.stacked_backward import shared_classes_loss
from engine.training import NonFiniteLoss

State = dict[str, torch.Tensor]

BATCHABLE = frozenset({"attai", "clip_adapter", "text_adapter", "both", "linear_head"})
# The batched path wins from this many clients on. Measured (benchmarks/speed.py, CPU time of local training
# alone, 2-core Xeon, one thread, d = 128, 168 rows a client, batch 32), sequential / batched, attai with its
# hand-written backward: K=1 1.14x, K=2 2.05x, K=3 2.5x, K=4 2.8x, K=16 4.1x, K=64 5.4x. A client alone still
# trains sequentially: at K = 1 the gain is within this machine's noise, and the rule stays the one earlier
# runs were resumed under (the text-side kinds with the CE loss differ between the paths by ~1e-8).
MIN_COHORT = 2


def can_batch(adapter: Adapter) -> bool:
    """The kind's own class (a wrapper such as the random-subspace one reports its inner kind, and does not batch)."""
    return type(adapter).kind in BATCHABLE and not getattr(adapter.options, "subspace_dim", 0)


def choose_batched(adapter: Adapter, clients: int, mode: str = "auto") -> bool:
    """The batched path for a cohort of ``clients``? ``mode``: auto | batched | sequential.

    A fixed rule (kind and cohort size), never a timing, so a resumed run takes the path the
    uninterrupted run took."""
    if mode == "sequential" or not can_batch(adapter):
        return False
    if mode == "batched":
        return True
    if mode != "auto":
        raise ValueError(f"local training mode {mode!r}: auto, batched or sequential")
    return clients >= MIN_COHORT


class ClientNonFinite(NonFiniteLoss):
    """A client's loss became non-finite in the batched step; names the client like the sequential path would."""

    def __init__(self, client: str, message: str):
        super().__init__(message)
        self.client = client


@dataclass
class Job:
    """One client's local training: where it starts, its rows and epochs, its random stream and Adam state."""

    name: str
    start: State
    rows: np.ndarray
    epochs: int
    generator: torch.Generator
    optimizer_state: dict[str, Any] | None = None  # torch.optim.Adam.state_dict() form, or None for fresh moments
    labels: torch.Tensor | None = None  # this client's labels for every row (a label-flipping client's), or the run's


@dataclass
class JobResult:
    state: State
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    optimizer_state: dict[str, Any] | None = None
    finite: bool = True  # every trained parameter is finite

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")


def in_layout(stack: torch.Tensor, order: list[int] | None) -> torch.Tensor:
    """``stack`` with its dimensions laid out in memory in ``order`` (outermost first); same shape and values."""
    if order is None:
        return stack.contiguous()
    inverse = [order.index(i) for i in range(stack.dim())]
    return stack.permute(order).contiguous().permute(inverse)


# The layout each adapter's stacks ended up in (StackedAdam.adopt_layout), so the next round stacks into it directly.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class StackedAdam:
    """torch Adam (L2-coupled decay, no amsgrad) on stacked parameters ``{name: [K, ...]}``, one step count per row.

    The update gives torch's single-tensor Adam's bits in five passes over the stacks (``_update``)."""

    BLOCK = 64  # a multiple of every vector width the fused kernel is built for (8 floats with AVX2, 16 with AVX-512)

    def __init__(self, params: State, train: TrainSection):
        self.params = params
        self.lr, self.eps, self.decay = float(train.lr), float(train.eps), float(train.weight_decay)
        self.beta1, self.beta2 = (float(b) for b in train.betas)
        with torch.no_grad():
            self.exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
            self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
        rows = next(iter(params.values())).shape[0] if params else 0
        self.steps = np.zeros(rows, dtype=np.int64)
        self.started = np.zeros(rows, dtype=bool)  # has state, as torch's Adam after its first step or a load
        self._flat: _UpdatePlan | None = None  # flat views of the whole stacks (``_whole_stacks``)
        self._flat_names: list[str] = []

    def load(self, row: int, names: list[str], saved: dict[Any, dict[str, torch.Tensor]]) -> None:
        """Row ``row``'s moments from ``torch.optim.Adam.state_dict()["state"]`` (index i: ``names[i]``)."""
        if not saved:
            return
        with torch.no_grad():
            for index, name in enumerate(names):
                slots = saved[index]
                self.exp_avg[name][row].copy_(slots["exp_avg"])
                self.exp_avg_sq[name][row].copy_(slots["exp_avg_sq"])
        self.steps[row] = int(float(saved[0]["step"]))
        self.started[row] = True

    def saved(self, row: int, names: list[str]) -> dict[int, dict[str, torch.Tensor]]:
        if not self.started[row]:
            return {}
        step = torch.tensor(float(self.steps[row]), dtype=torch.float32)  # torch keeps it as a float32 tensor
        plain = torch.contiguous_format
        return {i: {"step": step.clone(), "exp_avg": self.exp_avg[n][row].clone(memory_format=plain),
                    "exp_avg_sq": self.exp_avg_sq[n][row].clone(memory_format=plain)} for i, n in enumerate(names)}

    @torch.no_grad()
    def adopt_layout(self, grads: State) -> dict[str, list[int]]:
        """Store each stack in the memory order its gradient comes in (a linear layer's weight gradient comes
        transposed under vmap), so the update reads every tensor front to back. Values are unchanged, and the
        forward sees the same numbers: only where they lie in memory moves. Returns {name: order} it changed."""
        changed = {}
        for name, grad in grads.items():
            param = self.params[name]
            if grad.dim() < 3 or grad.shape != param.shape or grad.stride() == param.stride():
                continue
            order = [0, *sorted(range(1, grad.dim()), key=lambda i: -grad.stride(i))]
            for stacks in (self.params, self.exp_avg, self.exp_avg_sq):
                stacks[name] = in_layout(stacks[name], order)
            changed[name] = order
        if changed:
            self._flat = None
        return changed

    @torch.no_grad()
    def step(self, rows: list[int], grads: State) -> None:
        """One Adam step for the clients in ``rows`` (distinct, increasing); ``grads[name]`` is ``[len(rows), ...]``
        in that order."""
        if len(rows) == len(self.steps):  # the whole cohort: rows is 0 .. K-1
            self.steps += 1
            self.started[:] = True
            counts = self.steps
            if counts.min() == counts.max():  # the common case: the whole cohort, in step
                self._update(int(counts[0]), grads, None)
                return
        else:
            self.steps[rows] += 1
            self.started[rows] = True
            counts = self.steps[rows]
        device = next(iter(grads.values())).device
        for count in np.unique(counts):  # a part of the cohort, or clients at different step counts
            picked = np.flatnonzero(counts == count)
            stack_rows = torch.as_tensor([rows[i] for i in picked], device=device)
            if len(picked) == len(rows):
                group = grads
            else:
                picked_rows = torch.as_tensor(picked, device=device)
                group = {n: g.index_select(0, picked_rows) for n, g in grads.items()}
            self._update(int(count), group, stack_rows)

    def _update(self, step: int, grads: State, rows: torch.Tensor | None) -> None:
        """One Adam step at ``step`` for every stack (``rows`` None) or for the given rows.

        Five elementwise passes where torch's single-tensor Adam makes eight: one for both moments, three for
        the denominator, one for the step. The moments come
        from torch's fused CPU Adam run with lr = 0 (its decay, lerp and second moment are the single-tensor
        operations, bit for bit; with lr = 0 it leaves the parameters as they were); the step itself is the
        single-tensor code, because the fused kernel takes an exactly rounded square root where
        ``torch.sqrt`` does not (about one element in 150 differs in its last bit) and that difference,
        fed back through training, moves accuracies. tests/test_speed_paths.py holds the result to
        ``torch.optim.Adam`` bit for bit."""
        bias_correction1 = 1 - self.beta1 ** float(step)
        bias_correction2 = 1 - self.beta2 ** float(step)
        step_size = self.lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        names = list(grads)
        if rows is None:
            plan = self._whole_stacks(names)
        else:
            picked = [(self.params[n].index_select(0, rows), self.exp_avg[n].index_select(0, rows),
                       self.exp_avg_sq[n].index_select(0, rows)) for n in names]
            plan = _UpdatePlan([_FlatStack.of(*tensors, self.BLOCK) for tensors in picked])
        stacks = plan.stacks
        g_flat = [stack.flat_gradient(grads[n]) for n, stack in zip(names, stacks)]
        p_flat, m_flat, v_flat = plan.param, plan.exp_avg, plan.exp_avg_sq
        # The fused kernel's scalar remainder loop (the last n mod 8 elements) rounds differently from its vector
        # body: it gets whole blocks of BLOCK elements, and the few left over take torch's own ops.
        step_counts = [torch.tensor(float(step))] * len(names)  # read, never changed, by the kernel
        torch._fused_adam_(plan.param_body, [g[: stack.body] for g, stack in zip(g_flat, stacks)], plan.exp_avg_body,
                           plan.exp_avg_sq_body, [], step_counts, lr=0.0, beta1=self.beta1,
                           beta2=self.beta2, weight_decay=self.decay, eps=self.eps, amsgrad=False, maximize=False)
        tails = plan.tails
        if tails:
            p_tail, g_tail, m_tail, v_tail = ([t[i][stacks[i].body :] for i in tails] for t in (p_flat, g_flat, m_flat, v_flat))
            if self.decay != 0:
                g_tail = torch._foreach_add(g_tail, p_tail, alpha=self.decay)
            torch._foreach_lerp_(m_tail, g_tail, 1 - self.beta1)
            torch._foreach_mul_(v_tail, self.beta2)
            torch._foreach_addcmul_(v_tail, g_tail, g_tail, value=1 - self.beta2)
        # (One addcdiv, eps + root / bias_correction2_sqrt, rounds the same as the division and the addition, but
        # with its two scalars broadcast it measured slower than the two in-place passes.)
        denom = plan.denominators()  # kept per stack: no 8 MB allocation a step at K = 64
        for root, second_moment in zip(denom, v_flat):
            torch.sqrt(second_moment, out=root)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(p_flat, m_flat, denom, value=-step_size)
        if rows is not None:
            for name, (param, exp_avg, exp_avg_sq) in zip(names, picked):
                self.params[name].index_copy_(0, rows, param)
                self.exp_avg[name].index_copy_(0, rows, exp_avg)
                self.exp_avg_sq[name].index_copy_(0, rows, exp_avg_sq)

    def _whole_stacks(self, names: list[str]) -> _UpdatePlan:
        """Flat views of the whole stacks, made once (``adopt_layout`` replaces the stacks and drops them)."""
        if self._flat is None or self._flat_names != names:
            self._flat_names = names
            self._flat = _UpdatePlan([_FlatStack.of(self.params[n], self.exp_avg[n], self.exp_avg_sq[n], self.BLOCK)
                                      for n in names])
        return self._flat


class _UpdatePlan:
    """The lists ``StackedAdam._update`` hands to torch for a set of flat stacks, built once per set: the whole
    stacks, the parts of them in whole BLOCKs (the fused kernel's), the stacks with a remainder, the
    denominators' room."""

    def __init__(self, stacks: list[_FlatStack]):
        self.stacks = stacks
        self.param, self.exp_avg, self.exp_avg_sq = ([getattr(s, slot) for s in stacks]
                                                     for slot in ("param", "exp_avg", "exp_avg_sq"))
        self.param_body, self.exp_avg_body, self.exp_avg_sq_body = ([t[: s.body] for t, s in zip(tensors, stacks)]
                                                                    for tensors in (self.param, self.exp_avg, self.exp_avg_sq))
        self.tails = [i for i, s in enumerate(stacks) if s.body < s.param.shape[0]]
        self._denominators: list[torch.Tensor] | None = None

    def denominators(self) -> list[torch.Tensor]:
        if self._denominators is None:
            self._denominators = [torch.empty_like(s.exp_avg_sq) for s in self.stacks]
        return self._denominators


@dataclass
class _FlatStack:
    """A parameter stack and its two moments as 1-d views in the parameter's memory order (element i of each the
    same entry), for an update that walks memory front to back; ``body``: the length in whole BLOCKs."""

    order: list[int]
    param: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    body: int

    @classmethod
    def of(cls, param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, block: int) -> _FlatStack:
        order = sorted(range(param.dim()), key=lambda i: -param.stride(i))
        views = []
        for tensor in (param, exp_avg, exp_avg_sq):  # updated in place: views, never copies
            permuted = tensor.permute(order)
            if not permuted.is_contiguous() or tensor.stride() != param.stride():
                raise ValueError(f"Adam state of shape {tuple(tensor.shape)} is not laid out like its parameter")
            views.append(permuted.view(-1))
        return cls(order, *views, param.numel() - param.numel() % block)

    def flat_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient as a 1-d view in the same order (copied into it if it lies otherwise)."""
        permuted = grad.permute(self.order)
        return (permuted if permuted.is_contiguous() else permuted.contiguous()).view(-1)


def adam_param_groups(train: TrainSection, count: int) -> list[dict[str, Any]]:
    """``engine.training.make_optimizer(...).state_dict()["param_groups"]`` for ``count`` tensors, without
    building a torch optimiser: that imports torch._dynamo (1.5 s) on first use. Tested equal to torch's."""
    return [{
        "lr": train.lr, "betas": tuple(train.betas), "eps": train.eps, "weight_decay": train.weight_decay,
        "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
        "fused": None, "decoupled_weight_decay": False, "params": list(range(count)),
    }]


def _batched_loss_function(adapter: Adapter, loss: str, scale: float, penalty):
    """(params [G, ...], x [G, B, ...], y [G, B]) -> (loss + penalty [G], loss [G]) for a group of clients.

    The adapter's forward runs under vmap; the two built-in losses are then computed on the batch of clients
    with the very operations ``engine.losses`` does per client (log-softmax over each row, the label's entry,
    its mean), where vmapping ``F.cross_entropy`` would go through a Python decomposition that is slower and
    imports sympy (0.8 s). Any other loss is vmapped as it is."""
    from torch.func import functional_call  # no torch._dynamo: vmap + autograd only (torch.func.grad imports it)

    def forward(row: dict[str, torch.Tensor], x: torch.Tensor):
        scores = functional_call(adapter, row, (x,))
        return (scores.image, scores.classes) + (() if scores.bias is None else (scores.bias,))

    def extra(row: dict[str, torch.Tensor]):
        value = penalty(row)
        return torch.zeros(()) if value is None else value

    def stacked(params: dict[str, torch.Tensor], x: torch.Tensor):
        scores = adapter.stacked_forward(params, x)
        return (scores.image, scores.classes) + (() if scores.bias is None else (scores.bias,))

    # A kind's own stacked forward is plain batched GEMMs; vmap reaches the same products with more dispatch.
    forward_all = stacked if adapter.has_stacked_forward() else torch.vmap(forward)
    penalty_all = torch.vmap(extra)
    own = {n: p for n, p in adapter.named_parameters() if p.requires_grad}
    has_penalty = penalty(own) is not None  # FedProx with mu > 0; None for every other rule

    if loss not in ("contrastive", "ce"):
        loss_fn = LOSSES[loss]

        def vmapped(row, x, y):
            plain = loss_fn(functional_call(adapter, row, (x,)), y, scale)
            value = penalty(row)
            return (plain if value is None else plain + value), plain

        return torch.vmap(vmapped)

    def mean_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """F.cross_entropy(logits[g], target[g]) for each g: log-softmax over the last dim, mean of -log p."""
        picked = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (-picked).mean(dim=-1)

    def batched(params, x, y):
        image, classes, *bias = forward_all(params, x)
        groups = torch.arange(len(y), device=y.device).unsqueeze(1)
        if loss == "contrastive":  # engine.losses.contrastive_loss
            # A class table the clients share (a frozen buffer) comes out of vmap expanded: index it once.
            picked = classes[0][y] if classes.stride(0) == 0 else classes[groups, y]
            logits = scale * image @ picked.transpose(1, 2)
            if bias:
                logits = logits + bias[0][groups, y].unsqueeze(1)
            target = torch.arange(y.shape[1], device=y.device).expand_as(y)
            plain = (mean_nll(logits, target) + mean_nll(logits.transpose(1, 2), target)) / 2
        else:  # engine.losses.class_cross_entropy: ClassScores.logits, then cross-entropy against the labels
            logits = scale * image @ classes.transpose(1, 2)
            if bias:
                logits = logits + bias[0].unsqueeze(1)
            plain = mean_nll(logits, y)
        return (plain + penalty_all(params) if has_penalty else plain), plain

    return batched


def _hand_written_gradients(adapter: Adapter, loss: str, penalty):
    """The kind's ``stacked_backward`` where engine.stacked_backward covers the step (a built-in loss against
    the shared frozen class table, no local penalty); None: autograd takes the step."""
    if not adapter.has_stacked_backward() or loss not in ("contrastive", "ce"):
        return None
    if penalty({n: p for n, p in adapter.named_parameters() if p.requires_grad}) is not None:
        return None
    return adapter.stacked_backward


def _stop_unless_finite(totals: list[float], members: list[int], jobs: list[Job], step: int, lengths: list[int]) -> None:
    """ClientNonFinite for the first member whose loss at this step is inf or NaN (``totals``: the group's losses
    as Python floats, which the step reads anyway; torch.isfinite would add four operations a step)."""
    for position, value in enumerate(totals):
        if not math.isfinite(value):
            bad = members[position]
            raise ClientNonFinite(jobs[bad].name, f"loss {value} at step {step + 1} of {lengths[bad]}")


def _stack_starts(starts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(starts)``; when every client starts from the very same tensor (the global adapter, no
    personal layers) a broadcast view of it, which ``in_layout`` then copies once instead of twice (the copy
    matters: the stacks are trained in place)."""
    first = starts[0]
    if len(starts) > 1 and all(t is first for t in starts):  # stride 0: never contiguous, so always copied
        return first.unsqueeze(0).expand(len(starts), *first.shape)
    return torch.stack(starts)


def _finite_rows(stacks: State, rows: int) -> list[bool]:
    """For each row: every entry of every stack finite? A finite sum of a stack has no inf or NaN in it (either
    would make the sum inf or NaN), so the common case costs one reduction a stack; a sum that is not finite
    (a non-finite entry, or finite ones overflowing) is settled row by row."""
    if all(bool(torch.isfinite(stack.sum())) for stack in stacks.values()):
        return [True] * rows
    per_stack = [torch.isfinite(stack).reshape(rows, -1).all(1) for stack in stacks.values()]  # not empty here
    return torch.stack(per_stack).all(0).tolist()


def batch_schedule(rows: np.ndarray, batch: int, epochs: int, generator: torch.Generator) -> list[np.ndarray]:
    """The batches ``train_locally`` would train on, in order: a shuffle per epoch, batches of one skipped."""
    chunks = []
    for _ in range(epochs):
        order = rows[torch.randperm(len(rows), generator=generator).numpy()]
        chunks.extend(c for c in (order[s : s + batch] for s in range(0, len(order), batch)) if len(c) >= 2)
    return chunks


def train_cohort(
    adapter: Adapter,
    jobs: list[Job],
    inputs: Callable[[np.ndarray], torch.Tensor],
    labels: torch.Tensor,
    train: TrainSection,
    scale: float,
    param_groups: list[dict[str, Any]],
    penalty: Callable[[dict[str, torch.Tensor]], torch.Tensor | None] = lambda params: None,
    keep_optimizer: bool = False,
    checkpoint: Callable[[], None] = lambda: None,
    on_step: Callable[[str, int, int, float], None] = lambda client, step, steps, loss: None,
) -> list[JobResult]:
    """Train every job's client together; ``JobResult`` per job, in order.

    ``penalty(params)`` is the strategy's local term for one client's parameters (called under vmap);
    ``param_groups`` is what ``torch.optim.Adam(...).state_dict()["param_groups"]`` holds for this adapter,
    returned with the moments when ``keep_optimizer``. ``on_step(client, step, steps, loss)`` after each step.
    """
    from torch.func import functional_call  # no torch._dynamo: vmap + autograd only (torch.func.grad imports it)

    started = time.perf_counter()
    loss_fn = LOSSES[train.loss]
    names = [n for n, p in adapter.named_parameters() if p.requires_grad]
    schedules = [batch_schedule(job.rows, train.batch_size, job.epochs, job.generator) for job in jobs]
    lengths = [len(s) for s in schedules]

    like = {n: p for n, p in adapter.named_parameters() if p.requires_grad}
    layouts = _LAYOUTS.setdefault(adapter, {})
    with torch.no_grad():
        params = {n: in_layout(_stack_starts([job.start[n] for job in jobs]).to(like[n].device, like[n].dtype),
                               layouts.get(n)) for n in names}
    optimizer = StackedAdam(params, train)
    for k, job in enumerate(jobs):
        optimizer.load(k, names, job.optimizer_state.get("state", {}) if job.optimizer_state else {})

    by_hand = _hand_written_gradients(adapter, train.loss, penalty)
    batched_loss = _batched_loss_function(adapter, train.loss, scale, penalty) if by_hand is None else None
    losses: list[list[float]] = [[] for _ in jobs]
    was_training = adapter.training
    adapter.train()
    for s in range(max(lengths, default=0)):
        active = [k for k in range(len(jobs)) if s < lengths[k]]
        by_size: dict[int, list[int]] = {}
        for k in active:
            by_size.setdefault(len(schedules[k][s]), []).append(k)
        for size, members in by_size.items():
            checkpoint()
            rows = np.concatenate([schedules[k][s] for k in members])
            x = inputs(rows)
            x = x.reshape(len(members), size, *x.shape[1:])
            device = x.device
            own = [jobs[k].labels for k in members]
            if all(t is None for t in own):  # index_select: indexing with a NumPy array takes a slower path
                y = labels.index_select(0, torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(labels.device))
            else:
                y = torch.cat([(labels if t is None else t)[schedules[k][s]] for k, t in zip(members, own)])
            y = y.to(device).reshape(len(members), size)
            whole = len(members) == len(jobs)
            index = None if whole else torch.as_tensor(members, device=device)
            group = {n: params[n] if whole else params[n].index_select(0, index) for n in names}
            if by_hand is not None:
                with torch.no_grad():
                    scores, backward = by_hand(group, x)
                    plain, grad_image = shared_classes_loss(scores.image, scores.classes, y, train.loss, scale)
                    values = plain.tolist()  # the losses are the totals here: checked as Python floats
                    _stop_unless_finite(values, members, jobs, s, lengths)
                    found = backward(grad_image)
                grads = [found[n] for n in names]
            else:
                leaves = {n: t.detach().requires_grad_() for n, t in group.items()}
                totals, plain = batched_loss(leaves, x, y)
                _stop_unless_finite(totals.detach().tolist(), members, jobs, s, lengths)
                grads = torch.autograd.grad(totals.sum(), [leaves[n] for n in names])
                values = plain.detach().tolist()
                del leaves, totals
            del group
            if s == 0 and whole:
                layouts.update(optimizer.adopt_layout(dict(zip(names, grads))))
            optimizer.step(members, dict(zip(names, grads)))
            for k, value in zip(members, values):
                losses[k].append(value)
                on_step(jobs[k].name, len(losses[k]), lengths[k], value)
    adapter.train(was_training)

    seconds = time.perf_counter() - started
    total_steps = max(sum(lengths), 1)
    results = []
    with torch.no_grad():
        finite = _finite_rows(params, len(jobs))
        # Each stack once in plain row-major order; a client's state is then its row, a contiguous view.
        row_major = {n: params[n].contiguous() for n in names}
    for k, job in enumerate(jobs):
        state = {n: row_major[n][k] for n in names}
        optimizer_state = {"state": optimizer.saved(k, names), "param_groups": param_groups} if keep_optimizer else None
        results.append(JobResult(state, losses[k], seconds * lengths[k] / total_steps, optimizer_state, finite[k]))
    return results


