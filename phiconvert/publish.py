"""`phiconvert publish ARTIFACT REPO_ID`: upload an artifact to the Hugging Face Hub with a model card that carries
what phiconvert measured.

The card (README.md) is written from the artifact's phiconvert.json: its YAML metadata says what the Hub indexes
(``base_model`` with ``base_model_relation: quantized``, ``library_name``, tags, the source's licence), its body
the size, the fidelity against the source, the command that made it, the toolchain versions and how to run it.
The upload goes through huggingface_hub (its endpoint setting, HF_ENDPOINT, points it elsewhere); the token comes
from where huggingface_hub looks for it (HF_TOKEN, `hf auth login`) and is never printed or written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from phiconvert import targets
from phiconvert.errors import PhiconvertError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
CARD = "README.md"


def is_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and not Path(text).exists()


def source_licence(report: dict[str, Any]) -> str | None:
    """The source's licence from its own model card's metadata, where its folder has one."""
    from huggingface_hub import ModelCard

    card = Path(report["source"].get("path", "")) / CARD
    if not card.is_file():
        return None
    try:
        return ModelCard.load(card).data.license
    except Exception:  # a README without card metadata
        return None


def card(report: dict[str, Any], repo_id: str, base_model: str | None = None) -> str:
    """The model card's text, from phiconvert.json."""
    from huggingface_hub import ModelCard, ModelCardData

    target = targets.load(report["target"])
    precision, model = report["precision"], report["source"]["model"]
    base = base_model or (model if is_hub_id(model) else None)
    licence = source_licence(report)
    data = ModelCardData(
        base_model=base,
        library_name=target.library,
        license=licence,
        pipeline_tag="text-generation",
        tags=[
            "phiconvert",
            report["target"],
            precision,
            *(["quantized"] if precision not in ("fp32", "fp16", "bf16") else []),
        ],  # fmt: skip
        **({"base_model_relation": "quantized"} if base else {}),
    )
    fidelity = report.get("fidelity")
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{base or model} converted to **{report['target']} {precision}** by phiconvert {report['phiconvert']}, "
        f"then loaded in its own runtime ({target.runtime}) and measured against the source.",
        "",
        "## Measured",
        "",
        "| measure | value |",
        "|---|---|",
        f"| size on disk | {report['size_bytes'] / 2**20:,.1f} MiB |",
    ]
    if fidelity:
        bound = fidelity["bound"]
        lines += [
            f"| top-1 agreement with the source | {fidelity['top1']:.1%} over {fidelity['positions']} positions |",
            f"| mean KL divergence from the source | {fidelity['kl']:.5f} (p99 {fidelity['kl_p99']:.5f}) |",
            f"| perplexity, source → artifact | {fidelity['ppl_source']:.3f} → {fidelity['ppl_artifact']:.3f} "
            f"({fidelity['ppl_pct']:+.2f} %) |",
            f"| greedy chat reply equals the source's | {yes_no(fidelity.get('greedy_match'))} |",
            f"| bound (top-1 ≥ {bound['top1']}, KL ≤ {bound['kl']}, perplexity ≤ +{bound['ppl_pct']} %) | "
            f"{'passed' if fidelity['passed'] else 'FAILED'} |",
        ]
    else:
        lines.append("| fidelity | not verified (converted with --verify none) |")
    lines += ["", "Measured on the same token ids of held-out text, in the artifact's runtime, by `phiconvert`."]
    caveats = report.get("caveats") or []
    if caveats:
        lines += ["", "Caveats:", "", *(f"- {c}" for c in caveats)]
    command = report.get("command") or f"phiconvert {model} --target {report['target']} --precision {precision}"
    toolchain = ", ".join(f"{k} {v}" for k, v in report.get("toolchain", {}).items())
    lines += ["", "## How it was made", "", "```bash", command, "```", "", f"Toolchain: {toolchain}."]
    lines += [
        "",
        "## Use it",
        "",
        "```bash",
        f'pip install "phiconvert[{target.extra}]"',
        f"hf download {repo_id} --local-dir {repo_id.split('/')[-1]}",
        f"phiconvert chat {repo_id.split('/')[-1]}      # or: phiconvert serve {repo_id.split('/')[-1]}",
        "```",
        "",
        f"Or load it with {target.runtime} directly: see phiconvert's docs/tutorials/{target.tutorial}.",
    ]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n").content


def yes_no(value: bool | None) -> str:
    return "not checked" if value is None else "yes" if value else "no"


def publish(
    artifact: str | Path,
    repo_id: str,
    private: bool = False,
    dry_run: bool = False,
    base_model: str | None = None,
) -> dict[str, Any]:
    """Write the card and upload the artifact (``dry_run``: write the card into the artifact folder and list what
    would be uploaded). Returns what was (or would be) uploaded and where."""
    folder = Path(artifact).expanduser()
    report_file = folder / "phiconvert.json"
    if not report_file.is_file():
        raise PhiconvertError(f"{folder} has no phiconvert.json: publish takes a folder phiconvert converted")
    report = json.loads(report_file.read_text())
    if report.get("kind") == "comparison":
        raise PhiconvertError(f"{folder} is a --target all report folder; publish one of the artifact folders in it")
    if not HUB_ID.match(repo_id):
        raise PhiconvertError(f"'{repo_id}' is not a Hub repository id (OWNER/NAME)")
    if base_model is not None and not HUB_ID.match(base_model):
        raise PhiconvertError(f"--base-model '{base_model}' is not a Hub model id (OWNER/NAME)")
    text = card(report, repo_id, base_model)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != CARD)
    files.append(CARD)
    size = sum((folder / f).stat().st_size for f in files if f != CARD) + len(text.encode())
    if dry_run:
        (folder / CARD).write_text(text)
        return {"repo_id": repo_id, "dry_run": True, "card": str(folder / CARD), "files": files, "bytes": size}
    import httpx
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise PhiconvertError("HF_HUB_OFFLINE is set: publish needs the Hub (--dry-run writes the card without it)")
    api = HfApi()
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files if f != CARD]
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=text.encode()))
    try:  # one commit: the files and the card, never the card without the files
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations=operations,
                          commit_message=f"phiconvert: {report['target']} {report['precision']}")  # fmt: skip
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        hint = " (no token, or one without write access: HF_TOKEN or `hf auth login`)" if status in (401, 403) else ""
        raise PhiconvertError(f"the Hub refused the upload to {repo_id}: HTTP {status}{hint}") from None
    except (httpx.HTTPError, OSError) as error:  # connection refused, DNS, ...
        raise PhiconvertError(f"could not reach the Hub to upload {repo_id}: {type(error).__name__}") from None
    return {"repo_id": repo_id, "dry_run": False, "url": str(url), "files": files, "bytes": size}
