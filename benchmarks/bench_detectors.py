"""Benchmark: isomax_jax.detectors vs pytorch-ood 0.4.0 on the same arrays, side by side (CPU).

Run:  python benchmarks/bench_detectors.py [--parts features,images,imagenet] [--only knn,vim]
      [--fit 50000] [--score 100000] [--dim 512] [--classes 10] [--images 2048]
      [--imagenet-rows 200000] [--imagenet-queries 2000] [--imagenet-k 1000]

1. ``features``: feature/logit detectors. Fit on ``--fit`` x ``--dim`` float32 features
   (``--classes`` classes, non-negative like pooled ReLU features) and their linear-head logits,
   score ``--score`` rows (half in-distribution-like, half shifted), for every detector both
   libraries implement (22 of our 24); ours alone for ``mmls``/``mmles`` (not in pytorch-ood).
2. ``images``: input perturbation (ODIN; Mahalanobis with input pre-processing): a small conv net
   (conv 3->16, conv 16->32 stride 2, mean pool, dense 32->classes) on ``--images`` 32x32x3
   images, a Flax model and its PyTorch twin with the same weights.
3. ``imagenet``: KNN at ImageNet's shapes, ``k = --imagenet-k`` (1000, the paper's ImageNet
   choice): a bank of ``--imagenet-rows`` x 2048 features (1000 classes) is fitted and
   ``--imagenet-queries`` rows are scored; times and memory are measured there and extrapolated
   to the 1,281,167-row bank and 50,000 queries (fit and memory linear in the rows, score linear
   in rows x queries: both libraries do the exact ``B x N x D`` products).

Each (library, detector) runs in its own subprocess, so its peak resident memory is its own:
"peak MB" is the process's peak RSS minus its RSS once the arrays are loaded (JAX: on device;
torch: ``from_numpy``). For ours the XLA temporary buffer size of the compiled score
(``memory_analysis().temp_size_in_bytes``) is printed too. Times: ours ``fit`` is the second call
(the first, with compilation, is printed apart), ``score`` is one call after AOT compilation
(compile time printed apart); pytorch-ood has no compilation, one call each. The closing lines give
the overall ratio of summed fit+score times (detectors both implement), the geometric mean of
per-detector ratios, the process CPU seconds of each side (less sensitive than wall time to other
jobs on the machine; the load average is printed before and after), and a sanity check: each
score pair agrees under the documented relation (``docs/detectors.md``) up to float32 rounding.
pytorch-ood's NNGuide is given the queries 8192 at a time (its ``predict_features`` would build a
``[queries, bank]`` similarity matrix: 20 GB here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REFERENCE = {  # our name -> (pytorch-ood class, relation factor: ours = factor * theirs)
    "msp": ("MaxSoftmax", -1.0),
    "max_logit": ("MaxLogit", -1.0),
    "energy": ("EnergyBased", -1.0),
    "gen": ("GEN", None),  # -C (pytorch-ood averages over the C classes)
    "entropic": ("Entropy", -1.0),
    "min_distance": ("MaxLogit", -1.0),
    "mmls": (None, None),
    "mmles": (None, None),
    "mahalanobis": ("Mahalanobis", None),  # -2N (undivided covariance, 0.5 factor)
    "relative_mahalanobis": ("RMD", None),  # -N
    "knn": ("KNN", -1.0),
    "vim": ("ViM", -1.0),
    "react": ("ReAct", -1.0),
    "ash": ("ASH", -1.0),
    "scale": ("SCALE", -1.0),  # percentile 0.85 there (a fraction), 85 here
    "dice": ("DICE", -1.0),  # p = 0.9 there, percentile 90 here
    "fdbd": ("fDBD", -1.0),
    "gradnorm": ("GradNorm", -1.0),  # param_filter = the kernel (the paper's)
    "weighted_ebo": ("WeightedEBO", -1.0),  # weights 1 there, None (energy) here
    "kl_matching": ("KLMatching", -1.0),
    "she": ("SHE", -1.0),
    "nnguide": ("NNGuide", -1.0),
    "gmm": ("GMM", -1.0),  # reg 1e-6 there, ridge 0 (pseudo-inverse) here: ~1e-6 apart
    "odin": ("ODIN", -1.0),
    "mahalanobis_pre": ("MahalanobisODIN", None),  # -2N
}
IMAGE_DETECTORS = ("odin", "mahalanobis_pre")
ODIN_EPS, MAHALANOBIS_EPS = 0.0014, 0.002


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> int:
    """Resets the process's peak RSS (Linux ``clear_refs``); returns the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def timed(fn, sync=lambda result: result, out=None, phase=""):
    """``(result, seconds, peak MB above the RSS at the start)`` of ``sync(fn())``; adds the
    process CPU seconds (all threads) to ``out["cpu_s"]`` and the three to ``out[phase + ...]``."""
    baseline = reset_peak()
    cpu, start = time.process_time(), time.perf_counter()
    result = sync(fn())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    mb = peak_above(baseline)
    if out is not None:
        out[phase + "_s"], out[phase + "_mb"] = seconds, mb
        out["cpu_s"] = out.get("cpu_s", 0.0) + cpu
    return result, seconds, mb


