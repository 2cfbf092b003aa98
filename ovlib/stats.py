"""The book's statistics, in one place: intervals, tests, verdicts and the multiple-comparison correction.

A *metric* of a model is a statistic of per-image sufficient statistics summed over the evaluation images
(hit/total counts of region classification, confusion matrices of segmentation, ...): ``per_image (N, ...)``
and ``statistic(per_image.sum(0)) -> float``. A *row* of a table is one such array per training seed.

* :func:`bootstrap_ci` -- the percentile bootstrap over images of one model (evaluation noise only).
* :func:`paired_bootstrap_diff` -- the same for the difference of two models evaluated on the same images.
* :func:`hierarchical_bootstrap_diff` -- the interval of a difference between two rows with several training
  seeds: each replicate draws the seeds with replacement, then the images within each drawn seed (seeds are
  the first-level units, so seed-to-seed variation -- usually the larger part -- is in the interval).
* :func:`welch`, :func:`paired_t`, :func:`one_sample_t` -- the tests over seeds (scipy.stats).
* :func:`holm` -- Holm--Bonferroni adjusted p-values of a family of tests (a chapter's headline claims).
* :func:`compare` -- the one decision rule of the book. A comparison with >= 2 seeds on each side (or a
  deterministic frozen model on one side and >= 2 seeds on the other) is a **claim**: its p comes from the
  seeds (paired t when both sides share the seeds and the evaluation images, Welch otherwise, one-sample
  against a frozen model) and its interval is :func:`claim_interval` -- the t interval of that same test
  combined with the evaluation images' bootstrap (below). Two deterministic models (no
  training randomness, e.g. two term groups of the frozen CLIP over crops) are a claim judged by the paired
  bootstrap interval over the units. A comparison with one seed on
  either side is **indicative**: shown with its image-bootstrap interval, never counted as holding or
  reversed (image noise says nothing about how another training run would come out).
* :func:`check` -- identities and numerical checks (a derivation's equality, ΔL >= 0): kind ``check``,
  they pass or fail, and are never mixed with empirical claims.

Verdicts: ``holds`` (resolved in the expected direction), ``reversed`` (resolved the other way), ``not resolved``.
A claim with both a test and an interval is resolved only when they agree: ``p < alpha`` (after Holm for a headline
claim) **and** the interval printed beside it excludes 0 on the side of the effect. The seed test alone would
resolve a difference the hierarchical interval does not: a trained row whose seeds agree closely (a small seed
variance) against a frozen model, with an image-to-image difference that another sample of evaluation images could
erase. A verdict is never shown beside an interval that contradicts it.

Why a claim's interval is not the hierarchical bootstrap: with 2-5 training seeds, resampling the seeds with
replacement sees only a handful of distinct draws and shrinks their spread by ``(n - 1) / n``; its percentile
interval then covers the true difference far less often than it says (simulated in ``tests/test_stats.py``: about
three times in four for a nominal 95 % at 3 seeds). The seeds' part of a claim's interval is therefore the t
interval of the test that judges it (``t_df * se``; ``df`` of the paired / one-sample / Welch test), and the
evaluation images' part -- the images are one sample of the world, shared by every seed, so the seed test cannot
see their noise -- is the percentile half-width of a bootstrap over images with the seeds held
(:func:`image_bootstrap_half`); the two independent parts add in quadrature: ``delta +- sqrt(h_seeds^2 +
h_images^2)``. This interval can exclude 0 only when the unadjusted seed test has ``p < 1 - level``, so a claim whose
interval excludes 0 and is still *not resolved* is one that the Holm correction of its chapter's headline family
holds back (its ``p (Holm)`` is printed beside it).

Precision: :attr:`Comparison.half_width` is the half-width of that interval; :func:`seeds_to_reach` estimates how
many seeds per side would bring it under a target (the seeds' part shrinks as ``1 / sqrt(n)`` with the t quantile
of the larger ``df``; the images' part does not).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "KINDS",
    "VERDICTS",
    "Comparison",
    "Sample",
    "bootstrap_ci",
    "eta_squared",
    "fixed_mean",
    "eta_squared_units",
    "mean_units",
    "check",
    "claim_interval",
    "compare",
    "hierarchical_bootstrap_diff",
    "holm",
    "image_bootstrap_half",
    "mean_std",
    "one_sample_t",
    "paired_bootstrap_diff",
    "paired_t",
    "ratio_stat",
    "seed_t_half",
    "seeds_to_reach",
    "verdict",
    "vs_reference",
    "welch",
]

KINDS = ("claim", "indicative", "check")
VERDICTS = ("holds", "reversed", "not resolved")
Statistic = Callable[[np.ndarray], float]


def ratio_stat(s: np.ndarray) -> float:
    """``s[0] / s[1]`` (nan when ``s[1] == 0``): the statistic of per-unit ``[value, valid]`` pairs (a mean)."""
    return float(s[0] / s[1]) if s[1] > 0 else float("nan")


def _percentile(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    q = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [q, 1.0 - q])
    return float(lo), float(hi)


def _weights(rng: np.random.Generator, n: int, size: int | tuple[int, ...]) -> np.ndarray:
    """Multinomial resampling counts of ``n`` units: ``size + (n,)`` float64 (each row sums to ``n``)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)


