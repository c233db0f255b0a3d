"""Benchmark: isomax_jax.detectors vs pytorch-ood 0.4.0 on the same arrays, side by side (CPU).

Run:  python benchmarks/bench_detectors.py [--fit 50000] [--score 100000] [--dim 512]
      [--classes 10] [--only knn,vim] [--images 2048]

1. Feature/logit detectors: fit on ``--fit`` x ``--dim`` float32 features (``--classes`` classes,
   non-negative like pooled ReLU features) and their linear-head logits, score ``--score`` rows
   (half in-distribution-like, half shifted), for every detector both libraries implement; ours
   alone for ``mmls``/``mmles`` (not in pytorch-ood).
2. Input perturbation (ODIN; Mahalanobis with input pre-processing): a small conv net
   (conv 3->16, conv 16->32 stride 2, mean pool, dense 32->classes) on ``--images`` 32x32x3
   images, a Flax model and its PyTorch twin with the same weights.

Each (library, detector) runs in its own subprocess, so its peak resident memory is its own:
"peak MB" is the process's peak RSS minus its RSS once the arrays are loaded (JAX: on device;
torch: ``from_numpy``). For ours the XLA temporary buffer size of the compiled score
(``memory_analysis().temp_size_in_bytes``) is printed too. Times: ours ``fit`` is the second call
(the first, with compilation, is printed apart), ``score`` is one call after AOT compilation
(compile time printed apart); pytorch-ood has no compilation, one call each. The closing lines give
the overall ratio of summed fit+score times (detectors both implement) and the geometric mean of
per-detector ratios, and a sanity check: each score pair agrees under the documented relation
(``docs/detectors.md``) up to float32 rounding.
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


def timed(fn, sync=lambda result: result):
    """``(result, seconds, peak MB above the RSS at the start)`` of ``sync(fn())``."""
    baseline = reset_peak()
    start = time.perf_counter()
    result = sync(fn())
    return result, time.perf_counter() - start, peak_above(baseline)


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
    kernel = (rng.normal(size=(d, c)) / math.sqrt(d)).astype(np.float32)
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
        state, out["fit_s"], out["fit_mb"] = timed(lambda: det.fit(**fit_inputs), sync)
        t = time.perf_counter()
        compiled = base.images_jit.lower(det, apply_fn, state, images).compile()
        out["compile_s"] = time.perf_counter() - t
        perturbation.check_images(images, det.norm_std)  # warms the eager input check
        scores, out["score_s"], out["score_mb"] = timed(
            lambda: det.score_images(state, apply_fn, images), sync
        )
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
        state, out["fit_s"], out["fit_mb"] = timed(lambda: det.fit(**fit_inputs), sync)
        arrays = det._prepare(state, **{k: score_inputs[k] for k in base._ARRAY_INPUTS
                                        if k in det.score_inputs})  # fmt: skip
        fn = head_fn if "head_fn" in det.score_inputs else None
        t = time.perf_counter()
        compiled = base._score_jit.lower(det, fn, state, arrays).compile()
        out["compile_s"] = time.perf_counter() - t
        scores, out["score_s"], out["score_mb"] = timed(
            lambda: det.score(state, **score_inputs), sync
        )
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
        _, out["fit_s"], out["fit_mb"] = timed(fit)
        scores, out["score_s"], out["score_mb"] = timed(lambda: det.predict(images).detach())
    else:
        keys = ("fit", "labels", "fit_logits", "score", "score_logits", "kernel", "bias")
        fit, labels, _, score, score_logits, kernel, bias = [
            torch.from_numpy(a) for a in load(directory, *keys)
        ]

        def head(x):
            return x.flatten(1) @ kernel + bias

        def fit_reference():
            if name in ("mahalanobis", "relative_mahalanobis", "knn"):
                return cls(None).fit_features(fit, labels)
            if name == "vim":
                det = cls(None, d=fit.shape[1] // 2, w=kernel.T.contiguous(), b=bias)
                return det.fit_features(fit, labels)
            if name == "react":
                return cls(None, head=head).fit_feature_maps(fit, labels)
            if name == "ash":
                return cls(None, head=head, percentile=0.9)
            return cls(None)

        def score_reference(det):
            if name in ("mahalanobis", "relative_mahalanobis", "knn", "vim"):
                return det.predict_features(score)
            if name == "react":
                return det.predict_feature_maps(score)
            if name == "ash":
                return det.predict_feature_maps(score[:, :, None, None])
            return det.predict_logits(score_logits)

        with torch.no_grad():
            det, out["fit_s"], out["fit_mb"] = timed(fit_reference)
            scores, out["score_s"], out["score_mb"] = timed(lambda: score_reference(det))
    np.save(os.path.join(directory, f"reference_{name}.npy"), np.asarray(scores, np.float64))
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=int, default=50_000)
    parser.add_argument("--score", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--only", default="", help="comma-separated detector names")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, name, directory = args.worker
        out = (run_ours if kind == "ours" else run_reference)(name, directory)
        print(json.dumps(out))
        return

    names = [n for n in REFERENCE if not args.only or n in args.only.split(",")]
    print(f"fit {args.fit} x {args.dim} float32 ({args.classes} classes), score {args.score} rows; "
          f"image detectors: {args.images} 32x32x3 images, small conv net; CPU: "
          f"{os.cpu_count()} cores")  # fmt: skip
    header = (
        f"{'detector':<21}{'fit s':>7}{'score s':>8}{'compile':>8}{'1st fit':>8}{'fit MB':>7}"
        f"{'scr MB':>7}{'XLA tmp':>8} |{'fit s':>7}{'score s':>8}{'fit MB':>7}{'scr MB':>7} |"
        f"{'speed-up':>9}{'rel.err':>8}"
    )
    print(f"{'':<21}{'isomax_jax.detectors':^53} |{'pytorch-ood 0.4.0':^29} |")
    print(header)
    print("-" * len(header))
    totals = {"ours": 0.0, "ours_compile": 0.0, "reference": 0.0}
    ratios = []
    with tempfile.TemporaryDirectory() as directory:
        make_data(directory, args)
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
            ratio = ref_s / ours_s
            ratios.append(ratio)
            totals["ours"] += ours_s
            totals["ours_compile"] += ours_s + ours["compile_s"]
            totals["reference"] += ref_s
            error = relation_error(name, directory, args)
            print(
                line + f"{ref['fit_s']:>7.3f}{ref['score_s']:>8.3f}{ref['fit_mb']:>7.0f}"
                f"{ref['score_mb']:>7.0f} |{ratio:>8.2f}x{error:>8.0e}",
                flush=True,
            )
    print("-" * len(header))
    print(
        f"total fit+score over the {len(ratios)} detectors in both: ours {totals['ours']:.2f} s "
        f"({totals['ours_compile']:.2f} s with score compilation), pytorch-ood "
        f"{totals['reference']:.2f} s -> overall {totals['reference'] / totals['ours']:.2f}x "
        f"({totals['reference'] / totals['ours_compile']:.2f}x with compilation); geometric mean "
        f"of per-detector speed-ups {math.exp(np.mean(np.log(ratios))):.2f}x"
    )


if __name__ == "__main__":
    main()