def peak_above(baseline: int) -> float:
    """Peak RSS (``VmHWM``) since the last reset, minus ``baseline``, in MB."""
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return max(0, peak - baseline) / 2**20


# -- data ----------------------------------------------------------------------------------------


def make_data(directory: str, args) -> None:
    rng = np.random.default_rng(0)
    d, c = args.dim, args.classes
    centers = np.abs(rng.normal(size=(c, d))).astype(np.float32) * 2
    labels = (np.arange(args.fit) % c).astype(np.int64)
    fit = np.maximum(centers[labels] + rng.normal(size=(args.fit, d)).astype(np.float32), 0)
    half = args.score // 2
    score_in = np.maximum(centers[np.arange(half) % c] + rng.normal(size=(half, d)), 0)
    score_out = np.maximum(rng.normal(size=(args.score - half, d)) * 1.5, 0)
    score = np.concatenate([score_in, score_out]).astype(np.float32)
    # A linear head that classifies (SHE needs correctly classified examples): the class centres,
    # scaled so logits differ by a few units (no softmax probability below 1e-7, where
    # pytorch-ood's GEN and entropy clamp), full rank (ViM), and a small bias.
    kernel = (centers.T / (10 * math.sqrt(d))).astype(np.float32)
    bias = (rng.normal(size=(c,)) * 0.1).astype(np.float32)
    arrays = dict(
        fit=fit, labels=labels, score=score, kernel=kernel, bias=bias,
        fit_logits=fit @ kernel + bias, score_logits=score @ kernel + bias,
        train_images=rng.normal(size=(args.images, 32, 32, 3)).astype(np.float32),
        images=rng.normal(size=(args.images, 32, 32, 3)).astype(np.float32),
        image_labels=(np.arange(args.images) % c).astype(np.int64),
        conv1=rng.normal(size=(3, 3, 3, 16)).astype(np.float32) / math.sqrt(27),
        conv1_b=np.zeros(16, np.float32),
        conv2=rng.normal(size=(3, 3, 16, 32)).astype(np.float32) / math.sqrt(144),
        conv2_b=rng.normal(size=32).astype(np.float32) * 0.1,
        dense=rng.normal(size=(32, c)).astype(np.float32) / math.sqrt(32),
        dense_b=np.zeros(c, np.float32),
    )  # fmt: skip
    for key, value in arrays.items():
        np.save(os.path.join(directory, key + ".npy"), value)


IMAGENET = dict(rows=1_281_167, queries=50_000, dim=2048, classes=1000)