# --------------------------------------------------------------------------------------------- image bootstrap
def bootstrap_ci(per_image: np.ndarray, statistic: Statistic, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """``(point, low, high)``: percentile bootstrap over images of ``statistic`` of summed per-image statistics.

    ``per_image (N, ...)``; each replicate draws N images with replacement (multinomial counts ``w (N,)``) and
    evaluates ``statistic(tensordot(w, per_image))``, one matrix product per replicate. ``point`` is the
    statistic of the full sum. Replicates whose statistic is nan are dropped."""
    x = np.asarray(per_image, dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    point = float(statistic(x.sum(0)))
    w = _weights(np.random.default_rng(seed), n, n_boot)  # (n_boot, N)
    sums = (w @ x.reshape(n, -1)).reshape((n_boot,) + x.shape[1:])
    return (point, *_percentile(np.array([statistic(s) for s in sums], dtype=np.float64), level))


def paired_bootstrap_diff(a: np.ndarray, b: np.ndarray, statistic: Statistic, n_boot: int = 1000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float, float]:
    """``statistic(sum b) - statistic(sum a)`` with a percentile interval from resampling the *same* images for
    both models (``a, b (N, ...)``: per-image arrays of two models on the same N images, same order)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_bootstrap_diff: the two models were evaluated on {a.shape[0]} and "
                         f"{b.shape[0]} images; pairing needs the same images")
    n = a.shape[0]
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    point = float(statistic(b.sum(0)) - statistic(a.sum(0)))
    w = _weights(np.random.default_rng(seed), n, n_boot)  # (n_boot, N)
    sa = (w @ a.reshape(n, -1)).reshape((n_boot,) + a.shape[1:])
    sb = (w @ b.reshape(n, -1)).reshape((n_boot,) + b.shape[1:])
    d = np.array([statistic(y) - statistic(x) for x, y in zip(sa, sb)], dtype=np.float64)
    return (point, *_percentile(d, level))


def hierarchical_bootstrap_diff(a_runs: Sequence[np.ndarray], b_runs: Sequence[np.ndarray], statistic: Statistic,
                                paired: bool = False, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                                ) -> tuple[float, float, float]:
    """``(point, low, high)`` of ``mean_s statistic(b_s) - mean_s statistic(a_s)`` over training seeds ``s``.

    ``a_runs`` / ``b_runs``: one per-image array ``(N_s, ...)`` per seed. Each replicate (i) draws each side's
    seeds with replacement -- the same draw for both when ``paired`` (both sides trained with the same seeds,
    evaluated on the same images in the same order) -- and (ii) for every drawn seed slot ``k`` draws its images
    with replacement; slot ``k`` of ``a`` and of ``b`` share the image draw when their image counts agree (the
    evaluation images are the same, so their noise is paired). A side with one run is not seed-resampled (a
    frozen model: only its images are). Replicates with a nan statistic are dropped."""
    ra = [np.asarray(x, dtype=np.float64) for x in a_runs]
    rb = [np.asarray(x, dtype=np.float64) for x in b_runs]
    if not ra or not rb:
        raise ValueError("hierarchical_bootstrap_diff needs at least one run on each side")
    if paired and len(ra) != len(rb):
        raise ValueError(f"hierarchical_bootstrap_diff(paired=True): {len(ra)} and {len(rb)} seeds; pairing needs "
                         "the same seeds on both sides")
    point = float(np.mean([statistic(x.sum(0)) for x in rb]) - np.mean([statistic(x.sum(0)) for x in ra]))
    na, nb = len(ra), len(rb)
    slots = max(na, nb)
    sizes = {x.shape[0] for x in ra + rb}
    shared_images = len(sizes) == 1
    rng = np.random.default_rng(seed)
    flat_a = [x.reshape(x.shape[0], -1) for x in ra]
    flat_b = [x.reshape(x.shape[0], -1) for x in rb]
    diff = np.empty(n_boot, dtype=np.float64)
    for r in range(n_boot):
        ib = rng.integers(0, nb, size=slots) if nb > 1 else np.zeros(slots, dtype=np.int64)
        ia = ib if paired else (rng.integers(0, na, size=slots) if na > 1 else np.zeros(slots, dtype=np.int64))
        # each side draws as many seeds as it has; a one-run side (a frozen model) is scored in every slot,
        # each with the image draw of the other side's slot
        ka, kb = (na if na > 1 else slots), (nb if nb > 1 else slots)
        wa, wb = [], []
        for k in range(slots):
            if shared_images:
                w = _weights(rng, next(iter(sizes)), 1)[0]
                wa.append(w)
                wb.append(w)
            else:
                wa.append(_weights(rng, flat_a[ia[k]].shape[0], 1)[0])
                wb.append(_weights(rng, flat_b[ib[k]].shape[0], 1)[0])
        sa = [statistic((wa[k] @ flat_a[ia[k]]).reshape(ra[0].shape[1:])) for k in range(ka)]
        sb = [statistic((wb[k] @ flat_b[ib[k]]).reshape(rb[0].shape[1:])) for k in range(kb)]
        diff[r] = np.mean(sb) - np.mean(sa)
    return (point, *_percentile(diff, level))


# --------------------------------------------------------------------------------------------- tests over seeds
def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof = 1; nan for one value) and count of the finite values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def _degenerate(d: float) -> float:
    """p of a test whose samples have no spread: 1 when the means agree, 0 when they differ."""
    return 1.0 if d == 0 else 0.0


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(mean(b) - mean(a), two-sided p)`` of Welch's t-test (``scipy.stats.ttest_ind(b, a, equal_var=False)``);
    p = nan with fewer than 2 values on a side."""
    from scipy import stats as ss  # scipy is a core dependency; imported here only to keep `import ovlib` light

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = float(b.mean() - a.mean()) if a.size and b.size else float("nan")
    if a.size < 2 or b.size < 2:
        return d, float("nan")
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return d, _degenerate(d)
    return d, float(ss.ttest_ind(b, a, equal_var=False).pvalue)


def paired_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(mean(b - a), two-sided p)`` of the paired t-test over seeds (``scipy.stats.ttest_rel(b, a)``): ``a[i]``
    and ``b[i]`` were trained with the same seed on the same data order."""
    from scipy import stats as ss

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_t: {a.size} and {b.size} seeds; pairing needs the same seeds on both sides")
    d = float((b - a).mean()) if a.size else float("nan")
    if a.size < 2:
        return d, float("nan")
    if np.ptp(b - a) == 0:
        return d, _degenerate(d)
    return d, float(ss.ttest_rel(b, a).pvalue)


def one_sample_t(ref: float, b: Sequence[float]) -> tuple[float, float]:
    """``(mean(b) - ref, two-sided p)`` of the one-sample t-test of ``b`` against a fixed reference (a frozen
    model, evaluated once)."""
    from scipy import stats as ss

    b = np.asarray(b, dtype=np.float64)
    d = float(b.mean() - ref) if b.size else float("nan")
    if b.size < 2:
        return d, float("nan")
    if np.ptp(b) == 0:
        return d, _degenerate(d)
    return d, float(ss.ttest_1samp(b, ref).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm--Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input order; nan entries
    stay nan and do not count in the family size."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def seed_t_half(va: Sequence[float], vb: Sequence[float], test: str, level: float = 0.95
                ) -> tuple[float, float, float]:
    """``(half, se, df)`` of the t interval of the seed test that judges ``mean(vb) - mean(va)``: ``test`` is
    ``"one-a"`` (``va`` is one frozen model's value), ``"one-b"``, ``"paired"`` or ``"welch"`` (Welch--Satterthwaite
    ``df``); ``half = t_{(1 + level) / 2, df} * se``. Seeds without spread give ``half = se = 0``."""
    from scipy import stats as ss

    a, b = np.asarray(va, dtype=np.float64), np.asarray(vb, dtype=np.float64)
    if test in ("one-a", "one-b", "paired"):
        if test == "paired" and a.shape != b.shape:
            raise ValueError(f"seed_t_half: {a.size} and {b.size} seeds; pairing needs the same seeds")
        x = b if test == "one-a" else a if test == "one-b" else b - a
        n = x.size
        if n < 2:
            return float("nan"), float("nan"), float("nan")
        se, df = float(x.std(ddof=1) / math.sqrt(n)), float(n - 1)
    elif test == "welch":
        if a.size < 2 or b.size < 2:
            return float("nan"), float("nan"), float("nan")
        va_, vb_ = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
        se = float(math.sqrt(va_ + vb_))
        den = va_ ** 2 / (a.size - 1) + vb_ ** 2 / (b.size - 1)
        df = float((va_ + vb_) ** 2 / den) if den > 0 else float(min(a.size, b.size) - 1)
    else:
        raise ValueError(f"seed_t_half: test must be 'one-a', 'one-b', 'paired' or 'welch', got {test!r}")
    if se == 0:
        return 0.0, 0.0, df
    return float(ss.t.ppf(0.5 + level / 2.0, df) * se), se, df


def image_bootstrap_half(a_runs: Sequence[np.ndarray], b_runs: Sequence[np.ndarray], statistic: Statistic,
                         n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> float:
    """Half-width of the percentile interval of ``mean_s statistic(b_s) - mean_s statistic(a_s)`` when only the
    evaluation images are resampled and the seeds are held (the part of a claim's uncertainty that the seed test
    cannot see). Every run draws the same image counts when all runs were evaluated on the same number of images
    (the same images: their noise is shared by both sides), else each run draws its own."""
    ra = [np.asarray(x, dtype=np.float64) for x in a_runs]
    rb = [np.asarray(x, dtype=np.float64) for x in b_runs]
    if not ra or not rb:
        raise ValueError("image_bootstrap_half needs at least one run on each side")
    shape = ra[0].shape[1:]
    sizes = {x.shape[0] for x in ra + rb}
    rng = np.random.default_rng(seed)
    flat = [x.reshape(x.shape[0], -1) for x in ra + rb]
    if len(sizes) == 1:
        w = _weights(rng, next(iter(sizes)), n_boot)  # (n_boot, N): one image draw per replicate, for every run
        sums = [w @ x for x in flat]  # each (n_boot, K)
    else:
        sums = [_weights(rng, x.shape[0], n_boot) @ x for x in flat]
    vals = np.array([[statistic(s[r].reshape(shape)) for s in sums] for r in range(n_boot)])  # (n_boot, runs)
    diff = vals[:, len(ra):].mean(1) - vals[:, :len(ra)].mean(1)
    lo, hi = _percentile(diff, level)
    return (hi - lo) / 2.0 if math.isfinite(lo) and math.isfinite(hi) else float("nan")


def claim_interval(delta: float, va: Sequence[float], vb: Sequence[float], test: str, a_runs: Sequence[np.ndarray],
                   b_runs: Sequence[np.ndarray], statistic: Statistic, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, dict[str, float]]:
    """``(low, high, parts)`` of a claim: ``delta +- sqrt(h_seeds^2 + h_images^2)`` (module docstring), with
    ``h_seeds`` from :func:`seed_t_half` of the claim's ``test`` over the per-seed values ``va`` / ``vb`` and
    ``h_images`` from :func:`image_bootstrap_half` of the runs. ``parts``: ``half_seeds``, ``half_images``,
    ``se_seeds``, ``df``, ``seeds`` (per seeded side) -- what :func:`seeds_to_reach` needs."""
    hs, se, df = seed_t_half(va, vb, test, level)
    hi_ = image_bootstrap_half(a_runs, b_runs, statistic, n_boot=n_boot, seed=seed, level=level)
    h = math.hypot(hs, hi_ if math.isfinite(hi_) else 0.0)
    n = len(vb) if test == "one-a" else len(va) if test == "one-b" else min(len(va), len(vb))
    parts = {"half_seeds": hs, "half_images": hi_, "se_seeds": se, "df": df, "seeds": float(n), "level": level}
    return delta - h, delta + h, parts


def seeds_to_reach(parts: dict[str, float], target: float, max_seeds: int = 50) -> int | None:
    """The fewest seeds per seeded side whose interval half-width would be ``<= target``, by
    :func:`claim_interval`'s parts: ``h(n) = sqrt((t_{df(n)} se sqrt(n0 / n))^2 + h_images^2)`` with ``df(n) = df0
    (n - 1) / (n0 - 1)`` (the seeds' spread is taken as measured). ``None`` when the images' part alone is
    ``>= target`` (more seeds cannot help: more evaluation images can) or when it needs more than ``max_seeds``;
    the current count when it is already met."""
    from scipy import stats as ss

    n0, se, df0 = parts.get("seeds", float("nan")), parts.get("se_seeds", float("nan")), parts.get("df", float("nan"))
    him = parts.get("half_images", float("nan"))
    him = him if math.isfinite(him) else 0.0
    level = parts.get("level", 0.95)
    if not (math.isfinite(n0) and math.isfinite(se) and math.isfinite(df0)) or n0 < 2 or target <= 0:
        return None
    if him >= target:
        return None
    for n in range(int(n0), max_seeds + 1):
        df = df0 * (n - 1) / (n0 - 1)
        hs = float(ss.t.ppf(0.5 + level / 2.0, df)) * se * math.sqrt(n0 / n) if se > 0 else 0.0
        if math.hypot(hs, him) <= target:
            return n
    return None


def verdict(delta: float, expect: int, p: float = float("nan"), lo: float = float("nan"),
            hi: float = float("nan"), alpha: float = 0.05) -> str:
    """``holds`` / ``reversed`` when the difference is resolved with the ``expect``-ed sign (+1 / -1) or the other;
    else ``not resolved``. Resolved: ``p < alpha`` when ``p`` is given, an interval ``[lo, hi]`` excluding 0 on the
    side of ``delta`` when it is given -- both when both are (the verdict agrees with the interval shown beside
    it: module docstring)."""
    if expect not in (1, -1):
        raise ValueError(f"verdict: expect must be +1 or -1, got {expect!r}")
    if not math.isfinite(delta):
        return "not resolved"
    has_p, has_ci = math.isfinite(p), math.isfinite(lo) and math.isfinite(hi)
    if not (has_p or has_ci):
        return "not resolved"
    resolved = delta != 0
    if has_p:
        resolved = resolved and p < alpha
    if has_ci:
        resolved = resolved and ((lo > 0 and delta > 0) or (hi < 0 and delta < 0))
    if not resolved:
        return "not resolved"
    return "holds" if (delta > 0) == (expect > 0) else "reversed"


# --------------------------------------------------------------------------------------------- comparisons
@dataclass(frozen=True)
class Sample:
    """One side of a comparison: one per-image array per training seed and the statistic of their sum.

    ``fixed``: a deterministic model with no training seed (the frozen CLIP): one run, compared by a
    one-sample test. ``order``: an identifier of the evaluation images (and their order); two samples with
    the same seeds and the same ``order`` are paired."""

    runs: tuple[np.ndarray, ...]
    statistic: Statistic
    seeds: tuple[int, ...] = ()
    fixed: bool = False
    order: str = ""

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("Sample needs at least one run")
        if self.fixed and len(self.runs) != 1:
            raise ValueError(f"a fixed Sample is one deterministic run, got {len(self.runs)}")
        if self.seeds and len(self.seeds) != len(self.runs):
            raise ValueError(f"Sample: {len(self.seeds)} seeds for {len(self.runs)} runs")

    @property
    def values(self) -> list[float]:
        """The metric of each run."""
        return [float(self.statistic(np.asarray(r, dtype=np.float64).sum(0))) for r in self.runs]

    @property
    def mean(self) -> float:
        return mean_std(self.values)[0]


@dataclass
class Comparison:
    """``b - a`` on one metric: the effect, its interval, the test and what it may be counted as."""

    delta: float
    ci_low: float
    ci_high: float
    p: float
    kind: str  # claim | indicative | check
    test: str  # e.g. "Welch t, 3 vs 3 seeds; hierarchical bootstrap"
    expect: int
    ours_a: float = float("nan")
    ours_b: float = float("nan")
    seeds_a: int = 0
    seeds_b: int = 0
    p_adjusted: float = float("nan")
    alpha: float = 0.05
    extra: dict = field(default_factory=dict)

    @property
    def half_width(self) -> float:
        """Half the width of the interval (nan without one): the precision of the effect."""
        if math.isfinite(self.ci_low) and math.isfinite(self.ci_high):
            return (self.ci_high - self.ci_low) / 2.0
        return float("nan")

    @property
    def indication(self) -> str:
        """What the interval alone shows (``higher`` / ``lower`` / ``none``); for indicative comparisons."""
        if math.isfinite(self.ci_low) and self.ci_low > 0:
            return "higher"
        if math.isfinite(self.ci_high) and self.ci_high < 0:
            return "lower"
        return "none"

    @property
    def verdict(self) -> str:
        """Claims: from ``p_adjusted`` when set (a headline claim after Holm), else ``p``. Indicative
        comparisons are never resolved. Checks: ``holds`` when they pass, ``reversed`` when they fail."""
        if self.kind == "check":
            return "holds" if self.extra.get("passed") else "reversed"
        if self.kind == "indicative":
            return "not resolved"
        p = self.p_adjusted if math.isfinite(self.p_adjusted) else self.p
        return verdict(self.delta, self.expect, p=p, lo=self.ci_low, hi=self.ci_high, alpha=self.alpha)

    def describe(self, digits: int = 1) -> str:
        """``+1.2 [-0.3, +2.5], p = 0.040`` (the numbers a chapter prints beside a claim)."""
        if not math.isfinite(self.delta):
            return "–"
        s = f"{self.delta:+.{digits}f}"
        if math.isfinite(self.ci_low) and math.isfinite(self.ci_high):
            s += f" [{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}]"
        if math.isfinite(self.p):
            s += f", p = {self.p:.3f}"
            if math.isfinite(self.p_adjusted):
                s += f" (Holm {self.p_adjusted:.3f})"
        return s


def compare(a: Sample, b: Sample, expect: int = 1, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
            alpha: float = 0.05) -> Comparison:
    """``b - a`` under the book's rule (module docstring): a *claim* when both sides carry seed variation
    (>= 2 seeds each, or a fixed model against >= 2 seeds), else *indicative*."""
    if expect not in (1, -1):
        raise ValueError(f"compare: expect must be +1 or -1, got {expect!r}")
    va, vb = a.values, b.values
    na, nb = len(va), len(vb)
    common = dict(expect=expect, ours_a=mean_std(va)[0], ours_b=mean_std(vb)[0], seeds_a=0 if a.fixed else na,
                  seeds_b=0 if b.fixed else nb, alpha=alpha)
    seeded_a, seeded_b = (na >= 2 or a.fixed), (nb >= 2 or b.fixed)
    if seeded_a and seeded_b and not (a.fixed and b.fixed):
        paired = (not a.fixed and not b.fixed and tuple(a.seeds) == tuple(b.seeds) and bool(a.seeds)
                  and a.order == b.order)
        if a.fixed:
            _, p = one_sample_t(va[0], vb)
            test = f"one-sample t, {nb} seeds vs a frozen model"
        elif b.fixed:
            _, p = one_sample_t(vb[0], va)
            test = f"one-sample t, {na} seeds vs a frozen model"
        elif paired:
            _, p = paired_t(va, vb)
            test = f"paired t, {na} shared seeds"
        else:
            _, p = welch(va, vb)
            test = f"Welch t, {na} vs {nb} seeds"
        how = "one-a" if a.fixed else "one-b" if b.fixed else "paired" if paired else "welch"
        d = float(np.mean(vb) - np.mean(va))
        lo, hi, parts = claim_interval(d, va, vb, how, a.runs, b.runs, a.statistic, n_boot=n_boot, seed=seed,
                                       level=level)
        return Comparison(d, lo, hi, p, "claim", test + "; interval: t over seeds ⊕ bootstrap over images",
                          extra=parts, **common)
    if a.fixed and b.fixed:  # two deterministic models (no training randomness): the units' bootstrap is all there is
        d, lo, hi = paired_bootstrap_diff(a.runs[0], b.runs[0], a.statistic, n_boot=n_boot, seed=seed, level=level)
        return Comparison(d, lo, hi, float("nan"), "claim",
                          f"deterministic models: paired bootstrap over {a.runs[0].shape[0]} units", **common)
    # one seed on a side: the image noise of one training run, shown but never counted
    if a.runs[0].shape[0] == b.runs[0].shape[0] and a.order == b.order:
        d, lo, hi = paired_bootstrap_diff(a.runs[0], b.runs[0], a.statistic, n_boot=n_boot, seed=seed, level=level)
        test = f"1 seed: paired bootstrap over {a.runs[0].shape[0]} images"
    else:
        d, lo, hi = hierarchical_bootstrap_diff(a.runs[:1], b.runs[:1], a.statistic, n_boot=n_boot, seed=seed,
                                                level=level)
        test = "1 seed: bootstrap over images"
    return Comparison(d, lo, hi, float("nan"), "indicative", test, **common)


def vs_reference(ref: float, values: Sequence[float], expect: int = 1, what: str = "") -> Comparison:
    """``mean(values) - ref`` for a per-seed quantity against a fixed reference value (a rule's bound, not a
    model): a *claim* judged by the one-sample t-test over the seeds (>= 2 seeds; its interval the t interval
    of the mean), *indicative* with one seed (no interval). ``what`` names the quantity in the test's text."""
    v = np.asarray(values, dtype=np.float64)
    d, p = one_sample_t(ref, v)
    if v.size >= 2:
        half, se, df = seed_t_half([ref], v, "one-a")
        parts = {"half_seeds": half, "half_images": 0.0, "se_seeds": se, "df": df, "seeds": float(v.size),
                 "level": 0.95}
        return Comparison(d, d - half, d + half, p, "claim", f"one-sample t over {v.size} seeds{what}", expect,
                          ours_a=float(ref), ours_b=float(v.mean()), seeds_b=int(v.size), extra=parts)
    return Comparison(d, float("nan"), float("nan"), float("nan"), "indicative", f"1 seed{what}", expect,
                      ours_a=float(ref), ours_b=float(v.mean()) if v.size else float("nan"), seeds_b=int(v.size))


def check(value: float, target: float = 0.0, tol: float = 1e-6, relation: str = "==") -> Comparison:
    """A numerical check (an identity or an inequality that holds by derivation): ``value relation target``
    within ``tol`` (``==``: ``|value - target| <= tol``; ``>=``: ``value >= target - tol``; ``<=``)."""
    if relation == "==":
        passed = abs(value - target) <= tol
    elif relation == ">=":
        passed = value >= target - tol
    elif relation == "<=":
        passed = value <= target + tol
    else:
        raise ValueError(f"check: relation must be '==', '>=' or '<=', got {relation!r}")
    passed = bool(passed) and math.isfinite(value)
    return Comparison(float(value - target), float("nan"), float("nan"), float("nan"), "check",
                      f"check: value {relation} {target:g} (tol {tol:g})", 1, ours_b=float(value),
                      ours_a=float(target), extra={"passed": passed})


def mean_units(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per-unit ``(N, 2)`` ``[value, valid]`` of ``values (N,)`` (a non-finite value -> ``[0, 0]``): the units
    whose :func:`ratio_stat` of the sum is the mean over the valid units (what :func:`bootstrap_ci` and
    :class:`Sample` resample)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    ok = np.isfinite(v)
    return np.stack([np.where(ok, v, 0.0), ok.astype(np.float64)], 1)


def fixed_mean(values: Sequence[float] | np.ndarray) -> Sample:
    """The per-image ``values (N,)`` of a deterministic model (one run, no training seed) as a :class:`Sample`
    whose statistic is their mean over the finite ones (what a paired comparison over images resamples)."""
    return Sample((mean_units(values),), ratio_stat, fixed=True)


def eta_squared_units(values: np.ndarray) -> np.ndarray:
    """Per-unit ``(N, 2K + 1)`` ``[x, x², 1]`` of ``values (N, K)`` (units x groups): sums of these give every
    group's mean and variance over the units, so :func:`eta_squared` of a (resampled) sum needs no raw data."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"eta_squared_units: values must be (units, groups), got shape {x.shape}")
    return np.concatenate([x, x ** 2, np.ones((len(x), 1))], 1)


def eta_squared(s: np.ndarray) -> float:
    """η² = Var_groups(mean over units) / (that + mean over groups of Var_units): the share of the variance of
    the per-unit values that the group identity explains (1 = every unit has its group's value), from the sum
    ``s (2K + 1,)`` of :func:`eta_squared_units` (population variances; ``nan`` when there is no variance)."""
    n, k = s[-1], (len(s) - 1) // 2
    mu, m2 = s[:k] / n, s[k:2 * k] / n
    within = float(np.mean(np.maximum(m2 - mu ** 2, 0.0)))
    between = float(np.var(mu))
    return between / (between + within) if between + within > 0 else float("nan")
