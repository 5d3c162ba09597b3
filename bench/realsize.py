"""Real-size benchmark: every phiconvert target and its anchor tool at the same settings, on the shapes of real Phi
models, in one job. Prints one table and writes it as JSON.

    python bench/realsize.py --shape phi4-mini [--targets openvino,gguf:q4_k_m,...] [--verify quick]
                             [--workdir DIR] [--llama-cpp DIR] [--json realsize.json] [--no-anchors [TARGETS]]
                             [--option awq:--no-clip ...]

The checkpoint is built on the fly (``bench/shapes.py``: random bf16 weights, the real vocabulary size) and kept in
the work folder for the next run. Each command runs as its own process tree: wall time, and peak RSS of its
largest process from the kernel's accounting (``wait4``), and the bytes it wrote. phiconvert's own report adds
each stage's time and peak (export, reference, the artifact's logits). Random weights make fidelity meaningless:
the verification's time and memory are measured, its verdict is not judged (every quantized artifact of random
weights fails its bound, and phiconvert still prints the whole report).

Anchors, at the settings phiconvert's report says it used: optimum-cli (openvino), the onnxruntime-genai model
builder (ort-genai), mlx_lm.convert (mlx), llama.cpp's convert_hf_to_gguf.py + its quantizer (gguf; needs a
llama.cpp source tree, ``--llama-cpp``: the llama-cpp-python sdist's vendor/llama.cpp is one), AutoRound's
round-to-nearest to the GPTQ/AWQ formats (gptq, awq; in the managed environment), transformers' own quantized
load and save with phiconvert's torchao configs (torchao); none for bnb and executorch, whose exports are their
toolchain's own route. ``--no-anchors ort-genai`` leaves out one anchor (the builder's ``k_quant_mixed`` is killed
by the OOM killer on Phi-4-mini's shape here). One job at a time: on a 24 GiB machine two would measure each other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from phiconvert import targets

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

GiB = 2**30


def measure(command: list[str], log: Path, stdout: Path | None = None) -> dict:
    """Run ``command`` to completion: wall seconds, peak RSS of its largest process (bytes), exit code."""
    start = time.perf_counter()
    with log.open("w") as err, (stdout or log).open("a" if stdout is None else "w") as out:
        try:
            process = subprocess.Popen(command, stdout=out, stderr=err)
        except OSError as error:  # a tool that is not there: a row that says so, not a lost job
            err.write(f"{error}\n")
            return {"seconds": 0.0, "peak_rss": 0, "code": 127}
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": time.perf_counter() - start, "peak_rss": usage.ru_maxrss * 1024, "code": process.returncode}


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def phiconvert_run(checkpoint: Path, target: str, precision: str | None, verify: str, work: Path, flags: list) -> dict:
    """phiconvert itself: the whole run, and its report's stages (its JSON is printed even when it fails); ``flags``
    are the target's own options (``--option``), which the anchor reads back from the report's settings."""
    out = work / f"phiconvert-{target}-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "phiconvert", str(checkpoint), "--target", target, "--output", str(out),
               "--verify", verify, "--json", *flags] + (["--precision", precision] if precision else [])  # fmt: skip
    log, printed = work / f"phiconvert-{target}-{precision}.log", work / f"phiconvert-{target}-{precision}.json"
    result = measure(command, log, printed)
    report, error = None, None
    try:
        found = json.loads(printed.read_text())
        report, error = found.get("report", found if "target" in found else None), found.get("error")
    except json.JSONDecodeError:
        lines = log.read_text().strip().splitlines()
        error = lines[-1] if lines else f"exit code {result['code']}"
    result.update(output_bytes=folder_bytes(out), report=report, error=error, log=str(log))
    shutil.rmtree(out, ignore_errors=True)
    return result


def stage(report: dict | None, *names: str) -> dict:
    """Seconds (summed) and peak RSS (max) of the report's stages whose names start with one of ``names``."""
    found = [s for s in (report or {}).get("stages", []) if s["stage"].startswith(names)]
    if not found:
        return {"seconds": None, "peak_rss": None}
    return {"seconds": sum(s["seconds"] for s in found), "peak_rss": max(s["peak_rss"] or 0 for s in found)}


# Each anchor: the tool a user would otherwise run, as command lines at the settings phiconvert's report recorded
# (``report["details"]["settings"]``); LookupError when it cannot run here. One function per target, in ANCHORS.


def settings_of(report: dict) -> dict:
    return report.get("details", {}).get("settings", {})