def make_imagenet_data(directory: str, args) -> None:
    """``--imagenet-rows`` x 2048 non-negative features of 1000 classes and
    ``--imagenet-queries`` queries (half near a class, half shifted), float32, made in slices."""
    rng = np.random.default_rng(1)
    d, c = IMAGENET["dim"], IMAGENET["classes"]
    centers = np.abs(rng.standard_normal((c, d), dtype=np.float32)) * 2

    def rows(n, near):
        out = np.empty((n, d), np.float32)
        for start in range(0, n, 8192):
            m = min(8192, n - start)
            noise = rng.standard_normal((m, d), dtype=np.float32)
            mean = centers[(start + np.arange(m)) % c] if near else 0
            out[start : start + m] = np.maximum(mean + noise * (1 if near else 1.5), 0)
        return out

    half = args.imagenet_queries // 2
    queries = np.concatenate([rows(half, True), rows(args.imagenet_queries - half, False)])
    np.save(os.path.join(directory, "imagenet_bank.npy"), rows(args.imagenet_rows, True))
    np.save(os.path.join(directory, "imagenet_queries.npy"), queries)


def load(directory: str, *keys: str) -> list[np.ndarray]:
    return [np.load(os.path.join(directory, k + ".npy")) for k in keys]


# -- workers (one subprocess each) -----------------------------------------------------------------


