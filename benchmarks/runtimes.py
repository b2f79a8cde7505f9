"""The backbone's precision and runtime, side by side with anomalib's OpenVINO route.

Example (the figures in docs/performance.md)::

    python benchmarks/runtimes.py --anomalib-python /work/venv-anomalib/bin/python \
        --out docs/benchmark-results/runtimes-resnet18-d100-224-cpu

In one process, for each backbone setting (``precision`` x ``runtime``) of
``Pipeline([PatchFeatureTransformer, PadimDetector])``, ResNet-18, d=100, 224 px, batch
32, random weights (speed does not depend on their values), uint8 images in memory:

- scoring: ``decision_function`` on ``--n-test`` images, images/s, median of
  ``--repeats`` rounds in which every setting and the bare backbone (torchvision's
  ResNet-18 truncated after ``layer3``, eager float32, preprocessed batches) run in turn,
  after a warm-up; and PaDiM's own share of it (the detector on the features, timed
  alone);
- fit: ``--n-train`` images, the transformer already fitted and warm (its compilation,
  timed apart, is excluded): ``transform`` then ``PadimDetector.fit`` (statistics,
  factorisation, held-out thresholds);
- the maps' largest relative difference from float32 eager.

In the same rounds, anomalib's deployment route, in ``--anomalib-python`` (an interpreter where
anomalib and openvino import), with the same images: ``PadimModel`` (ResNet-18, the
same layers, d=100) fitted on the training images, exported to ONNX and run by OpenVINO
with its CPU defaults (bf16 on CPUs with AMX), uint8 -> float conversion included, as
anomalib's ``OpenVINOInferencer`` feeds it (a child process that fits and compiles once,
then runs the test images once per round); and sk-padim's own ``export_onnx`` file run
by OpenVINO the same way. Settings that cannot run here (bfloat16 where the CPU
emulates it: several times slower than float32) are listed with the reason.

``--accuracy`` measures instead what each precision and runtime costs in accuracy: image
and pixel AUROC on the built-in data (``make_defect_textures``: crops of scikit-image's
texture photographs with synthetic defects), EfficientNet-Lite0 with its ImageNet
weights (the ``lite`` extra), every setting including emulated bfloat16 (slow, but
its numbers are the hardware's)::

    python benchmarks/runtimes.py --accuracy --out docs/benchmark-results/runtimes-accuracy
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_data import synthetic_images

CHILD_FLAG = "--anomalib-child"


def seconds_of(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def settings(include_emulated: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """The (precision, runtime) pairs to measure here, and notes on those left out."""
    from sk_padim.core.runtimes import native_reduced_precision, openvino_available

    native = native_reduced_precision(torch.device("cpu")) is not None
    pairs, notes = [("float32", "eager")], []
    if native or include_emulated:
        pairs.append(("bfloat16", "eager"))
    else:
        notes.append(
            "bfloat16 eager left out: this CPU has no AMX or AVX512-BF16, bfloat16 is "
            "emulated (several times slower than float32); precision='auto' is float32 here"
        )
    if openvino_available():
        pairs.append(("auto", "openvino"))
    else:
        notes.append("openvino left out: the openvino package is not installed")
    return pairs, notes


def bare_backbone(image_size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """torchvision's ResNet-18 cut after layer3, eager float32, and a preprocessed batch."""
    import torchvision

    from sk_padim.core.backbones import TruncatedBackbone

    model = torchvision.models.resnet18(weights=None).eval()
    probe = torch.zeros(1, 3, image_size, image_size)
    truncated = TruncatedBackbone(model, ("layer1", "layer2", "layer3"), probe)
    return truncated.to(memory_format=torch.channels_last), probe


def backbone_runner(feat, precision: str, runtime: str) -> torch.nn.Module:
    """The fitted transformer's backbone as the setting runs it (batch norms folded)."""
    from sk_padim.core.runtimes import AutocastBackbone, OpenVinoBackbone, backbone_setting

    setting = backbone_setting(precision, runtime, torch.device("cpu"), strict=True)
    if setting.runtime == "openvino":
        probe = torch.zeros(1, 3, *feat.image_size_)
        return OpenVinoBackbone(feat.backbone_, probe, setting.dtype)
    if setting.dtype != torch.float32:
        return AutocastBackbone(feat.backbone_, setting.dtype)
    return feat.backbone_


def timed_on(runner, pixels: torch.Tensor, n_images: int):
    """A function timing ``runner`` on ``pixels``, scaled to ``n_images`` images."""

    def seconds() -> float:
        with torch.inference_mode():
            return seconds_of(lambda: runner(pixels)) * n_images / len(pixels)

    return seconds