def openvino_anchor(report: dict, checkpoint: Path, out: Path, llama_cpp: Path | None) -> list:
    settings, weight = settings_of(report), report["precision"]
    command = [str(Path(sys.executable).parent / "optimum-cli"), "export", "openvino", "--model", str(checkpoint),
               "--task", "text-generation-with-past", "--weight-format", weight]  # fmt: skip
    if weight == "int4":
        command += ["--group-size", str(settings["group_size"]), "--ratio", str(settings.get("ratio", 1.0))]
        command += ["--sym"] if settings.get("sym") else []
        command += ["--awq"] if settings.get("awq") else []
        command += ["--scale-estimation"] if settings.get("scale_estimation") else []
        command += ["--dataset", "auto"] if settings.get("calibration_samples") else []
    return [[*command, str(out)]]


def ort_genai_anchor(report: dict, checkpoint: Path, out: Path, llama_cpp: Path | None) -> list:
    details = report.get("details", {})
    options = details.get("anchor_builder_options", details.get("builder_options", []))
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out), "-p",
               report["precision"], "-e", settings_of(report).get("ep", "cpu"), "-c", str(out) + "-cache"]  # fmt: skip
    return [[*command, "--extra_options", *options] if options else command]


def mlx_anchor(report: dict, checkpoint: Path, out: Path, llama_cpp: Path | None) -> list:
    settings = settings_of(report)
    command = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(checkpoint), "--mlx-path", str(out)]
    if settings.get("bits"):
        command += ["-q", "--q-bits", str(settings["bits"]), "--q-group-size", str(settings["group_size"])]
    return [command]


def gguf_anchor(report: dict, checkpoint: Path, out: Path, llama_cpp: Path | None) -> list:
    if llama_cpp is None:
        raise LookupError("pass --llama-cpp DIR (a llama.cpp source tree) for llama.cpp's own route")
    python, f16 = sys.executable, str(out) + "-f16.gguf"
    # llama.cpp names a BPE pre-tokenizer by hashing how it splits a test text; the benchmark's synthetic tokenizer
    # hashes to nothing it knows, so it is named as the real Phi-4-mini's is (the tokenizer's share of the
    # conversion's time and memory is negligible)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[1:]; import convert_hf_to_gguf as c, "
        "conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-4o'; c.main()"
    )
    convert = [python, "-c", code, str(llama_cpp), str(checkpoint), "--outtype", "f16", "--outfile", f16]
    ftype = "LLAMA_FTYPE_MOSTLY_" + report["precision"].upper()
    quantize = [python, "-c", "import ctypes, sys, llama_cpp as l; p = l.llama_model_quantize_default_params(); "
                f"p.ftype = l.{ftype}; p.nthread = {os.cpu_count()}; "
                "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))",
                f16, str(out) + ".gguf"]  # fmt: skip
    return [convert, quantize] if ftype.endswith(("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")) else [convert]


def autoround_anchor(fmt: str, report: dict, checkpoint: Path, out: Path, llama_cpp: Path | None) -> list:
    """AutoRound's round-to-nearest to ``fmt`` (gptq, awq), in the managed environment where AutoRound lives."""
    from phiconvert import envs

    managed, settings = envs.python("gptq"), settings_of(report)
    if managed is None:
        raise LookupError("AutoRound lives in the managed environment: phiconvert setup gptq")
    code = ("import sys; from auto_round import AutoRound; AutoRound(sys.argv[1], scheme='W4A16', iters=0, "
            f"group_size={settings.get('group_size', 128)}, sym={bool(settings.get('sym', True))}, "
            "device_map='cpu', enable_torch_compile=False, disable_opt_rtn=True)"
            f".quantize_and_save(sys.argv[2], format='{fmt}')")  # fmt: skip
    return [[str(managed), "-c", code, str(checkpoint), str(out)]]


def torchao_anchor(report: dict, checkpoint: Path, out: Path, llama_cpp: Path | None) -> list:
    # transformers' own quantize-on-load and save, with phiconvert's configs, from an untied copy (made before the
    # timing: transformers would quantize a tied head as the embedding)
    chosen = {k: v for k, v in report.get("options", {}).items() if k in ("group_size", "sym")}
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; from phiconvert.targets import "
            f"torchao; c = torchao.quantization_config(torchao.settings({chosen!r})); AutoModelForCausalLM"
            ".from_pretrained(sys.argv[1], dtype=torch.float32, device_map='cpu', quantization_config=c)"
            ".save_pretrained(sys.argv[2])")  # fmt: skip
    return [[sys.executable, "-c", code, str(untied(checkpoint, Path(str(out) + "-untied"))), str(out)]]


