"""Activation second moments and the calibrated closest safe update (docs/design.md §5c).

Pure tensor math: it imports torch, :mod:`csulora.types` and :mod:`csulora.errors` only, so
the collector (``csulora calibrate``), the statistics file (``io/calibration_file.py``), the
calibrated method and the full fine-tune path all share one implementation.

Per module, with inputs' normalised Grams ``S_h`` (harmful) and ``S_t`` (task), the
corrected factor is

    A' = A (S_t + mu I) (S_t + mu I + lam S_h)^-1

(:class:`CalibratedSolve`), the argmin of ``||B (A' - A)||^2_{S_t + mu I} + lam ||B A'||^2_{S_h}``
with ``||M||^2_S = tr(M S M^T)``. The same operator applied to a dense update
(:func:`calibrated_dense_update`) is the full fine-tune form of §5c/§5d.

Storage forms (:class:`~csulora.types.SecondMoment`): dense (n x n) when
``n <= dense_max_n``, else spiked, ``U diag(L) U^T + sigma2 (I - U U^T)`` with the top q
eigenpairs and the mean of the remaining eigenvalues. The spiked solve uses the
push-through Woodbury identity and never builds an n x n matrix. How q is chosen is
documented on :func:`calibration_moments`.

Everything is computed in float64 on the device of the inputs (CPU in tests; the collector
may hand GPU tensors to the builders). Errors are ``ValueError``: this module knows no
file names; callers turn them into one-line InputErrors naming the file. One exception: a
solve whose statistics are not positive semi-definite is an InputError naming the group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from csulora.errors import InputError
from csulora.types import ModuleCalibration, SecondMoment

# Dense storage up to this input size: 4096 x 4096 float32 is 64 MiB per Gram (a 7B
# attention input); above it (11008 for a 7B down_proj) the spiked form is used.
DENSE_MAX_N = 4096
DEFAULT_MU = 0.01  # the calibrated method's default mu (docs/design.md §5c)
# The strengths the spiked rank is validated at: the calibrated method's tune grid without
# its identity setting 0 (tests/test_gram.py checks they agree; this module cannot import
# the method, which sits a layer above).
PROBE_STRENGTHS: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
SPIKED_TOLERANCE = 1e-3  # relative error on activations allowed for the spiked form
PROBE_ROWS = 32  # rows of the random probe factor the spiked form is validated on
# Rows of a dense update solved at a time in calibrated_dense_update: bounded temporaries.
_ROW_BLOCK = 4096


# -- building the statistics ----------------------------------------------------------------------
def normalised_gram(gram_sum: Tensor, tokens: int, *, name: str = "Gram") -> Tensor:
    """``S = (sum x x^T / tokens) / (tr / n)``: float64, symmetric, mean eigenvalue 1.

    The division by the token count cancels in the normalisation; it is kept so the
    intermediate is the second moment the design talks about. ValueError for no tokens,
    a non-square or non-finite sum, or a zero trace (no signal to normalise).
    """
    if tokens <= 0:
        raise ValueError(f"{name}: accumulated over {tokens} tokens; need at least one")
    if gram_sum.ndim != 2 or gram_sum.shape[0] != gram_sum.shape[1]:
        raise ValueError(f"{name}: expected a square matrix, got shape {list(gram_sum.shape)}")
    S = gram_sum.detach().to(torch.float64) / tokens
    S = (S + S.T) / 2  # accumulated sums are symmetric up to rounding; make it exact
    if not bool(torch.isfinite(S).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    n = S.shape[0]
    mean_eigenvalue = float(torch.trace(S)) / n
    if not mean_eigenvalue > 0.0:
        raise ValueError(f"{name}: trace is {mean_eigenvalue * n}; the inputs carry no signal")
    return S / mean_eigenvalue


def dense_moment(gram_sum: Tensor, tokens: int, *, name: str = "Gram") -> SecondMoment:
    """The dense :class:`SecondMoment` of an accumulated Gram sum (float64 n x n)."""
    S = normalised_gram(gram_sum, tokens, name=name)
    return SecondMoment(n=int(S.shape[0]), matrix=S, tokens=int(tokens))


@dataclass(frozen=True)
class Eigen:
    """Eigenpairs of a normalised Gram, largest first; signs pinned for reproducible bytes."""

    values: Tensor  # n, descending, clamped at 0 (a Gram is PSD; negatives are rounding)
    vectors: Tensor  # n x n, orthonormal columns

    @classmethod
    def of(cls, S: Tensor) -> Eigen:
        values, vectors = torch.linalg.eigh(S)
        values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
        pivot = vectors.abs().argmax(dim=0)
        signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1], device=vectors.device)])
        signs[signs == 0] = 1.0
        return cls(values=values, vectors=vectors * signs)

    def spiked(self, rank: int, tokens: int) -> SecondMoment:
        """Top ``rank`` pairs plus ``sigma2`` = the mean of the other eigenvalues."""
        n = int(self.values.shape[0])
        if not 0 <= rank < n:
            raise ValueError(f"spiked rank must be in [0, {n - 1}], got {rank}")
        L = self.values[:rank].clone()
        sigma2 = max(float(self.values[rank:].sum()) / (n - rank), 0.0)
        return SecondMoment(n=n, U=self.vectors[:, :rank].clone(), L=L, sigma2=sigma2, tokens=int(tokens))


def spiked_moment(gram_sum: Tensor, tokens: int, rank: int, *, name: str = "Gram") -> SecondMoment:
    """The spiked :class:`SecondMoment` of rank ``rank`` (one n x n eigendecomposition)."""
    return Eigen.of(normalised_gram(gram_sum, tokens, name=name)).spiked(rank, tokens)


def calibration_moments(
    group: str,
    harmful_sum: Tensor,
    harmful_tokens: int,
    task_sum: Tensor,
    task_tokens: int,
    *,
    dense_max_n: int = DENSE_MAX_N,
    mu: float = DEFAULT_MU,
    strengths: Sequence[float] = PROBE_STRENGTHS,
    tolerance: float = SPIKED_TOLERANCE,
    probe_rows: int = PROBE_ROWS,
    seed: int = 0,
) -> ModuleCalibration:
    """Both statistics of one Gram group, from accumulated float64 sums and token counts.

    Dense when ``n <= dense_max_n``. Above it, the spiked form with the **smallest rank q
    found to keep the correction within ``tolerance`` of the dense solve on activations**:

        err(q) = max over lam in ``strengths`` of
                 ||(A'_q - A'_dense) X|| / ||A'_dense X||

    where ``X`` holds the calibration activations of both sets (so ``||M X||^2`` is
    ``tr(M (S_h + S_t) M^T)`` with the exact, dense normalised Grams — the two sets weigh
    alike because each has mean eigenvalue 1), ``A`` is a fixed random Gaussian probe
    factor of ``probe_rows`` rows (isotropic, so the tail directions the spiked form
    approximates weigh as much as the head; with ``B = I``, the adapter's B only mixes
    rows), ``A'_q`` the Woodbury solve with both Grams spiked at rank q and ``A'_dense``
    the Cholesky solve, at ``mu``. The strengths default to the calibrated method's tune
    grid, so every setting ``tune`` tries is covered; a smaller ``mu`` at correction time
    is not covered by the check.

    Search: q = q0, 2 q0, 4 q0, ... (q0 = min(64, max(1, n // 16))) until err(q) <=
    tolerance, then bisection between the last failing and the first passing q until the
    bracket is within an eighth of q; the smallest passing q found is used (the same q
    for both Grams). Ranks reach at most n/2: if none of those passes, spiked storage
    saves little and the group is stored dense (exact). Cost: one eigendecomposition per
    Gram, one Cholesky per strength, and probe solves of O(probe_rows n q) per trial.
    """
    S_h = normalised_gram(harmful_sum, harmful_tokens, name=f"{group}: harmful Gram")
    S_t = normalised_gram(task_sum, task_tokens, name=f"{group}: task Gram")
    n = int(S_h.shape[0])
    if S_t.shape != S_h.shape:
        raise ValueError(f"{group}: harmful Gram is {n} x {n} but task Gram is {list(S_t.shape)}")
    dense = ModuleCalibration(
        group=group,
        harmful=SecondMoment(n=n, matrix=S_h, tokens=int(harmful_tokens)),
        task=SecondMoment(n=n, matrix=S_t, tokens=int(task_tokens)),
    )
    if n <= dense_max_n:
        return dense
    rank = choose_spiked_rank(dense, mu=mu, strengths=strengths, tolerance=tolerance, probe_rows=probe_rows, seed=seed)
    if rank is None:
        return dense
    return ModuleCalibration(
        group=group,
        harmful=Eigen.of(S_h).spiked(rank, harmful_tokens),
        task=Eigen.of(S_t).spiked(rank, task_tokens),
    )


def choose_spiked_rank(
    dense: ModuleCalibration,
    *,
    mu: float = DEFAULT_MU,
    strengths: Sequence[float] = PROBE_STRENGTHS,
    tolerance: float = SPIKED_TOLERANCE,
    probe_rows: int = PROBE_ROWS,
    seed: int = 0,
) -> int | None:
    """The spiked rank rule of :func:`calibration_moments` on dense statistics; None: stay dense."""
    n = dense.n
    S_h, S_t = moment_matrix(dense.harmful), moment_matrix(dense.task)
    eig_h, eig_t = Eigen.of(S_h), Eigen.of(S_t)
    probe = _probe_factor(probe_rows, n, seed, S_h.device)
    pooled = S_h + S_t
    references = {lam: solve.apply(probe) for lam, solve in CalibratedSolve.at_strengths(dense, strengths, mu).items()}

    def passes(q: int) -> bool:
        spiked = ModuleCalibration(
            group=dense.group,
            harmful=eig_h.spiked(q, dense.harmful.tokens),
            task=eig_t.spiked(q, dense.task.tokens),
        )
        solves = CalibratedSolve.at_strengths(spiked, list(references), mu)
        errors = (relative_error(solves[lam].apply(probe), ref, pooled) for lam, ref in references.items())
        return max(errors, default=0.0) <= tolerance

    return smallest_passing_rank(n, passes)


def smallest_passing_rank(n: int, passes: Callable[[int], bool]) -> int | None:
    """The search of :func:`calibration_moments`: q = q0, 2 q0, 4 q0, ... (q0 = min(64, max(1, n // 16)))
    until ``passes(q)``, then bisection down to within an eighth of q; at most n/2, else None."""
    cap = n // 2
    q, failed = min(64, max(1, n // 16)), 0
    while q <= cap and not passes(q):
        failed, q = q, 2 * q
    if q > cap:
        if failed < cap and passes(cap):
            q = cap
        else:
            return None
    while q - failed > max(1, q // 8):  # bisect down: the file holds n x q per Gram
        middle = (q + failed) // 2
        if passes(middle):
            q = middle
        else:
            failed = middle
    return q


def update_moment(
    group: str,
    gram_sum: Tensor,
    tokens: int,
    *,
    dense_max_n: int = DENSE_MAX_N,
    tolerance: float = SPIKED_TOLERANCE,
    probe_rows: int = PROBE_ROWS,
    seed: int = 0,
) -> SecondMoment:
    """The one second moment of the fine-tuned model's statistics (Antidote's; no task set).

    Dense when ``n <= dense_max_n``. Above it, spiked at the smallest rank (the search of
    :func:`smallest_passing_rank`) that keeps **what Antidote reads** within ``tolerance``:
    each input's mean square ``diag(S)`` (its scores for ``lora_A`` and full weights) and the
    quadratic forms ``a^T S a`` of the rows ``a`` of a fixed random Gaussian probe (``lora_B``
    reads ``A x``, scored with ``diag(A S A^T)``; the probe is isotropic, as the adapter's A is
    unknown here), each as its largest error over the mean of its entries (an input no token
    reaches has ``S_jj = 0``: a relative error per entry would never pass). Dense when no rank
    up to n/2 passes.
    """
    S = normalised_gram(gram_sum, tokens, name=f"{group}: harmful Gram")
    n = int(S.shape[0])
    if n <= dense_max_n:
        return SecondMoment(n=n, matrix=S, tokens=int(tokens))
    eigen = Eigen.of(S)
    probe = _probe_factor(probe_rows, n, seed, S.device)
    exact = (S.diagonal(), ((probe @ S) * probe).sum(1))

    def passes(q: int) -> bool:
        spiked = eigen.spiked(q, tokens)
        approx = (moment_diagonal(spiked), row_gram(probe, spiked).diagonal())
        return all(float((a - e).abs().max()) <= tolerance * float(e.mean()) for a, e in zip(approx, exact))

    rank = smallest_passing_rank(n, passes)
    return SecondMoment(n=n, matrix=S, tokens=int(tokens)) if rank is None else eigen.spiked(rank, tokens)


def _probe_factor(rows: int, n: int, seed: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=generator, dtype=torch.float64).to(device)


def relative_error(approx: Tensor, exact: Tensor, S: Tensor) -> float:
    """``||approx - exact||_S / ||exact||_S`` with ``||M||^2_S = tr(M S M^T)`` (dense S)."""
    diff = approx - exact
    num = float(((diff @ S) * diff).sum())
    den = float(((exact @ S) * exact).sum())
    if den <= 0.0:
        return 0.0 if num <= 0.0 else float("inf")
    return max(num, 0.0) ** 0.5 / den**0.5


def moment_matrix(moment: SecondMoment) -> Tensor:
    """The n x n matrix of a moment (builds it for the spiked form: dense paths only)."""
    if moment.matrix is not None:
        S = moment.matrix.to(torch.float64)
        return (S + S.T) / 2
    U, L = _spikes(moment)
    eye = torch.eye(moment.n, dtype=torch.float64, device=U.device)
    return (U * (L - moment.sigma2)) @ U.T + moment.sigma2 * eye


def _symmetric_copy(moment: SecondMoment) -> Tensor:
    """A new float64 ``(S + S^T)/2`` (moment_matrix's value) with one n x n allocation: a 7B
    group's n x n temporaries are 134 MB each, and a full fine-tune's memory bound allows one
    group's statistics and its factorisation, not their copies (docs/design.md §5d)."""
    if moment.matrix is None:
        return moment_matrix(moment)  # the spiked form's matrix is built fresh anyway
    out = moment.matrix.to(torch.float64, copy=True)
    return out.add_(moment.matrix.T).mul_(0.5)


def _spikes(moment: SecondMoment) -> tuple[Tensor, Tensor]:
    assert moment.U is not None and moment.L is not None
    return moment.U.to(torch.float64), moment.L.to(torch.float64)


# -- the closed form ------------------------------------------------------------------------------
class CalibratedSolve:
    """``A -> A (S_t + mu I)(S_t + mu I + lam S_h)^-1`` for one group, lam and mu, factorised once.

    Build it once per (group, lam, mu) and apply it to every module of the group (q/k/v
    share one): the n x n Cholesky factorisation (dense) or the small Woodbury system
    (spiked) is the expensive part; each application costs O(r n^2) (dense) or O(r n q)
    (spiked). ``lam`` must be >= 0 and ``mu`` > 0, which makes the matrix inverted
    symmetric positive definite.
    """

    def __init__(
        self, calibration: ModuleCalibration, strength: float, mu: float, *, W_gram: Tensor | None = None
    ) -> None:
        if not strength >= 0.0 or not mu > 0.0:
            raise ValueError(f"need strength >= 0 and mu > 0, got strength {strength}, mu {mu}")
        harmful, task = calibration.harmful, calibration.task
        if harmful.n != task.n:
            raise ValueError(f"{calibration.group}: harmful n = {harmful.n} but task n = {task.n}")
        self.group = calibration.group
        self.n = harmful.n
        self.strength = float(strength)
        self.mu = float(mu)
        self.is_spiked = not (harmful.is_dense or task.is_dense)
        if self.is_spiked:
            self._factor_spiked(harmful, task, W_gram)
        else:
            self._factor_dense(harmful, task)

    @classmethod
    def build(cls, calibration: ModuleCalibration, strength: float, mu: float) -> CalibratedSolve:
        return cls(calibration, strength, mu)

    @classmethod
    def at_strengths(
        cls, calibration: ModuleCalibration, strengths: Sequence[float], mu: float
    ) -> dict[float, CalibratedSolve]:
        """One solve per strength; the spiked ``W^T W`` (O(n q^2), independent of lam) is formed once."""
        W_gram = None
        if not (calibration.harmful.is_dense or calibration.task.is_dense):
            W = torch.cat([_spikes(calibration.task)[0], _spikes(calibration.harmful)[0]], dim=1)
            W_gram = W.T @ W
        return {float(lam): cls(calibration, lam, mu, W_gram=W_gram) for lam in strengths}

    # -- dense: one Cholesky factorisation -------------------------------------------------------
    def _factor_dense(self, harmful: SecondMoment, task: SecondMoment) -> None:
        # At most three n x n matrices at once (T, the system, its factor): no symmetrised
        # copies of the statistics beside them.
        self._T = _symmetric_copy(task)
        self._T.diagonal().add_(self.mu)  # S_t + mu I, without an n x n identity beside it
        system = _symmetric_copy(harmful).mul_(self.strength).add_(self._T)
        chol, info = torch.linalg.cholesky_ex(system)
        del system
        if int(info) != 0:
            # Bad statistics, not a bug: they came from a file (io/calibration_file.py checks what is
            # cheap to check; this is the rest), so one line naming the group, never a traceback.
            raise InputError(
                f"statistics of group {self.group}: S_t + mu I + lam S_h (lam {self.strength:g}, mu {self.mu:g}) "
                "is not positive definite, so the Grams are not positive semi-definite; recalibrate with "
                "`csulora calibrate`"
            )
        self._chol = chol

    def _apply_dense(self, A: Tensor) -> Tensor:
        # A' = A T M^-1  <=>  A'^T = M^-1 T A^T  (T and M symmetric)
        return torch.cholesky_solve((A @ self._T).T, self._chol).T

    # -- spiked: Woodbury on the combined low-rank part ------------------------------------------
    def _factor_spiked(self, harmful: SecondMoment, task: SecondMoment, W_gram: Tensor | None) -> None:
        """``S_t + mu I + lam S_h = c I + W C W^T``, c = sigma_t^2 + mu + lam sigma_h^2,
        ``W = [U_t | U_h]``, ``C = diag(L_t - sigma_t^2, lam (L_h - sigma_h^2))`` (docs/design.md §5c).

        Only the (q_t + q_h)-square system ``K = c I + C W^T W`` is factorised (LU: K is not
        symmetric, but similar to ``c I + C^1/2 W^T W C^1/2``, so its eigenvalues are >= c > 0).
        ``W_gram``: ``W^T W`` when the caller already has it.
        """
        U_t, L_t = _spikes(task)
        U_h, L_h = _spikes(harmful)
        self._U_t, self._d_t = U_t, L_t - task.sigma2
        self._t_shift = task.sigma2 + self.mu  # T = U_t diag(d_t) U_t^T + t_shift I
        self._c = self._t_shift + self.strength * harmful.sigma2
        self._W = torch.cat([U_t, U_h], dim=1)
        self._C = torch.cat([self._d_t, self.strength * (L_h - harmful.sigma2)])
        K = self._c * torch.eye(self._W.shape[1], dtype=torch.float64, device=U_t.device)
        K = K + self._C[:, None] * (self._W.T @ self._W if W_gram is None else W_gram)
        self._lu = torch.linalg.lu_factor(K)

    def _apply_spiked(self, A: Tensor) -> Tensor:
        # (c I + W C W^T)^-1 = (1/c) [I - W (c I + C W^T W)^-1 C W^T], applied from the right:
        # A' = (1/c) [Y - ((Y W) K^-1 C) W^T] with Y = A T; every product is r x (n or q).
        Y = ((A @ self._U_t) * self._d_t) @ self._U_t.T + self._t_shift * A
        if self._W.shape[1] == 0:
            return Y / self._c
        Z = torch.linalg.lu_solve(*self._lu, Y @ self._W, left=False)
        return (Y - (Z * self._C) @ self._W.T) / self._c

    def apply(self, A: Tensor) -> Tensor:
        """The corrected factor for ``A`` (rows x n, any number of rows), float64."""
        if A.ndim != 2 or A.shape[1] != self.n:
            raise ValueError(f"{self.group}: statistics are for n = {self.n}, got a factor of shape {list(A.shape)}")
        A = A.to(dtype=torch.float64, device=self._device)
        return self._apply_spiked(A) if self.is_spiked else self._apply_dense(A)

    @property
    def _device(self) -> torch.device:
        return self._W.device if self.is_spiked else self._chol.device


def calibrated_factor(A: Tensor, calibration: ModuleCalibration, strength: float, mu: float = DEFAULT_MU) -> Tensor:
    """``A (S_t + mu I)(S_t + mu I + lam S_h)^-1`` for one factor (builds a one-off solve).

    ``strength == 0`` returns ``A`` itself (the identity; no solve). Use
    :class:`CalibratedSolve` directly to share the factorisation across a group.
    """
    if strength == 0.0:
        return A
    return CalibratedSolve(calibration, strength, mu).apply(A)


def calibrated_dense_update(
    dW: Tensor, calibration: ModuleCalibration, strength: float, mu: float = DEFAULT_MU,
    *, solve: CalibratedSolve | None = None, block_rows: int = _ROW_BLOCK,
) -> Tensor:
    """The full fine-tune form ``dW (S_t + mu I)(S_t + mu I + lam S_h)^-1`` (docs/design.md §5c, §5d).

    ``dW`` is m x n (any block of rows of an update); solved ``block_rows`` rows at a time
    so temporaries stay bounded; float64 result. Pass ``solve`` to reuse a factorisation
    across the modules of a group. ``strength == 0`` returns ``dW`` itself.
    """
    if strength == 0.0:
        return dW
    solve = solve or CalibratedSolve(calibration, strength, mu)
    return torch.cat([solve.apply(dW[i : i + block_rows]) for i in range(0, dW.shape[0], block_rows)], dim=0)


# -- how much of the update's action is kept ------------------------------------------------------
def row_gram(A: Tensor, moment: SecondMoment) -> Tensor:
    """``A S A^T`` (r x r) without an n x n product for the spiked form."""
    A = A.to(torch.float64)
    if moment.matrix is not None:
        return A @ moment_matrix(moment).to(A.device) @ A.T
    U, L = _spikes(moment)
    AU = A @ U.to(A.device)
    return (AU * (L.to(A.device) - moment.sigma2)) @ AU.T + moment.sigma2 * (A @ A.T)


def moment_diagonal(moment: SecondMoment) -> Tensor:
    """``diag(S)`` (n, float64): each input's mean square, without building S for the spiked form."""
    if moment.matrix is not None:
        return moment.matrix.diagonal().to(torch.float64).clone()
    U, L = _spikes(moment)
    return (U.square() * (L - moment.sigma2)).sum(1) + moment.sigma2


def action_norm_sq(B: Tensor, A: Tensor, moment: SecondMoment) -> float:
    """``||B A||^2_S = tr(B A S A^T B^T) = sum((B^T B) * (A S A^T))`` from r x r Grams; >= 0."""
    B = B.to(torch.float64)
    return max(float(((B.T @ B) * row_gram(A, moment).to(B.device)).sum()), 0.0)


def rows_action_norm_sq(X: Tensor, moment: SecondMoment) -> float:
    """``||X||^2_S = tr(X S X^T)`` of a block of rows of a dense update (docs/design.md §5d).

    ``sum((X S) * X)`` for the dense form, ``sum((X U)^2 (L - sigma2)) + sigma2 ||X||^2`` for
    the spiked one: no rows x rows matrix, float64; >= 0.
    """
    X = X.to(torch.float64)
    if moment.matrix is not None:
        # x^T S x = x^T ((S + S^T)/2) x: the stored matrix itself, no n x n copy per block
        S = moment.matrix.to(device=X.device, dtype=torch.float64)
        return max(float(((X @ S) * X).sum()), 0.0)
    U, L = _spikes(moment)
    XU = X @ U.to(X.device)
    return max(float((XU.square() * (L.to(X.device) - moment.sigma2)).sum()) + moment.sigma2 * float(X.square().sum()), 0.0)


def action_kept(B: Tensor, A: Tensor, A_new: Tensor, moment: SecondMoment) -> float | None:
    """``||B A'||^2_S / ||B A||^2_S``: the share of the update's action on these inputs kept.

    None when the update does nothing on them (``||B A||_S = 0``).
    """
    before = action_norm_sq(B, A, moment)
    if before <= 0.0:
        return None
    return action_norm_sq(B, A_new, moment) / before


def isotropic_kept(calibration: ModuleCalibration, strength: float, mu: float = DEFAULT_MU) -> tuple[float, float]:
    """The group's **separability** at ``strength`` (issue 24): for an update that acts equally on
    every input direction (``A = I``), the share of its action the calibrated correction keeps on
    task inputs and on harmful inputs, ``tr(C S C^T) / tr(S)`` with
    ``C = (S_t + mu I)(S_t + mu I + lam S_h)^-1`` and each ``S`` normalised as stored (§5c).

    Update-independent: it reads the statistics alone, so it says before any adapter exists how
    well the calibrated correction can keep a task apart from harm on this model. Returns
    ``(task_kept, harmful_kept)``; a task that sits next to harm keeps little of both.
    """
    solve = CalibratedSolve(calibration, strength, mu)
    C = solve.apply(torch.eye(solve.n, dtype=torch.float64))
    shares = []
    for moment in (calibration.task, calibration.harmful):
        trace = rows_action_norm_sq(torch.eye(solve.n, dtype=torch.float64), moment)
        shares.append(rows_action_norm_sq(C, moment) / trace if trace > 0 else float("nan"))
    return shares[0], shares[1]