def fitted_pipeline(precision: str, runtime: str, train, args) -> dict:
    """A fitted pipeline of one setting, with its compile and fit times."""
    from sklearn.pipeline import Pipeline

    from sk_padim import PadimDetector, PatchFeatureTransformer

    feat = PatchFeatureTransformer(
        weights=None,
        n_features=args.n_features,
        image_size=args.image_size,
        batch_size=args.batch_size,
        device="cpu",
        random_state=0,
        precision=precision,
        runtime=runtime,
    ).fit()
    compile_s = seconds_of(lambda: feat.transform(train[:1]))  # builds the runtime once
    detector = PadimDetector(device="cpu")
    fit_s = seconds_of(lambda: detector.fit(feat.transform(train)))
    return {
        "pipe": Pipeline([("feat", feat), ("padim", detector)]),
        "compile_s": compile_s,
        "fit_s": fit_s,
    }


def measure_rounds(models: dict, backbone, others: dict, test, args) -> dict:
    """Median images/s of the bare backbone, each model's scoring and each of ``others``
    (name -> a function timing one run over the test images), in interleaved rounds."""
    batch = test[: args.batch_size]
    pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    rates: dict[str, list[float]] = {"bare backbone": []}
    own: dict[str, list[float]] = {}
    for name, model in models.items():
        model["pipe"].decision_function(batch)  # warm-up
        rates[name], own[name] = [], []
    rates.update({name: [] for name in others})
    with torch.inference_mode():
        backbone(pixels)
    for _ in range(args.repeats):
        with torch.inference_mode():
            rates["bare backbone"].append(len(batch) / seconds_of(lambda: backbone(pixels)))
        for name, model in models.items():
            pipe = model["pipe"]
            scoring_s = seconds_of(lambda pipe=pipe: pipe.decision_function(test))
            rates[name].append(len(test) / scoring_s)
            features = pipe[0].transform(batch)
            own_s = seconds_of(lambda pipe=pipe, f=features: pipe[1].decision_function(f))
            own[name].append(own_s / len(batch))
        for name, timed in others.items():
            rates[name].append(len(test) / timed())
    return {
        "rates": {name: statistics.median(values) for name, values in rates.items()},
        "own_s_per_image": {name: statistics.median(values) for name, values in own.items()},
        "rounds": rates,
    }


def map_errors(models: dict, test) -> dict:
    """Largest relative difference of each model's maps from float32 eager's."""
    exact = models["float32 eager"]["pipe"].score_samples(test)
    scale = np.abs(exact).max()
    return {
        name: float(np.abs(model["pipe"].score_samples(test) - exact).max() / scale)
        for name, model in models.items()
    }


def exported_with_openvino(pipe, test, args):
    """sk-padim's export_onnx file compiled by OpenVINO with its CPU defaults: a function
    that runs it on the test images, and its maps' error."""
    import openvino as ov

    from sk_padim import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "padim.onnx"
        export_onnx(pipe, path)
        compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU")
    name = compiled.inputs[0].get_any_name()
    batches = [test[i : i + args.batch_size] for i in range(0, len(test), args.batch_size)]

    def run():
        request = compiled.create_infer_request()
        return [request.infer({name: batch}) for batch in batches]

    maps = np.concatenate([list(result.values())[0] for result in run()])
    exact = pipe.score_samples(test)
    error = float(np.abs(maps.reshape(exact.shape) - exact).max() / np.abs(exact).max())
    return run, error


def anomalib_child(spec: dict) -> dict:
    """anomalib's PadimModel -> ONNX -> OpenVINO (CPU defaults); run in anomalib's Python."""
    import openvino as ov
    from anomalib.models.image.padim.torch_model import PadimModel

    torch.manual_seed(0)
    train = np.load(spec["train"])
    test = np.load(spec["test"])
    batch_size = spec["batch_size"]
    model = PadimModel(backbone="resnet18", pre_trained=False, n_features=spec["n_features"])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    class Deployed(torch.nn.Module):  # pixels in [0, 1] -> (scores, maps), as exported
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixels):
            result = self.model((pixels - mean) / std)
            return result.pred_score, result.anomaly_map

    def as_pixels(images):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255

    model.train()
    embeddings = []
    with torch.no_grad():
        for start in range(0, len(train), batch_size):
            embeddings.append(model((as_pixels(train[start : start + batch_size]) - mean) / std))
        model.gaussian.fit(torch.cat(embeddings))
    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "padim.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Deployed().eval(),
                (as_pixels(test[:1]),),
                path,
                input_names=["input"],
                dynamic_axes={"input": {0: "batch"}},
                dynamo=False,
            )
        compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU")
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    batches = [test[i : i + batch_size] for i in range(0, len(test), batch_size)]

    def run():
        request = compiled.create_infer_request()
        for batch in batches:  # as anomalib's inferencer: uint8 HWC -> float NCHW in [0, 1]
            pixels = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) / 255
            request.infer({"input": pixels})

    run()
    print(json.dumps({"precision": precision}), flush=True)
    for _ in sys.stdin:  # one timed run per line the parent sends: rounds stay interleaved
        print(json.dumps({"seconds": seconds_of(run)}), flush=True)


