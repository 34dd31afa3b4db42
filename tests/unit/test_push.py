"""``ctxext.hub.push`` over real HTTP against a fake Hub on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from ctxext import hub as hubmod
from ctxext.hub import PushError, model_card, plan_upload, push

from .fake_hub import FakeHub

TOKEN = "hf_TestSecretToken1234567890"
FAST = {"backoff": 0.01}


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory) -> Path:
    from ctxext.attention.options import TensorizedOptions
    from ctxext.models import apply_tensorized, save_model_dir
    from ctxext.tiny import byte_tokenizer, tiny_model

    model = tiny_model("llama")
    apply_tensorized(model, TensorizedOptions(block_sizes=(16,)))
    out = tmp_path_factory.mktemp("converted") / "model"
    save_model_dir(model, byte_tokenizer(), out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    from ctxext import config
    from ctxext.train import finetune

    root = Path(__file__).resolve().parents[2]
    out, cache = tmp_path_factory.mktemp("ft"), tmp_path_factory.mktemp("cache")
    overrides = [f"train.output_dir={out}", f"data.cache_dir={cache}", "train.steps=1", "train.save_every=0"]
    recipe = config.load(str(root / "recipes" / "tiny-debug.yaml"), [*overrides, "data.max_tokens=4096"])
    finetune(recipe, log=lambda *a, **k: None)
    return out / "adapter"


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No ambient token, endpoint or xet; progress bars off."""
    import huggingface_hub.constants as hf_constants

    for name in ("HF_TOKEN", "HF_ENDPOINT", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # conftest sets it; only 127.0.0.1 is used here
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # read at import; plain LFS against the fake
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_PROGRESS_BARS", True, raising=False)
    return monkeypatch


@pytest.fixture
def fake(env):
    with FakeHub(token=TOKEN, lifetime_s=60) as server:
        yield server


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def check_uploaded(fake: FakeHub, repo_id: str, result, local: dict[str, Path]) -> dict[str, bytes]:
    files = fake.repos[repo_id].files
    assert sorted(files) == sorted(p for p, _ in result.files)
    for rel, path in local.items():
        assert files[rel] == path.read_bytes(), rel
    assert dict(result.files) == {k: len(v) for k, v in files.items()}
    return files


def test_push_merged_one_commit_files_card(fake, merged_dir, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    result = push(merged_dir, "alice/tiny-32k", private=True, token=TOKEN, endpoint=fake.endpoint, **FAST)

    repo = fake.repos["alice/tiny-32k"]
    assert repo.private is True
    assert len(repo.commits) == 1 and result.attempts == 1
    assert result.commit_oid == repo.commits[0].oid and result.kind == "merged"
    local = {p.name: p for p in merged_dir.iterdir()}
    files = check_uploaded(fake, "alice/tiny-32k", result, local)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert any(path.startswith("/lfs-upload/") for _, path in fake.requests)  # safetensors went through LFS

    card = files["README.md"].decode()
    assert card == result.card
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"ctxext", "tensorized-attention", "long-context"} <= set(meta["tags"])
    assert "license" not in meta and "base_model" not in meta  # unknown for a tiny random model
    assert "| `block_sizes` | 16 |" in card and "`attn_implementation`: `tensorized`" in card
    assert "pip install ctxext" in card and "import ctxext" in card
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-32k")' in card
    assert "trust_remote_code=True" not in card
    assert "vLLM" in card and "llama.cpp" in card
    assert "Base model\n\nUnknown" in card

    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err + caplog.text


def test_push_adapter(fake, adapter_dir):
    result = push(
        adapter_dir, "alice/tiny-adapter", base_model="HuggingFaceTB/SmolLM2-135M", token=TOKEN, endpoint=fake.endpoint
    )
    assert result.kind == "adapter" and fake.commit_count() == 1
    assert fake.repos["alice/tiny-adapter"].private is False
    local = {p.name: p for p in adapter_dir.iterdir() if p.name != "README.md"}
    files = check_uploaded(fake, "alice/tiny-adapter", result, local)
    for name in ("adapter_config.json", "adapter_model.safetensors", "ctxext.json", "recipe.yaml"):
        assert name in files
    card = files["README.md"].decode()
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and "peft" in meta["tags"]
    assert "from peft import PeftModel" in card and "import ctxext" in card
    assert "source: tiny-random:llama" in card  # the recipe is embedded
    assert "| `causal` | complete |" in card


def test_adapter_base_model_defaults_from_settings(adapter_dir):
    card = model_card(adapter_dir, repo_id="alice/a")
    assert "base_model" not in front_matter(card)  # tiny-random:llama is not a Hub id
    assert "tiny-random:llama" in card.split("## What ctxext changed")[0]


def test_recipe_above_license_and_eval_report(fake, merged_dir, tmp_path):
    run = tmp_path / "run"
    model = run / "merged"
    shutil.copytree(merged_dir, model)
    (run / "recipe.yaml").write_text("model:\n  source: meta-llama/Llama-3.1-8B\n")
    (model / "README.md").write_text("---\nlicense: apache-2.0\n---\nold card\n")
    (model / ".cache").mkdir()
    (model / ".cache" / "junk").write_text("x")
    evaldir = tmp_path / "eval"
    evaldir.mkdir()
    (evaldir / "report.md").write_text(
        "# ctxext evaluation\n\n## Perplexity\n\n| model | 1024 |\n|---|---|\n| m | 9.1 |\n"
    )
    (evaldir / "ppl_vs_length.png").write_bytes(b"\x89PNG fake plot")

    result = push(model, "alice/run", eval_dir=evaldir, token=TOKEN, endpoint=fake.endpoint, **FAST)
    files = fake.repos["alice/run"].files
    assert files["recipe.yaml"] == (run / "recipe.yaml").read_bytes()
    assert files["eval/report.md"] == (evaldir / "report.md").read_bytes()
    assert files["eval/ppl_vs_length.png"] == b"\x89PNG fake plot"
    assert not any(p.startswith(".cache") for p in files)
    card = files["README.md"].decode()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "meta-llama/Llama-3.1-8B"
    assert "old card" not in card and "## Evaluation" in card and "| m | 9.1 |" in card
    assert "![ppl_vs_length](eval/ppl_vs_length.png)" in card
    assert "source: meta-llama/Llama-3.1-8B" in card
    assert fake.commit_count() == 1 and result.attempts == 1


def test_dry_run_makes_no_request_and_needs_no_token(fake, merged_dir):
    result = push(merged_dir, "alice/tiny", dry_run=True, endpoint=fake.endpoint)
    assert fake.requests == [] and fake.repos == {}
    assert result.dry_run and result.commit_oid is None
    sizes = dict(result.files)
    assert sizes["model.safetensors"] == (merged_dir / "model.safetensors").stat().st_size
    assert sizes["README.md"] == len(result.card.encode())
    assert dict(plan_upload(merged_dir)) == {k: v for k, v in sizes.items() if k != "README.md"}


def test_revision_branch(fake, merged_dir):
    push(merged_dir, "alice/tiny", revision="dev", token=TOKEN, endpoint=fake.endpoint)
    repo = fake.repos["alice/tiny"]
    assert [c.revision for c in repo.commits] == ["dev"]
    assert "README.md" in repo.branches["dev"] and repo.files == {}


def test_token_from_env_and_stored_login(fake, merged_dir, env, tmp_path):
    env.setenv("HF_TOKEN", TOKEN)
    push(merged_dir, "alice/one", endpoint=fake.endpoint)
    env.delenv("HF_TOKEN")
    import huggingface_hub.constants as hf_constants

    stored = tmp_path / "login" / "token"
    stored.parent.mkdir()
    stored.write_text(TOKEN)
    env.setattr(hf_constants, "HF_TOKEN_PATH", str(stored))
    env.setenv("HF_ENDPOINT", fake.endpoint)
    push(merged_dir, "alice/two")
    assert fake.commit_count("alice/one") == 1 and fake.commit_count("alice/two") == 1


# ---------------------------------------------------------------- bad input


def test_not_a_model_dir(tmp_path, merged_dir, adapter_dir):
    with pytest.raises(PushError, match="config.json") as err:
        push(tmp_path, "alice/x", dry_run=True)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(PushError, match="not a directory"):
        push(merged_dir / "config.json", "alice/x", dry_run=True)
    with pytest.raises(PushError, match="adapter_config.json"):
        push(merged_dir, "alice/x", kind="adapter", dry_run=True)
    with pytest.raises(PushError, match="not a merged/converted model dir"):
        push(adapter_dir, "alice/x", kind="merged", dry_run=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(PushError, match='not "tensorized"'):
        push(plain, "alice/x", dry_run=True)


@pytest.mark.parametrize("repo", ["noslash", "a/b/c", "/x", "alice/", "al ice/x", "alice/../x", ""])
def test_bad_repo_name(merged_dir, repo):
    with pytest.raises(PushError, match="user/name"):
        push(merged_dir, repo, dry_run=True)


def test_missing_token(fake, merged_dir):
    with pytest.raises(PushError) as err:
        push(merged_dir, "alice/x", endpoint=fake.endpoint)
    assert "export HF_TOKEN=" in str(err.value) and "hf auth login" in str(err.value)
    assert fake.requests == []


def test_unreachable_endpoint(env, merged_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(PushError, match="cannot reach the Hub") as err:
        push(merged_dir, "alice/x", token=TOKEN, endpoint=f"http://127.0.0.1:{port}", **FAST)
    assert TOKEN not in str(err.value)


def test_rejected_token_is_never_shown(fake, merged_dir, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    bad = "hf_WrongSecretTokenABCDEFG"
    with pytest.raises(PushError, match="401") as err:
        push(merged_dir, "alice/x", token=bad, endpoint=fake.endpoint, **FAST)
    out = capsys.readouterr()
    assert bad not in str(err.value) + out.out + out.err + caplog.text
    assert fake.repos == {}


def test_failed_commit_leaves_no_commit(fake, merged_dir, capsys):
    fake.failures["commit"] = [500] * 5
    with pytest.raises(PushError, match="after 3 tries") as err:
        push(merged_dir, "alice/x", token=TOKEN, endpoint=fake.endpoint, **FAST)
    assert "Nothing was committed" in str(err.value) and TOKEN not in str(err.value)
    assert fake.commit_count("alice/x") == 0 and fake.repos["alice/x"].files == {}
    assert sum(1 for m, p in fake.requests if p.endswith("/commit/main")) == 3
    assert TOKEN not in "".join(capsys.readouterr())


def test_client_error_is_not_retried(fake, merged_dir):
    fake.failures["commit"] = [400]
    with pytest.raises(PushError, match="400"):
        push(merged_dir, "alice/x", token=TOKEN, endpoint=fake.endpoint, **FAST)
    assert sum(1 for m, p in fake.requests if p.endswith("/commit/main")) == 1
    assert fake.commit_count() == 0


def test_transient_503_then_success_is_one_commit(fake, merged_dir):
    fake.failures["commit"] = [503]
    fake.failures["create"] = [502]
    result = push(merged_dir, "alice/x", token=TOKEN, endpoint=fake.endpoint, **FAST)
    assert result.attempts == 2
    assert fake.commit_count("alice/x") == 1
    assert fake.repos["alice/x"].files["model.safetensors"] == (merged_dir / "model.safetensors").read_bytes()


def test_existing_repo_is_reused(fake, merged_dir):
    push(merged_dir, "alice/x", token=TOKEN, endpoint=fake.endpoint)
    push(merged_dir, "alice/x", token=TOKEN, endpoint=fake.endpoint)
    assert len(fake.repos) == 1 and fake.commit_count("alice/x") == 2


def test_retry_constants_are_configurable():
    assert hubmod.RETRIES == 3 and hubmod.BACKOFF_S > 0


def test_cli_dry_run_lists_files_and_prints_the_card(merged_dir):
    from typer.testing import CliRunner

    from ctxext.cli import app

    result = CliRunner().invoke(app, ["push", str(merged_dir), "--repo", "alice/tiny-ta", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.output and "config.json" in result.output
    assert "tensorized-attention" in result.output and "import ctxext" in result.output
    bad = CliRunner().invoke(app, ["push", str(merged_dir), "--repo", "not-a-repo", "--dry-run"])
    assert bad.exit_code == 1 and "user/name" in " ".join((bad.output + bad.stderr).split())