ANCHORS = {
    "openvino": openvino_anchor,  # optimum-cli
    "ort-genai": ort_genai_anchor,  # the onnxruntime-genai model builder
    "mlx": mlx_anchor,  # mlx_lm.convert
    "gguf": gguf_anchor,  # llama.cpp's convert_hf_to_gguf.py + its quantizer
    "gptq": partial(autoround_anchor, "auto_gptq"),
    "awq": partial(autoround_anchor, "auto_awq"),
    "torchao": torchao_anchor,  # transformers' quantize-on-load
}
NO_ANCHOR = {
    "bnb": "no anchor: bnb's export is transformers' own quantized load and save",
    "executorch": "no anchor: phiconvert runs ExecuTorch's own export_llama",
}


def untied(checkpoint: Path, folder: Path) -> Path:
    """``checkpoint`` with its LM head a tensor of its own (the embedding's bytes) where the two are tied: links to
    its files, one file for the head, an index and a config that say so."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((checkpoint / "config.json").read_text())
    if not config.get("tie_word_embeddings"):
        return checkpoint
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    weight_map = {}
    for item in checkpoint.iterdir():
        if item.suffix == ".safetensors":  # linked under another name: a lone model.safetensors is read first
            (folder / f"source-{item.name}").symlink_to(item.resolve())
            weight_map |= dict.fromkeys(_header(item), f"source-{item.name}")
        elif item.name not in ("config.json", "model.safetensors.index.json"):
            (folder / item.name).symlink_to(item.resolve())
    embedding = next(name for name in weight_map if name.endswith("embed_tokens.weight"))
    with safe_open(str(folder / weight_map[embedding]), framework="pt") as handle:
        save_file({"lm_head.weight": handle.get_tensor(embedding)}, str(folder / "lm_head.safetensors"))
    weight_map["lm_head.weight"] = "lm_head.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))
    return folder


def anchor_run(target: str, report: dict | None, checkpoint: Path, work: Path, llama_cpp: Path | None) -> dict:
    if not report:
        return {"skipped": "phiconvert produced no report to take the settings from"}
    if target not in ANCHORS:
        return {"skipped": NO_ANCHOR.get(target, f"no anchor for {target}")}
    out = work / f"anchor-{target}"
    try:
        commands = ANCHORS[target](report, checkpoint, out, llama_cpp)
    except LookupError as why:
        return {"skipped": str(why)}
    total = {"seconds": 0.0, "peak_rss": 0, "code": 0, "commands": [" ".join(c) for c in commands]}
    for i, command in enumerate(commands):
        step = measure(command, work / f"anchor-{target}-{i}.log")
        total["seconds"] += step["seconds"]
        total["peak_rss"] = max(total["peak_rss"], step["peak_rss"])
        total["code"] = total["code"] or step["code"]
    candidates = [Path(str(out) + ".gguf"), out]
    total["output_bytes"] = max(folder_bytes(p) for p in candidates)
    for path in [out, *(Path(str(out) + suffix) for suffix in ("-cache", "-untied", "-f16.gguf", ".gguf"))]:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return total


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def row(target: str, precision: str | None, ours: dict, anchor: dict, bf16: int) -> dict:
    report = ours["report"] or {}
    export = stage(report, "export")
    reference = stage(report, "load source", "source logits", "source chat")
    verification = stage(report, "smoke test", "artifact logits")
    return {
        "target": target,
        "precision": report.get("precision", precision),
        "error": ours["error"],
        "wall_s": ours["seconds"],
        "peak_rss": ours["peak_rss"],
        "peak_x_bf16": ratio(ours["peak_rss"], bf16),
        "output_bytes": ours["output_bytes"],
        "export_s": export["seconds"],
        "export_peak_rss": export["peak_rss"],
        "export_peak_x_bf16": ratio(export["peak_rss"], bf16),
        "reference_s": reference["seconds"],
        "reference_peak_rss": reference["peak_rss"],
        "reference_peak_x_bf16": ratio(reference["peak_rss"], bf16),
        "verification_s": verification["seconds"],
        "verification_peak_rss": verification["peak_rss"],
        "verification_peak_x_bf16": ratio(verification["peak_rss"], bf16),
        "anchor": anchor,
        "export_time_vs_anchor": ratio(export["seconds"], anchor.get("seconds") if not anchor.get("code") else None),
        "export_peak_vs_anchor": ratio(export["peak_rss"], anchor.get("peak_rss")),
    }


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def print_table(rows: list[dict], shape: str, bf16: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{shape}: {bf16 / GiB:.2f} GiB of bf16 weights (x bf16: peak RSS / that)")
    headers = (
        "target",
        "export s",
        "anchor s",
        "time vs anchor",
        "export peak GiB",
        "x bf16",
        "anchor peak GiB",
        "reference peak x bf16",
        "verify s",
        "verify peak x bf16",
        "output GiB",
        "anchor output GiB",
        "note",
    )
    for header in headers:
        table.add_column(header, justify="left" if header in ("target", "note") else "right")
    for r in rows:
        anchor = r["anchor"]
        note = r["error"] or ""
        if anchor.get("skipped") or anchor.get("code"):
            note = (note + "; " if note else "") + (anchor.get("skipped") or f"anchor exit {anchor['code']}")
        table.add_row(
            " ".join([r["target"], r["precision"] or "", *r["flags"]]), fmt(r["export_s"], ".0f"),
            fmt(anchor.get("seconds"), ".0f"),
            fmt(r["export_time_vs_anchor"], ".2f"), fmt(r["export_peak_rss"], ".2f", GiB),
            fmt(r["export_peak_x_bf16"], ".2f"), fmt(anchor.get("peak_rss"), ".2f", GiB),
            fmt(r["reference_peak_x_bf16"], ".2f"), fmt(r["verification_s"], ".0f"),
            fmt(r["verification_peak_x_bf16"], ".2f"), fmt(r["output_bytes"], ".2f", GiB),
            fmt(anchor.get("output_bytes"), ".2f", GiB), note[:80],
        )  # fmt: skip
    Console(width=250).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(shapes.SHAPES), default="phi4-mini")
    parser.add_argument(
        "--targets", default=",".join(targets.names()), help="comma-separated target[:precision] (default all)"
    )
    parser.add_argument("--verify", choices=["full", "quick", "none"], default="full")
    parser.add_argument("--workdir", type=Path, default=Path("realsize-work"), help="checkpoint and scratch folder")
    parser.add_argument("--llama-cpp", type=Path, help="a llama.cpp source tree (for convert_hf_to_gguf.py)")
    parser.add_argument("--no-anchors", nargs="?", const="all", default="", metavar="TARGETS",
                        help="run phiconvert only, for every target or those named (comma-separated)")  # fmt: skip
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="TARGET:FLAG",
        help="a phiconvert flag for one target, repeatable: awq:--no-clip, gptq:--group-size=64",
    )
    parser.add_argument("--json", type=Path, default=Path("realsize.json"), help="where to write the results")
    args = parser.parse_args()
    unknown = sorted({o.partition(":")[0] for o in args.option} - set(targets.names()))
    if unknown:  # a mistyped target would otherwise run without its flag (awq's clip search: an hour more)
        parser.error(f"--option takes TARGET:FLAG with a target of {', '.join(targets.names())}, not {unknown[0]!r}")

    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.workdir / args.shape
    if not (checkpoint / "config.json").exists():
        print(f"building the {args.shape} checkpoint in {checkpoint} ...", flush=True)
        shapes.write_checkpoint(args.shape, checkpoint)
    parameters = sum(math.prod(t["shape"]) for f in checkpoint.glob("*.safetensors") for t in _header(f).values())
    bf16 = 2 * parameters
    rows = []
    for item in [t.strip() for t in args.targets.split(",") if t.strip()]:
        target, _, precision = item.partition(":")
        flags = [flag for owner, _, flag in (o.partition(":") for o in args.option) if owner == target]
        print(f"phiconvert {target} {precision or '(default)'} {' '.join(flags)}...", flush=True)
        ours = phiconvert_run(checkpoint, target, precision or None, args.verify, args.workdir, flags)
        anchor = {"skipped": "--no-anchors"}
        if not {"all", target} & set(args.no_anchors.split(",")):
            print(f"anchor for {target} ...", flush=True)
            anchor = anchor_run(target, ours["report"], checkpoint, args.workdir, args.llama_cpp)
        rows.append(row(target, precision or None, ours, anchor, bf16) | {"flags": flags})
        result = {"shape": args.shape, "parameters": parameters, "bf16_bytes": bf16, "verify": args.verify,
                  "date": time.strftime("%Y-%m-%d"), "rows": rows}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")  # after each row: a long job's progress
    print_table(rows, args.shape, bf16)
    print(f"results written to {args.json}")


def _header(file: Path) -> dict:
    import struct

    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


if __name__ == "__main__":
    main()