class AnomalibRoute:
    """anomalib's route in a child process (its own interpreter), timed on request.

    The child fits and compiles once, then runs the test images once per :meth:`seconds`
    call, so that its runs are interleaved with the others' round by round.
    """

    def __init__(self, python: str, train, test, args):
        self.folder = tempfile.TemporaryDirectory()
        spec = {
            "train": str(Path(self.folder.name) / "train.npy"),
            "test": str(Path(self.folder.name) / "test.npy"),
            "batch_size": args.batch_size,
            "n_features": args.n_features,
        }
        np.save(spec["train"], train)
        np.save(spec["test"], test)
        self.child = subprocess.Popen(
            [python, __file__, CHILD_FLAG, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.precision = self._answer()["precision"]

    def _answer(self) -> dict:
        line = self.child.stdout.readline()
        if not line:
            raise RuntimeError("anomalib's child process stopped (does anomalib import there?)")
        return json.loads(line)

    def seconds(self) -> float:
        self.child.stdin.write("run\n")
        self.child.stdin.flush()
        return self._answer()["seconds"]

    def close(self) -> None:
        self.child.stdin.close()
        self.child.wait(timeout=60)
        self.folder.cleanup()


def markdown(result: dict) -> str:
    rows = result["settings"]
    bare = result["rates"]["bare backbone"]
    base = rows["float32 eager"]
    lines = [
        f"ResNet-18, d={result['n_features']}, {result['image_size']} px, batch "
        f"{result['batch_size']}, {result['threads']} threads, {result['n_test']} test / "
        f"{result['n_train']} training images; {result['machine']}",
        "",
        "| route | scoring, images/s | vs float32 eager | vs anomalib + OpenVINO | fit, s "
        "(vs float32 eager) | compile, s | PaDiM's own share of scoring | maps' relative "
        "error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    anomalib = result["rates"].get("anomalib")

    def versus(rate):
        return f"{rate / anomalib:.2f}x" if anomalib else "n/a"

    for name, row in rows.items():
        rate = result["rates"][name]
        lines.append(
            f"| sk-padim {name} | {rate:.1f} | {rate / result['rates']['float32 eager']:.2f}x | "
            f"{versus(rate)} | {row['fit_s']:.2f} ({base['fit_s'] / row['fit_s']:.2f}x) | "
            f"{row['compile_s']:.2f} | {row['own_s_per_image'] * rate:.2f} | "
            f"{row['map_error']:.1e} |"
        )
    if "exported" in result["rates"]:
        rate = result["rates"]["exported"]
        lines.append(
            f"| sk-padim `export_onnx` file, OpenVINO defaults | {rate:.1f} | "
            f"{rate / result['rates']['float32 eager']:.2f}x | {versus(rate)} | | | | "
            f"{result['exported_map_error']:.1e} |"
        )
    if anomalib:
        lines.append(
            f"| anomalib `PadimModel` -> ONNX -> OpenVINO defaults "
            f"({result['anomalib_precision']}) | {anomalib:.1f} | "
            f"{anomalib / result['rates']['float32 eager']:.2f}x | 1.00x | | | | |"
        )
    lines.append(f"| bare backbone (torchvision, eager float32) | {bare:.1f} | | | | | | |")
    for name, rate in result["rates"].items():
        if name.startswith("backbone alone"):
            lines.append(f"| {name} (batch norms folded) | {rate:.1f} | | | | | | |")
    lines += ["", *[f"- {note}" for note in result["notes"]]]
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    from sk_padim.core.runtimes import native_reduced_precision

    torch.set_num_threads(args.threads)
    train = synthetic_images(args.n_train, args.image_size, seed=0)
    test = synthetic_images(args.n_test, args.image_size, seed=1)
    pairs, notes = settings(args.include_emulated)
    models = {f"{p} {r}": fitted_pipeline(p, r, train, args) for p, r in pairs}
    backbone, _ = bare_backbone(args.image_size)
    others, result = {}, {"notes": notes}
    pixels = torch.from_numpy(test[: args.batch_size]).permute(0, 3, 1, 2).float().div(255)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    for (precision, runtime), model in zip(pairs, models.values(), strict=True):
        runner = backbone_runner(model["pipe"][0], precision, runtime)
        others[f"backbone alone, {precision} {runtime}"] = timed_on(runner, pixels, len(test))
    if any(runtime == "openvino" for _, runtime in pairs):
        run_exported, error = exported_with_openvino(models["float32 eager"]["pipe"], test, args)
        others["exported"] = lambda: seconds_of(run_exported)
        result["exported_map_error"] = error
    anomalib = None
    if args.anomalib_python:
        anomalib = AnomalibRoute(args.anomalib_python, train, test, args)
        others["anomalib"] = anomalib.seconds
        result["anomalib_precision"] = anomalib.precision
    else:
        notes.append("anomalib left out: pass --anomalib-python")
    try:
        measured = measure_rounds(models, backbone, others, test, args)
    finally:
        if anomalib is not None:
            anomalib.close()
    errors = map_errors(models, test)
    native = native_reduced_precision(torch.device("cpu"))
    result.update(
        {
            "n_features": args.n_features,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "n_train": args.n_train,
            "n_test": args.n_test,
            "machine": f"{platform.processor() or platform.machine()}, torch "
            f"{torch.__version__}, native reduced precision: {native}",
            "rates": measured["rates"],
            "rounds": measured["rounds"],
            "settings": {
                name: {
                    "compile_s": model["compile_s"],
                    "fit_s": model["fit_s"],
                    "own_s_per_image": measured["own_s_per_image"][name],
                    "map_error": errors[name],
                }
                for name, model in models.items()
            },
        }
    )
    return result


ACCURACY_SETTINGS = [("float32", "eager"), ("bfloat16", "eager"), ("float32", "openvino")]


def accuracy(args) -> dict:
    """Image and pixel AUROC per category and setting on the built-in textures."""
    from sk_padim import image_auroc, make_defect_textures, pixel_auroc
    from sk_padim.core.runtimes import openvino_available
    from sk_padim.evaluation import padim_pipeline

    torch.set_num_threads(args.threads)
    dataset = make_defect_textures(
        ["brick", "grass", "gravel"],
        image_size=args.accuracy_size,
        n_train=40,
        n_test_good=30,
        n_test_defective=30,
        random_state=0,
    )
    pairs = [(p, r) for p, r in ACCURACY_SETTINGS if r != "openvino" or openvino_available()]
    table = {}
    for name, data in dataset.items():
        for precision, runtime in pairs:
            pipe = padim_pipeline(
                backbone="efficientnet_lite0",
                image_size=args.accuracy_size,
                device="cpu",
                precision=precision,
                runtime=runtime,
            ).fit(data.X_train)
            maps = pipe.score_samples(data.X_test)
            table.setdefault(name, {})[f"{precision} {runtime}"] = {
                "image_auroc": image_auroc(data.y_test, maps.max(axis=(1, 2))),
                "pixel_auroc": pixel_auroc(data.masks_test, maps),
                "maps": maps,
            }
    for rows in table.values():
        exact = rows["float32 eager"]["maps"]
        for row in rows.values():
            row["map_error"] = float(np.abs(row.pop("maps") - exact).max() / np.abs(exact).max())
    return {"image_size": args.accuracy_size, "categories": table}


def accuracy_markdown(result: dict) -> str:
    lines = [
        f"EfficientNet-Lite0 (ImageNet weights), d=100, {result['image_size']} px, built-in "
        "textures (40 training, 30 good and 30 defective test images per category)",
        "",
        "| category | setting | image AUROC | pixel AUROC | change from float32 eager "
        "(image / pixel) | maps' relative error |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for category, rows in result["categories"].items():
        exact = rows["float32 eager"]
        for name, row in rows.items():
            lines.append(
                f"| {category} | {name} | {row['image_auroc']:.4f} | {row['pixel_auroc']:.4f} | "
                f"{row['image_auroc'] - exact['image_auroc']:+.4f} / "
                f"{row['pixel_auroc'] - exact['pixel_auroc']:+.4f} | {row['map_error']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        print(json.dumps(anomalib_child(json.loads(argv[1]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--include-emulated",
        action="store_true",
        help="measure bfloat16 even where the CPU emulates it",
    )
    parser.add_argument("--anomalib-python", help="an interpreter where anomalib imports")
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="AUROC of each setting on the built-in data instead of speed",
    )
    parser.add_argument("--accuracy-size", type=int, default=128)
    parser.add_argument(
        "--out", default="benchmarks/results/runtimes", help="writes OUT.md and OUT.json"
    )
    args = parser.parse_args(argv)
    result = accuracy(args) if args.accuracy else run(args)
    table = accuracy_markdown(result) if args.accuracy else markdown(result)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
