"""Randomized smoothing (Cohen, Rosenfeld, Kolter, ICML 2019): PREDICT, CERTIFY and certified accuracy.

The smoothed classifier is g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I). CERTIFY (Cohen et al.,
Algorithm 1 / Theorem 1) returns the class cA and the L2 radius sigma * Phi^-1(pA_lower), where pA_lower is a
one-sided (1 - alpha) Clopper-Pearson lower bound on P(f(x + e) = cA); with probability >= 1 - alpha over the
noise, g is constant on the L2 ball of that radius around x.

Noise: one call draws the noise samples e_1, e_2, ... from a seeded torch.Generator on the device and uses the
*same* samples for every image of the batch (common random numbers). Each image still sees iid Gaussian noise, so
every certificate keeps its own (1 - alpha) guarantee; the images' certificates are merely not independent of each
other. In exchange, on the CPU, a batch gives exactly the certificates of its images certified one by one and the
counts do not depend on ``batch_size`` (noise is drawn in blocks of multiples of 16 samples, and PyTorch's CPU
normal sampler yields the same stream for any split into multiples of 16 values); on other devices results are
reproducible for a fixed seed, batch size and number of images. The guarantee needs noise that is
independent of the input: an attack must not optimise against the certification seed's noise (the seeds used here
are mixed with a stream name, so ``torch.manual_seed(seed)`` elsewhere does not reproduce them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint
from torch import nn
from tqdm.auto import tqdm

from shadowlab import validate
from shadowlab.models import default_device, fold_batch_norm
from shadowlab.precision import check_precision, compute_precision, prepare_model

ABSTAIN = -1
NOISE_BLOCK = 16  # noise is drawn in whole multiples of this many samples (see the module docstring)


def default_batch_size(device: torch.device) -> int:
    """CERTIFY's forward chunk on ``device``: 256 on a CPU, 1000 elsewhere. A chunk that fits the CPU's caches runs
    the 'cnn' base network about 30% faster per sample than 1000 (0.66 against 0.93 ms on 2 cores, interleaved;
    docs/results.md); the counts do not depend on it (module docstring)."""
    return 256 if torch.device(device).type == "cpu" else 1000


@dataclass
class Certificate:
    """One image's CERTIFY output (Cohen et al. Alg. 1): class (ABSTAIN = -1), L2 radius, pA lower bound, counts."""

    prediction: int
    radius: float
    pA_lower: float
    counts: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def lower_confidence_bound(n_a: int | np.ndarray, n: int | np.ndarray, alpha: float) -> float | np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion, as in Cohen et al.'s code.

    Guarantee: for n_a ~ Binomial(n, p), P(bound <= p) >= 1 - alpha (exact test, conservative). Equals
    ``scipy.stats.beta.ppf(alpha, n_a, n - n_a + 1)`` and 0 when n_a = 0.

    n_a: successes, integers in [0, n]; n: trials, integers >= 1; alpha in (0, 1). Scalars give a float, arrays
    (broadcast together) an array of the same shape. ValueError names the argument that is out of range.

    Example: ``lower_confidence_bound(990, 1000, 0.001)`` is about 0.976, so CERTIFY's radius at sigma 0.25 is
    0.25 * Phi^-1(0.976), about 0.49.
    """
    alpha = validate.alpha(alpha)
    n_a_arr, n_arr = _counts(n_a, "n_a"), _counts(n, "n")
    if np.any(n_arr < 1):
        raise ValueError(f"n={n!r} must be an integer >= 1")
    try:
        outside = np.any(n_a_arr < 0) or np.any(n_a_arr > n_arr)
    except ValueError:
        raise ValueError(f"n_a of shape {n_a_arr.shape} and n of shape {n_arr.shape} do not broadcast") from None
    if outside:
        raise ValueError(f"n_a={n_a!r} must lie in [0, n] (n={n!r})")
    low = proportion_confint(n_a_arr, n_arr, alpha=2 * alpha, method="beta")[0]
    low = np.where(n_a_arr == 0, 0.0, np.nan_to_num(low, nan=0.0))
    return float(low) if low.ndim == 0 else low


def _counts(value: Any, name: str) -> np.ndarray:
    """A count or an array of counts: integers (an integral float such as 990.0 counts), no bool, no 2.5, no NaN."""
    arr = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    ok = arr.size > 0 and (arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and bool(np.all(np.isfinite(arr)))
                                                       and bool(np.all(arr == np.round(arr)))))
    if not ok:
        raise ValueError(f"{name}={value!r} must be an integer count (or an array of them)")
    return arr.astype(np.int64)


def seeded_generator(seed: int, stream: str, device: torch.device) -> torch.Generator:
    """A torch.Generator on ``device`` seeded from (seed, stream name), so different uses never share noise."""
    seed = validate.count(seed, "seed", minimum=0)
    tag = int.from_bytes(stream.encode(), "little")
    state = np.random.SeedSequence([int(seed), tag]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


class Smooth:
    """Smoothed classifier g of Cohen et al. around ``base_model`` (pixels in [0, 1] -> logits), noise level sigma.

    g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I), with f the base model's argmax. ``predict`` and
    ``certify`` are the paper's PREDICT and CERTIFY (Algorithm 1); ``sample_counts`` is its SAMPLEUNDERNOISE.

    base_model: any module mapping B x C x H x W pixels in [0, 1] to B x num_classes logits; it is put in eval mode
    and moved to ``device`` (default: models.default_device()). num_classes: integer >= 2; sigma: finite > 0.
    batch_size: the forward chunk of every method not given one (default ``default_batch_size(device)``).

    Example::

        smooth = Smooth(model, 10, 0.25, device="cpu")
        certs = smooth.certify(x, n0=100, n=10_000, alpha=0.001)   # one Certificate per image of x
    """

    def __init__(self, base_model: nn.Module, num_classes: int, sigma: float,
                 device: str | torch.device | None = None, precision: str = "fp32",
                 batch_size: int | None = None) -> None:
        num_classes = validate.count(num_classes, "num_classes", minimum=2)
        sigma = validate.sigma(sigma)
        if not isinstance(base_model, nn.Module):
            raise ValueError(f"base_model must be a torch.nn.Module, got {type(base_model).__name__}")
        self.device = torch.device(device) if device is not None else default_device()
        # forward chunk of every method without its own batch_size (default_batch_size of the device)
        self.batch_size = default_batch_size(self.device) if batch_size is None else validate.count(batch_size,
                                                                                                  "batch_size")
        self.base_model = base_model.to(self.device).eval()
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        # the base network's arithmetic (shadowlab.precision): a certificate is then one of the smoothed classifier
        # whose base network runs in this precision
        self.precision = check_precision(precision)
        prepare_model(self.base_model, self.precision)
        # channels_last inputs roughly double CPU conv throughput (measured on the 'cnn' architecture)
        self._channels_last = any(isinstance(m, nn.Conv2d) for m in base_model.modules())

    def _check_images(self, x: torch.Tensor) -> torch.Tensor:
        # one C x H x W image is a batch of one
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            x = x.unsqueeze(0)
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.to(self.device, torch.float32)
        # 3 channels (a 1-channel image is refused, not broadcast by Normalize) and a size the base model takes
        outputs = validate.model_input(self.base_model, x)
        if outputs != self.num_classes:
            raise ValueError(f"num_classes={self.num_classes} does not match the base model's {outputs} outputs")
        return x

    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int | None = None,
                      generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """Counts of f(x + e) over ``num`` noise samples per image: LongTensor B x num_classes on the device.

        Noise samples are shared by the images of the batch; (image, sample) pairs are evaluated in forward
        chunks of about ``batch_size``. Without ``generator`` the seed comes from torch's global RNG.
        """
        num = validate.count(num, "num")
        batch_size = self.batch_size if batch_size is None else validate.count(batch_size, "batch_size")
        x = self._check_images(x)
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=self.device).manual_seed(seed)
        b, shape = x.shape[0], x.shape[1:]
        # samples per noise block: a multiple of NOISE_BLOCK with about batch_size (image, sample) pairs
        per_block = max(NOISE_BLOCK, (batch_size // b) // NOISE_BLOCK * NOISE_BLOCK)
        counts = torch.zeros(b * self.num_classes, dtype=torch.long, device=self.device)
        fmt = torch.channels_last if self._channels_last else torch.contiguous_format
        net = fold_batch_norm(self.base_model)   # the same function, fewer operations (folded afresh per call)
        done = 0
        bar = tqdm(total=num, desc="noise samples", unit="sample", disable=not progress, leave=False)
        with torch.inference_mode():
            while done < num:
                m = min(per_block, num - done)
                drawn = -(-m // NOISE_BLOCK) * NOISE_BLOCK  # round up: keeps the CPU noise stream split-invariant
                noise = torch.randn((drawn, *shape), generator=generator, device=self.device)[:m]
                batch = (x[:, None] + self.sigma * noise[None]).reshape(b * m, *shape).contiguous(memory_format=fmt)
                preds = torch.cat([self._classify(batch[i:i + batch_size], net)
                                   for i in range(0, b * m, batch_size)])
                image = torch.arange(b, device=self.device).repeat_interleave(m)
                counts += torch.bincount(image * self.num_classes + preds, minlength=b * self.num_classes)
                done += m
                bar.update(m)
        bar.close()
        return counts.view(b, self.num_classes)

    def _classify(self, batch: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """Base classifier f (``net``: the base model with its batch norms folded, default the base model itself):
        argmax of the logits, which must have shape len(batch) x num_classes."""
        with compute_precision(self.precision, self.device):
            logits = (self.base_model if net is None else net)(batch)
        if logits.dim() != 2 or logits.shape != (batch.shape[0], self.num_classes):
            raise ValueError(f"num_classes={self.num_classes} does not match the base model's output shape "
                             f"{tuple(logits.shape)} for {batch.shape[0]} inputs")
        return logits.argmax(1)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int | None = None,
                seed: int = 0) -> torch.Tensor:
        """PREDICT (Cohen et al. Alg. 1): g's class per image, or ABSTAIN (-1) when the vote is too close to call.

        Draws ``n`` noise samples (shared by the batch, from seed ``seed`` and the "predict" stream) and returns the
        top class unless a two-sided binomial test of the top two counts has p-value > alpha. Guarantee (Cohen et
        al. Prop. 2): the probability of returning a class other than g(x) is at most alpha.

        x: B x C x H x W (or one C x H x W image) in [0, 1]; n: integer >= 1; alpha in (0, 1); batch_size: forward
        chunk (integer >= 1, default the Smooth's ``batch_size``); seed: integer >= 0. Returns a LongTensor of
        shape B on the device.

        Example: ``Smooth(model, 10, 0.25).predict(x, n=1000, alpha=0.001)`` -> tensor([3, -1, ...]).
        """
        n = validate.count(n, "n")
        alpha = validate.alpha(alpha)
        x = self._check_images(x)
        counts = self.sample_counts(x, n, batch_size, seeded_generator(seed, "predict", self.device))
        top = torch.topk(counts, 2, dim=1)
        values, classes = top.values.cpu().numpy(), top.indices.cpu().numpy()
        pvalues = np.array([binomtest(int(c1), int(c1 + c2), p=0.5).pvalue for c1, c2 in values])
        out = np.where(pvalues > alpha, ABSTAIN, classes[:, 0])
        return torch.as_tensor(out, dtype=torch.long, device=self.device)

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int | None = None, seed: int = 0,
                progress: bool = False) -> list[Certificate]:
        """CERTIFY (Cohen et al. Alg. 1): g's class per image with a certified L2 radius, or ABSTAIN.

        ``n0`` noise samples pick the candidate class cA, ``n`` fresh samples give pA_lower, the one-sided
        (1 - alpha) Clopper-Pearson bound on P(f(x + e) = cA) (``lower_confidence_bound``); the radius is
        sigma * Phi^-1(pA_lower), or the answer is ABSTAIN (-1) with radius 0 when pA_lower < 1/2. Guarantee
        (Cohen et al. Thm. 1): for each image, with probability >= 1 - alpha over the noise, its certificate is
        correct: g(x + d) = cA for all ||d||_2 < radius. Each certificate holds on its own; they do not hold all
        at once with probability 1 - alpha (a batch of B images expects up to alpha x B wrong ones). The noise comes
        from seed ``seed`` and the "certify" stream and is shared by the images of the batch (see the module
        docstring).

        x: B x C x H x W (or one C x H x W image) in [0, 1]; n0, n: integers >= 1 (Cohen et al. use 100 and
        100,000); alpha in (0, 1) (they use 0.001); batch_size: forward chunk (default the Smooth's); seed: integer
        >= 0; progress: show a progress bar. Returns a list of B ``Certificate`` (prediction, radius, pA_lower,
        counts of the n samples).

        Example: ``Smooth(model, 10, 0.25).certify(x[:1], 100, 10_000, 0.001)[0].radius`` -> e.g. 0.61.
        """
        certs = self.certify_where(x, n0, n, alpha, None, batch_size, seed, progress)
        return [c for c in certs if c is not None]

    def certify_where(self, x: torch.Tensor, n0: int, n: int, alpha: float,
                      needed: Callable[[torch.Tensor], torch.Tensor] | None, batch_size: int | None = None,
                      seed: int = 0,
                      progress: bool = False) -> list[Certificate | None]:
        """``certify``, drawing the ``n`` estimation samples only for the images whose certificate can matter.

        After the n0 selection samples pick each image's class cA (B classes, on the device), ``needed(cA)`` returns
        a B bool mask; the images outside it get None and cost no further forward pass. A caller that only asks
        "is this image certified as class k?" passes ``lambda c_a: c_a == k``: CERTIFY returns cA or ABSTAIN, so an
        image whose cA is another class can never be. needed=None: every image (``certify``).
        Guarantee: each returned certificate is the one ``certify`` gives the same image at the same seed on a CPU
        (the noise is shared by the batch and drawn in blocks whose stream does not depend on how many images
        share it: module docstring); elsewhere it is a valid CERTIFY output with the same guarantee.
        """
        n0 = validate.count(n0, "n0")
        n = validate.count(n, "n")
        alpha = validate.alpha(alpha)
        x = self._check_images(x)
        generator = seeded_generator(seed, "certify", self.device)  # n0 then n samples: disjoint, independent
        selection = self.sample_counts(x, n0, batch_size, generator, progress=progress)
        c_a = selection.argmax(1)
        keep = torch.ones_like(c_a, dtype=torch.bool) if needed is None else needed(c_a).to(torch.bool)
        if keep.shape != c_a.shape:
            raise ValueError(f"needed must return one bool per image, shape {tuple(c_a.shape)}, got "
                             f"{tuple(keep.shape)}")
        out: list[Certificate | None] = [None] * len(c_a)
        if not bool(keep.any()):
            return out
        counts = self.sample_counts(x[keep], n, batch_size, generator, progress=progress)
        c_a = c_a[keep]
        n_a = counts.gather(1, c_a[:, None])[:, 0]
        c_a_np, n_a_np, counts_np = c_a.cpu().numpy(), n_a.cpu().numpy(), counts.cpu().numpy()
        p_low = np.atleast_1d(lower_confidence_bound(n_a_np, n, alpha))
        certified = p_low >= 0.5
        radius = np.where(certified, self.sigma * norm.ppf(np.maximum(p_low, 0.5)), 0.0)
        certs = [Certificate(prediction=int(c) if ok else ABSTAIN, radius=float(r), pA_lower=float(p),
                             counts=[int(v) for v in row])
                 for c, ok, r, p, row in zip(c_a_np, certified, radius, p_low, counts_np)]
        for i, cert in zip(keep.nonzero().squeeze(1).tolist(), certs):
            out[i] = cert
        return out


def _as_label_array(records: Sequence[Certificate], labels: Iterable[int] | torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels).reshape(-1)
    if len(records) == 0:
        raise ValueError("records is empty; certified accuracy needs at least one Certificate")
    if labels.shape[0] != len(records):
        raise ValueError(f"labels has {labels.shape[0]} entries but records has {len(records)}")
    return labels


def certified_accuracy(records: Sequence[Certificate], labels: Iterable[int] | torch.Tensor | np.ndarray,
                       radii: Iterable[float]) -> np.ndarray:
    """Approximate certified accuracy of Cohen et al.: for each r, fraction of images with prediction == label
    and certified radius >= r.

    "Approximate" because each certificate holds with probability >= 1 - alpha only (an abstention counts as wrong).
    records: B Certificates (not empty); labels: B integers (sequence, array or tensor); radii: radii to report
    (not NaN). Returns a float array with one accuracy per radius, non-increasing in r.

    Example: ``certified_accuracy(certs, y, [0.0, 0.25, 0.5])`` -> array([0.8, 0.6, 0.3]).
    """
    labels = _as_label_array(records, labels)
    radii = np.atleast_1d(np.asarray(list(radii) if not isinstance(radii, np.ndarray) else radii, dtype=float))
    if np.any(np.isnan(radii)):
        raise ValueError("radii must not contain NaN")
    pred = np.array([r.prediction for r in records])
    radius = np.array([r.radius for r in records], dtype=float)
    correct = pred == labels
    return (correct[None, :] & (radius[None, :] >= radii[:, None])).mean(axis=1)


def certified_accuracy_curve(records: Sequence[Certificate], labels: Iterable[int] | torch.Tensor | np.ndarray,
                             max_radius: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The certified-accuracy step curve (Cohen et al. Fig. 1) of ``certified_accuracy``, exactly: (radii, accuracy).

    The curve r -> acc(r) only drops just after a certified radius, so it is evaluated at 0, every certified radius
    below max_radius, and max_radius (default 1.05 x the largest radius, 1 when none is > 0); acc(radii[i]) holds on
    (radii[i-1], radii[i]], the "pre" step of matplotlib. Returns two float arrays of the same length.
    """
    radius = np.array([r.radius for r in records], dtype=float)
    if max_radius is None:
        largest = float(radius.max(initial=0.0))
        max_radius = 1.05 * largest if largest > 0 else 1.0
    if not max_radius > 0:
        raise ValueError(f"max_radius={max_radius!r} must be > 0 or None")
    breaks = np.unique(np.concatenate([[0.0], radius[(radius > 0) & (radius < max_radius)], [max_radius]]))
    return breaks, certified_accuracy(records, labels, breaks)


def summarize(records: Sequence[Certificate], labels: Iterable[int] | torch.Tensor | np.ndarray,
              radii: Iterable[float] = (0, 0.25, 0.5, 0.75, 1.0)) -> dict:
    """The certification table's row: certified accuracy per radius and the radius statistics, as a JSON-ready dict.

    Keys: "n_images"; "certified_accuracy" (radius formatted with :g, e.g. "0.25" -> fraction, see
    ``certified_accuracy``); "mean_radius_correct" (mean radius of correctly certified images, None if none);
    "mean_radius_zero_if_wrong" (wrong and abstained images count 0); "accuracy" (clean accuracy of g, abstentions
    wrong); "abstain_rate". records and labels as in ``certified_accuracy``; radii default (0, 0.25, 0.5, 0.75, 1).

    Example: ``summarize(certs, y)["certified_accuracy"]["0.5"]`` -> 0.3.
    """
    labels = _as_label_array(records, labels)
    radii = [float(r) for r in radii]
    acc = certified_accuracy(records, labels, radii)
    pred = np.array([r.prediction for r in records])
    radius = np.array([r.radius for r in records], dtype=float)
    correct = pred == labels
    return {
        "n_images": len(records),
        "certified_accuracy": {f"{r:g}": float(a) for r, a in zip(radii, acc)},
        "mean_radius_correct": float(radius[correct].mean()) if correct.any() else None,
        "mean_radius_zero_if_wrong": float(np.where(correct, radius, 0.0).mean()),
        "accuracy": float(correct.mean()),
        "abstain_rate": float((pred == ABSTAIN).mean()),
    }