def run_ours(name: str, directory: str) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from isomax_jax import detectors
    from isomax_jax.detectors import base, perturbation

    sync = jax.block_until_ready
    weights = load(directory, "conv1", "conv1_b", "conv2", "conv2_b", "dense", "dense_b")
    params = jax.tree.map(jnp.asarray, weights)

    def apply_fn(images):
        h = nn.relu(jax.lax.conv_general_dilated(images, params[0], (1, 1), ((1, 1), (1, 1)),
                    dimension_numbers=("NHWC", "HWIO", "NHWC")) + params[1])  # fmt: skip
        h = nn.relu(jax.lax.conv_general_dilated(h, params[2], (2, 2), ((1, 1), (1, 1)),
                    dimension_numbers=("NHWC", "HWIO", "NHWC")) + params[3])  # fmt: skip
        features = jnp.mean(h, axis=(1, 2))
        return features @ params[4] + params[5], features

    out: dict = {}
    if name in IMAGE_DETECTORS:
        train, images, labels = load(directory, "train_images", "images", "image_labels")
        train, images = jnp.asarray(train), jnp.asarray(images)
        fit_inputs = {"features": jax.jit(apply_fn)(train)[1], "labels": labels}
        if name == "odin":
            det = detectors.get("odin", eps=ODIN_EPS)
        else:
            det = detectors.get("mahalanobis", eps=MAHALANOBIS_EPS)
        jax.block_until_ready(fit_inputs)
        state = jax.block_until_ready(det.fit(**fit_inputs))  # compiles
        state = timed(lambda: det.fit(**fit_inputs), sync, out, "fit")[0]
        t = time.perf_counter()
        compiled = base.images_jit.lower(det, apply_fn, state, images).compile()
        out["compile_s"] = time.perf_counter() - t
        perturbation.check_images(images, det.norm_std)  # warms the eager input check
        scores = timed(lambda: det.score_images(state, apply_fn, images), sync, out, "score")[0]
    else:
        keys = ("fit", "labels", "fit_logits", "score", "score_logits", "kernel", "bias")
        fit, labels, fit_logits, score, score_logits, kernel, bias = load(directory, *keys)
        fit, fit_logits, score, score_logits, kernel, bias = jax.block_until_ready(
            [jnp.asarray(a) for a in (fit, fit_logits, score, score_logits, kernel, bias)]
        )

        def head_fn(features):
            return features @ kernel + bias[None, :]

        det = detectors.get(name)
        fit_inputs = dict(features=fit, logits=fit_logits, labels=labels, kernel=kernel, bias=bias)
        score_inputs = dict(
            features=score, logits=score_logits, head_fn=head_fn, kernel=kernel, bias=bias
        )
        t = time.perf_counter()
        state = jax.block_until_ready(det.fit(**fit_inputs))
        out["fit_first_s"] = time.perf_counter() - t
        state = timed(lambda: det.fit(**fit_inputs), sync, out, "fit")[0]
        arrays = det._prepare(state, **{k: score_inputs[k] for k in base._ARRAY_INPUTS
                                        if k in det.score_inputs})  # fmt: skip
        fn = head_fn if "head_fn" in det.score_inputs else None
        t = time.perf_counter()
        compiled = base._score_jit.lower(det, fn, state, arrays).compile()
        out["compile_s"] = time.perf_counter() - t
        scores = timed(lambda: det.score(state, **score_inputs), sync, out, "score")[0]
    out["xla_temp_mb"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    np.save(os.path.join(directory, f"ours_{name}.npy"), np.asarray(scores))
    return out


class TorchNet:
    """The PyTorch twin of ``apply_fn`` above (NCHW), built lazily so torch stays optional."""

    @staticmethod
    def build(directory: str):
        import torch

        w1, b1, w2, b2, wd, bd = load(
            directory, "conv1", "conv1_b", "conv2", "conv2_b", "dense", "dense_b"
        )

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
                self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
                self.dense = torch.nn.Linear(32, wd.shape[1])
                with torch.no_grad():
                    self.conv1.weight.copy_(torch.from_numpy(w1.transpose(3, 2, 0, 1).copy()))
                    self.conv1.bias.copy_(torch.from_numpy(b1))
                    self.conv2.weight.copy_(torch.from_numpy(w2.transpose(3, 2, 0, 1).copy()))
                    self.conv2.bias.copy_(torch.from_numpy(b2))
                    self.dense.weight.copy_(torch.from_numpy(wd.T.copy()))
                    self.dense.bias.copy_(torch.from_numpy(bd))

            def features(self, x):
                h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
                return h.mean(dim=(2, 3))

            def forward(self, x):
                return self.dense(self.features(x))

        return Net().eval()


def run_reference(name: str, directory: str) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from parity.conftest import install_torchvision_stub

    install_torchvision_stub()
    import torch
    from pytorch_ood import detector as ood

    cls = getattr(ood, REFERENCE[name][0])
    out: dict = {}
    if name in IMAGE_DETECTORS:
        train, images, labels = load(directory, "train_images", "images", "image_labels")
        net = TorchNet.build(directory)
        nchw = lambda x: torch.from_numpy(x.transpose(0, 3, 1, 2).copy())  # noqa: E731
        train, images, labels = nchw(train), nchw(images), torch.from_numpy(labels)
        with torch.no_grad():
            features = net.features(train)
        if name == "odin":
            det = cls(net, eps=ODIN_EPS, temperature=1000.0)
        else:
            det = cls(net.features, eps=MAHALANOBIS_EPS)
        fit = (lambda: None) if name == "odin" else (lambda: det.fit_features(features, labels))
        timed(fit, out=out, phase="fit")
        scores = timed(lambda: det.predict(images).detach(), out=out, phase="score")[0]
    else:
        keys = ("fit", "labels", "fit_logits", "score", "score_logits", "kernel", "bias")
        fit, labels, fit_logits, score, score_logits, kernel, bias = [
            torch.from_numpy(a) for a in load(directory, *keys)
        ]

        def head(x):
            return x.flatten(1) @ kernel + bias

        def linear():  # the head as a torch.nn.Linear (fDBD and GradNorm take a module)
            layer = torch.nn.Linear(*kernel.shape)
            with torch.no_grad():
                layer.weight.copy_(kernel.T)
                layer.bias.copy_(bias)
            return layer

        def fit_reference():
            if name in ("mahalanobis", "relative_mahalanobis", "knn", "gmm"):
                return cls(None).fit_features(fit, labels)
            if name == "vim":
                det = cls(None, d=fit.shape[1] // 2, w=kernel.T.contiguous(), b=bias)
                return det.fit_features(fit, labels)
            if name == "react":
                return cls(None, head=head).fit_feature_maps(fit, labels)
            if name in ("ash", "scale"):
                return cls(None, head=head, percentile=0.9 if name == "ash" else 0.85)
            if name == "dice":
                return cls(None, w=kernel.T.contiguous(), b=bias, p=0.9).fit_features(fit, labels)
            if name == "fdbd":
                return cls(None, linear()).fit_features(fit)
            if name == "gradnorm":
                return cls(linear(), param_filter=lambda param: param == "weight")
            if name == "weighted_ebo":
                return cls(None, weights=torch.ones(kernel.shape[1]))
            if name == "kl_matching":
                return cls(None).fit_logits(fit_logits)
            if name in ("she", "nnguide"):
                return cls(None, head=head).fit_features(fit, labels)
            return cls(None)

        def score_reference(det):
            if name in ("mahalanobis", "relative_mahalanobis", "knn", "vim", "gmm", "dice"):
                return det.predict_features(score)
            if name in ("fdbd", "she"):
                return det.predict_features(score)
            if name == "nnguide":  # queries in chunks: one call builds [queries, bank] products
                parts = [
                    det.predict_features(score[i : i + 8192]) for i in range(0, len(score), 8192)
                ]
                return torch.cat(parts)
            if name == "gradnorm":
                return det.predict(score)
            if name == "react":
                return det.predict_feature_maps(score)
            if name in ("ash", "scale"):
                return det.predict_feature_maps(score[:, :, None, None])
            return det.predict_logits(score_logits)

        with torch.no_grad():
            det = timed(fit_reference, out=out, phase="fit")[0]
            scores = timed(lambda: score_reference(det), out=out, phase="score")[0]
    np.save(os.path.join(directory, f"reference_{name}.npy"), np.asarray(scores, np.float64))
    return out


def run_ours_imagenet(k: int, directory: str) -> dict:
    import jax
    import jax.numpy as jnp

    from isomax_jax import detectors
    from isomax_jax.detectors import base

    sync = jax.block_until_ready
    bank, queries = sync(
        [jnp.asarray(a) for a in load(directory, "imagenet_bank", "imagenet_queries")]
    )
    det = detectors.get("knn", k=k)
    t = time.perf_counter()
    first = sync(det.fit(features=bank))
    out: dict = {"fit_first_s": time.perf_counter() - t}
    # `first` stays alive: the timed fit's bank is new memory, not the pages `first` freed.
    state = timed(lambda: det.fit(features=bank), sync, out, "fit")[0]
    del first
    arrays = det._prepare(state, features=queries)
    t = time.perf_counter()
    compiled = base._score_jit.lower(det, None, state, arrays).compile()
    out["compile_s"] = time.perf_counter() - t
    scores = timed(lambda: det.score(state, features=queries), sync, out, "score")[0]
    out["xla_temp_mb"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    out["state_mb"] = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    np.save(os.path.join(directory, "ours_imagenet_knn.npy"), np.asarray(scores))
    return out


def run_reference_imagenet(k: int, directory: str) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from parity.conftest import install_torchvision_stub

    install_torchvision_stub()
    import torch
    from pytorch_ood import detector as ood

    bank, queries = [
        torch.from_numpy(a) for a in load(directory, "imagenet_bank", "imagenet_queries")
    ]
    out: dict = {}
    with torch.no_grad():
        det = ood.KNN(None, k=k)
        labels = torch.zeros(len(bank), dtype=torch.int64)
        timed(lambda: det.fit_features(bank, labels), out=out, phase="fit")
        scores = timed(lambda: det.predict_features(queries), out=out, phase="score")[0]
    np.save(os.path.join(directory, "reference_imagenet_knn.npy"), np.asarray(scores, np.float64))
    return out


# -- driver --------------------------------------------------------------------------------------


def spawn(kind: str, name: str, directory: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, name, directory]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def relation_error(name: str, directory: str, args) -> float:
    ours = np.load(os.path.join(directory, f"ours_{name}.npy")).astype(np.float64)
    theirs = np.load(os.path.join(directory, f"reference_{name}.npy"))
    factor = REFERENCE[name][1]
    if factor is None:
        n = args.images if name == "mahalanobis_pre" else args.fit
        factor = {"gen": -args.classes, "relative_mahalanobis": -n}.get(name, -2.0 * n)
    expected = factor * theirs
    return float(np.max(np.abs(ours - expected)) / np.max(np.abs(expected)))


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def table_part(args, directory, names, totals, ratios) -> None:
    header = (
        f"{'detector':<21}{'fit s':>7}{'score s':>8}{'compile':>8}{'1st fit':>8}{'fit MB':>7}"
        f"{'scr MB':>7}{'XLA tmp':>8} |{'fit s':>7}{'score s':>8}{'fit MB':>7}{'scr MB':>7} |"
        f"{'speed-up':>9}{'rel.err':>8}"
    )
    print(f"{'':<21}{'isomax_jax.detectors':^53} |{'pytorch-ood 0.4.0':^29} |")
    print(header)
    print("-" * len(header))
    for name in names:
        ours = spawn("ours", name, directory)
        ours_s = ours["fit_s"] + ours["score_s"]
        line = (
            f"{name:<21}{ours['fit_s']:>7.3f}{ours['score_s']:>8.3f}{ours['compile_s']:>8.2f}"
            f"{ours.get('fit_first_s', float('nan')):>8.2f}{ours['fit_mb']:>7.0f}"
            f"{ours['score_mb']:>7.0f}{ours['xla_temp_mb']:>8.1f} |"
        )
        if REFERENCE[name][0] is None:
            print(line + f"{'(not in pytorch-ood)':^29} |", flush=True)
            continue
        ref = spawn("reference", name, directory)
        ref_s = ref["fit_s"] + ref["score_s"]
        ratios[name] = ref_s / ours_s
        totals["ours"] += ours_s
        totals["ours_compile"] += ours_s + ours["compile_s"]
        totals["reference"] += ref_s
        totals["ours_cpu"] += ours["cpu_s"]
        totals["reference_cpu"] += ref["cpu_s"]
        error = relation_error(name, directory, args)
        print(
            line + f"{ref['fit_s']:>7.3f}{ref['score_s']:>8.3f}{ref['fit_mb']:>7.0f}"
            f"{ref['score_mb']:>7.0f} |{ratios[name]:>8.2f}x{error:>8.0e}",
            flush=True,
        )
    print("-" * len(header))


def summary(totals, ratios) -> str:
    """The closing line of the feature and image detectors' table."""
    geo = math.exp(np.mean(np.log(list(ratios.values()))))
    without = [math.log(r) for n, r in ratios.items() if n != "knn"]
    note = (
        f" ({math.exp(np.mean(without)):.2f}x without KNN)" if "knn" in ratios and without else ""
    )
    ours, ref = totals["ours"], totals["reference"]
    return (
        f"total fit+score over the {len(ratios)} detectors in both: ours {ours:.2f} s "
        f"({totals['ours_compile']:.2f} s with score compilation), pytorch-ood {ref:.2f} s -> "
        f"overall {ref / ours:.2f}x ({ref / totals['ours_compile']:.2f}x with compilation); "
        f"geometric mean of per-detector speed-ups {geo:.2f}x{note}; CPU seconds: ours "
        f"{totals['ours_cpu']:.1f}, pytorch-ood {totals['reference_cpu']:.1f} "
        f"({totals['reference_cpu'] / totals['ours_cpu']:.2f}x)"
    )


def imagenet_part(args, directory) -> dict:
    """KNN at ImageNet's shapes: measured on ``--imagenet-rows``, extrapolated (module doc)."""
    rows, queries, k = args.imagenet_rows, args.imagenet_queries, args.imagenet_k
    make_imagenet_data(directory, args)
    grow = IMAGENET["rows"] / rows
    score_grow = grow * IMAGENET["queries"] / queries
    print(
        f"KNN at ImageNet's shapes, k={k}: measured on a {rows} x {IMAGENET['dim']} bank and "
        f"{queries} queries; extrapolated to {IMAGENET['rows']} x {IMAGENET['dim']} and "
        f"{IMAGENET['queries']} queries (fit and fit memory x{grow:.2f}, score x{score_grow:.1f})"
    )
    header = (
        f"{'':<13}{'fit s':>8}{'score s':>9}{'fit MB':>8}{'scr MB':>8}{'XLA tmp':>9} |"
        f"{'fit s':>8}{'fit GB':>8}{'score s':>10}{'score h':>9}"
    )
    print(f"{'':<13}{'measured':^42} |{'extrapolated to ImageNet':^35}")
    print(header)
    print("-" * len(header))
    results = {}
    for kind, label in (("ours", "isomax_jax"), ("reference", "pytorch-ood")):
        r = results[kind] = spawn(kind + "-imagenet", str(k), directory)
        r["full_fit_s"], r["full_score_s"] = r["fit_s"] * grow, r["score_s"] * score_grow
        print(
            f"{label:<13}{r['fit_s']:>8.2f}{r['score_s']:>9.2f}{r['fit_mb']:>8.0f}"
            f"{r['score_mb']:>8.0f}{r.get('xla_temp_mb', float('nan')):>9.1f} |"
            f"{r['full_fit_s']:>8.1f}{r['fit_mb'] * grow / 1024:>8.1f}"
            f"{r['full_score_s']:>10.0f}{r['full_score_s'] / 3600:>9.2f}",
            flush=True,
        )
    print("-" * len(header))
    ours, ref = results["ours"], results["reference"]
    ours_np = np.load(os.path.join(directory, "ours_imagenet_knn.npy")).astype(np.float64)
    ref_np = np.load(os.path.join(directory, "reference_imagenet_knn.npy"))
    error = float(np.max(np.abs(ours_np + ref_np)) / np.max(np.abs(ref_np)))
    ratio = (ref["full_fit_s"] + ref["full_score_s"]) / (ours["full_fit_s"] + ours["full_score_s"])
    print(
        f"KNN at ImageNet's shapes: speed-up {ratio:.2f}x (fit+score, extrapolated; score alone "
        f"{ref['score_s'] / ours['score_s']:.2f}x, fit {ref['fit_s'] / ours['fit_s']:.2f}x); CPU "
        f"seconds measured: ours {ours['cpu_s']:.1f}, pytorch-ood {ref['cpu_s']:.1f} "
        f"({ref['cpu_s'] / ours['cpu_s']:.2f}x); our state {ours['state_mb'] * grow / 1024:.1f} GB "
        f"at ImageNet scale; rel.err {error:.0e}"
    )
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="features,images,imagenet")
    parser.add_argument("--fit", type=int, default=50_000)
    parser.add_argument("--score", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--only", default="", help="comma-separated detector names")
    parser.add_argument("--imagenet-rows", type=int, default=200_000)
    parser.add_argument("--imagenet-queries", type=int, default=2_000)
    parser.add_argument("--imagenet-k", type=int, default=1000)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, name, directory = args.worker
        workers = {
            "ours": run_ours, "reference": run_reference,
            "ours-imagenet": lambda k, d: run_ours_imagenet(int(k), d),
            "reference-imagenet": lambda k, d: run_reference_imagenet(int(k), d),
        }  # fmt: skip
        print(json.dumps(workers[kind](name, directory)))
        return

    parts = args.parts.split(",")
    wanted = [n for n in REFERENCE if not args.only or n in args.only.split(",")]
    names = [n for n in wanted if ("images" if n in IMAGE_DETECTORS else "features") in parts]
    began, load_before = time.perf_counter(), load_average()
    print(f"fit {args.fit} x {args.dim} float32 ({args.classes} classes), score {args.score} rows; "
          f"image detectors: {args.images} 32x32x3 images, small conv net; CPU: "
          f"{os.cpu_count()} cores; load average {load_before}")  # fmt: skip
    totals = dict(ours=0.0, ours_compile=0.0, reference=0.0, ours_cpu=0.0, reference_cpu=0.0)
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as directory:
        if names:
            make_data(directory, args)
            table_part(args, directory, names, totals, ratios)
        if ratios:
            print(summary(totals, ratios))
        if "imagenet" in parts and (not args.only or "knn" in args.only.split(",")):
            imagenet_part(args, directory)
    minutes, seconds = divmod(time.perf_counter() - began, 60)
    print(
        f"{int(minutes)} min {seconds:.0f} s in all; load average before {load_before}, after "
        f"{load_average()} (2 cores: above ~2, other jobs shared the CPU)"
    )


if __name__ == "__main__":
    main()
