"""Hugging Face hub conventions for exported directories: a generated model card (``README.md``) and uploads.

The card is built from what the directory and the run left behind: the model geometry (``config.json`` or
``llm_config.json`` / ``vit_config.json``), the training recipe (``train_config.yaml``, read as plain YAML),
headline metrics of evaluation reports (their ``<name>.json``) and the license given at export time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
RUN_CONFIG_NAME = "train_config.yaml"
TAGS = ("unigendet", "bagel", "mixture-of-transformers", "text-to-image", "ai-generated-image-detection")


def _dig(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def report_rows(paths: list[str | Path]) -> list[tuple[str, str, str]]:
    """(report, metric, value) for the headline metrics of each JSON report (every top-level number of its
    ``metrics`` when it names no headline). FileNotFoundError / ValueError naming an unreadable report."""
    rows = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"report not found: {path}")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a JSON report ({err})") from err
        metrics = doc.get("metrics", {}) if isinstance(doc, dict) else {}
        keys = doc.get("headline") or [k for k, v in metrics.items() if isinstance(v, (int, float))]
        rows += [(path.stem, key, _format(_dig(metrics, key))) for key in keys if _dig(metrics, key) is not None]
    return rows


def _recipe_lines(run: dict[str, Any]) -> list[str]:
    lines = [f"- stage: `{run.get('stage', 'gduf')}`, {run.get('total_steps', '?')} steps, seed {run.get('seed', '?')}"]
    if _dig(run, "init.path"):
        lines.append(f"- initialised from: `{_dig(run, 'init.path')}`")
    if _dig(run, "optim.lr") is not None:
        lines.append(f"- optimizer: learning rate {_dig(run, 'optim.lr')}")
    if _dig(run, "lora.enabled"):
        lines.append(f"- LoRA: r={_dig(run, 'lora.r')}, alpha={_dig(run, 'lora.alpha')} (adapter in `adapter/`, "
                     "merged into the weights)")
    for name, source in (_dig(run, "data.sources") or {}).items():
        where = source.get("json_path") or ", ".join(source.get("data_files") or []) or "?"
        lines.append(f"- data `{name}` ({source.get('kind')}, weight {source.get('weight', 1.0)}): `{where}`")
    return lines


def _geometry(directory: Path) -> str:
    config = directory / "config.json"
    if config.is_file():
        llm = json.loads(config.read_text()).get("model", {}).get("llm", {})
    elif (directory / "llm_config.json").is_file():
        llm = json.loads((directory / "llm_config.json").read_text())
    else:
        return "unknown geometry"
    return (f"{llm.get('num_hidden_layers', '?')} layers, hidden size {llm.get('hidden_size', '?')}, "
            f"{llm.get('layer_module', 'mot')} experts")


def model_card(directory: str | Path, layout: str, license: str = "apache-2.0", base_model: str | None = None,
               reports: list[str | Path] = (), repo_id: str | None = None) -> str:
    """The Markdown model card (with hub metadata front matter) of an exported directory."""
    directory = Path(directory)
    meta: dict[str, Any] = {"license": license, "library_name": "unigendet", "tags": list(TAGS)}
    if base_model:
        meta["base_model"] = base_model
    run_path = directory / RUN_CONFIG_NAME
    run = yaml.safe_load(run_path.read_text()) if run_path.is_file() else None
    name = repo_id or directory.name
    load = (f'model, vae, tokenizer = load_model_directory("{name}")' if layout == "unigendet" else
            f'model, vae, tokenizer = load_bagel_checkpoint("{name}")')
    module = "export" if layout == "unigendet" else "bagel"
    parts = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        "UniGenDet (unified image generation and AI-generated-image detection on a BAGEL Mixture-of-Transformers), "
        f"exported by `unigendet export` in the {'unigendet' if layout == 'unigendet' else 'BAGEL / UniGenDet'} "
        f"layout: {_geometry(directory)}.", "",
        "## Training", "",
        *(_recipe_lines(run) if run else ["No training configuration was exported with these weights."]), "",
        "## Evaluation", "",
    ]
    rows = report_rows(list(reports))
    if rows:
        parts += ["| report | metric | value |", "|---|---|---|", *(f"| {r} | {m} | {v} |" for r, m, v in rows)]
    else:
        parts.append("No evaluation reports were given at export time.")
    parts += ["", "## Use", "", "```python", f"from unigendet.checkpoint.{module} import "
              f"{'load_model_directory' if layout == 'unigendet' else 'load_bagel_checkpoint'}", load, "```", "",
              "## License", "", f"{license}; the base model's license also applies to its weights.", ""]
    return "\n".join(parts)


def write_model_card(directory: str | Path, layout: str, **kwargs: Any) -> Path:
    path = Path(directory) / CARD_NAME
    path.write_text(model_card(directory, layout, **kwargs), encoding="utf-8")
    return path


def push_folder(directory: str | Path, repo_id: str, private: bool = True, commit_message: str | None = None,
                token: str | None = None) -> str:
    """Create ``repo_id`` (if needed) and upload ``directory`` to it; returns the commit URL. Needs the network
    and a token with write access (``huggingface-cli login`` or ``HF_TOKEN``)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message or f"Upload {Path(directory).name} with unigendet export")
    logger.info("pushed %s to %s", directory, repo_id)
    return str(getattr(info, "commit_url", info))
