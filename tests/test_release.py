"""`harmonization publish --all`: the whole zoo released to the local Hub stand-in, resumed, re-run, pinned, loaded.

The zoo here is a copy of `models/` whose seven entries are shrunk to the conversion fixtures' configs and whose
originals are the fixtures (files written by the original libraries, tests/fixtures/keras2), served by the
stand-in at their own URLs with their sha256. Everything else is the real path: the download and verification
of each original, the conversion, the round trip, the card, huggingface_hub's create-repo / preupload / LFS /
commit protocol, the pinning of models/NAME.json, and the zoo loading each model from its pinned commit.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from harmonization import cli, zoo
from harmonization._io import sha256_file
from harmonization.loader import load_model
from harmonization.publish import PublishError
from harmonization.release import RECORD_FILE, check_write_access, release

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import FakeHub, point_huggingface_hub_at  # noqa: E402
from test_convert import CASES, FIXTURES  # noqa: E402  (each fixture's tiny config)

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
TOKEN = "hf_test_write_token"
ORG = "test-org"
#: zoo name -> the conversion fixture made by its original library
FIXTURE_OF = {
    "convnext_tiny_harmonized": "kecam_convnext_weights",
    "efficientnet_b0_harmonized": "efficientnet_b0_full_model",
    "levit128_harmonized": "kecam_levit_weights",
    "maxvit_tiny_harmonized": "kecam_maxvit_weights",
    "resnet50v2_harmonized": "resnet50v2_full_model",
    "vgg16_harmonized": "vgg16_full_model",
    "vit_b16_harmonized": "vit_keras_weights",
}
NAMES = sorted(FIXTURE_OF)
WRITES = ("/api/repos/create", "/preupload/", "/commit/", "/info/lfs/objects/batch", "/__lfs")


def _tiny_checkout(fake: FakeHub, folder: Path, names=NAMES) -> Path:
    """A copy of models/ with `names` only, shrunk to the fixtures and pointing at the stand-in's copies."""
    import hashlib

    models = folder / "models"
    models.mkdir(parents=True)
    (folder / "tests" / "fixtures").mkdir(parents=True)  # the checkout's conversion fixtures, which cards report on
    (folder / "tests" / "fixtures" / "keras2").symlink_to(FIXTURES)
    shutil.copy(ROOT / "models" / zoo.FAMILY_DEFAULTS_FILE, models)
    for name in names:
        fixture = FIXTURE_OF[name]
        data = (FIXTURES / f"{fixture}.h5").read_bytes()
        entry = json.loads((ROOT / "models" / f"{name}.json").read_text())
        entry["architecture"]["config"] = CASES[fixture][1]
        entry["source"]["url"] = fake.add_static(f"/bucket/{name}/{fixture}.h5", data)
        entry["source"]["sha256"] = hashlib.sha256(data).hexdigest()
        entry["source"]["size"] = len(data)
        (models / f"{name}.json").write_text(json.dumps(entry, indent=2) + "\n")
    return models


def _use_zoo(monkeypatch, models: Path) -> None:
    """Make the zoo read `models` (as it reads a checkout's), for `load_model(NAME)`."""
    monkeypatch.setattr(zoo, "_entries_folder", lambda: models)
    for cached in (zoo._registry, zoo._family_defaults, zoo._aliases):
        cached.cache_clear()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    with FakeHub() as fake:
        fake.token = TOKEN
        point_huggingface_hub_at(fake, monkeypatch, tmp_path, token=TOKEN)
        yield fake
    for cached in (zoo._registry, zoo._family_defaults, zoo._aliases):
        cached.cache_clear()


def _writes(fake: FakeHub, since: int = 0) -> list[tuple[str, str]]:
    return [(m, p) for m, p in fake.requests[since:] if m in ("POST", "PUT") and any(w in p for w in WRITES)]


def _run_workflow_step(step_name: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """Run one step of the release workflow with bash, as the runner does (its `run` script, its `env`)."""
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["release"]["steps"]
    step = next(s for s in steps if s.get("name") == step_name)
    return subprocess.run(["bash", "-c", step["run"]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _harmonization_on_path(folder: Path) -> Path:
    """A `harmonization` command that runs this checkout's package with this interpreter (what `pip install .`
    puts on a runner's PATH)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    command = bin_dir / "harmonization"
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m harmonization "$@"\n')
    command.chmod(0o755)
    return bin_dir


def _workflow_env(fake: FakeHub, tmp_path: Path, **extra) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
    env.update({
        "PATH": f"{_harmonization_on_path(tmp_path)}{os.pathsep}{env['PATH']}",
        "PYTHONPATH": str(ROOT), "HF_ENDPOINT": fake.endpoint, "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf-home"),
        "HARMONIZATION_CACHE": str(tmp_path / "workflow-cache"), "RUNNER_TEMP": str(tmp_path / "runner-temp"),
        "HF_TOKEN": TOKEN, "NAMESPACE": ORG, "MODELS": "",
    })
    env.update(extra)
    return env


@pytest.mark.slow
def test_release_end_to_end_resumes_reruns_pins_and_loads(fake_hub, tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    models = _tiny_checkout(fake_hub, checkout)
    work = tmp_path / "work"
    lines: list[str] = []

    # A run interrupted after three models: the fourth's commit is answered by a dropped connection.
    fourth = NAMES[3]
    fake_hub.drop.add(f"/api/models/{ORG}/{fourth}/commit/")
    with pytest.raises(PublishError) as stopped:
        release(namespace=ORG, work_dir=work, models_dir=models, pin=True, report=lines.append)
    message = str(stopped.value)
    assert message.startswith(f"[4/7] {fourth}: Uploading to hf://{ORG}/{fourth} failed")
    assert "run the same command again" in message and f"Released before it: {', '.join(NAMES[:3])}." in message
    assert "\n" not in message
    assert fake_hub.dropped  # the stand-in did hang up on it
    pinned = {name: json.loads((models / f"{name}.json").read_text()).get("hub", {}) for name in NAMES}
    for name in NAMES[:3]:
        assert pinned[name] == {"repo_id": f"{ORG}/{name}", "revision": fake_hub.refs[f"{ORG}/{name}"]["main"]}
    for name in NAMES[3:]:
        assert "revision" not in pinned[name]  # nothing half-uploaded is pinned
    assert set(fake_hub.files(f"{ORG}/{fourth}")) == {".gitattributes"}  # its commit never happened
    assert sorted(json.loads((work / RECORD_FILE).read_text())) == NAMES[:3]

    # The same command again finishes the other four; the first three are already there and not sent again.
    fake_hub.drop.clear()
    before, commits = len(fake_hub.requests), len(fake_hub.commit_log)
    released = release(namespace=ORG, work_dir=work, models_dir=models, pin=True, report=lines.append)
    assert [r.name for r in released] == NAMES
    assert [r.uploaded for r in released[:3]] == [[], [], []]
    assert all("model.weights.h5" in r.uploaded and "README.md" in r.uploaded for r in released[3:])
    assert [c["repo_id"] for c in fake_hub.commit_log[commits:]] == [f"{ORG}/{n}" for n in NAMES[3:]]
    puts = {p for m, p in fake_hub.requests[before:] if m == "PUT"}
    sent = {name: f"/__lfs__/{sha256_file(work / name / 'model.weights.h5')}" for name in NAMES}
    assert {sent[name] for name in NAMES[4:]} <= puts
    assert not {sent[name] for name in NAMES[:4]} & puts  # the fourth's weights were stored before the drop
    for item in released:
        repo = f"{ORG}/{item.name}"
        assert item.commit_oid == fake_hub.refs[repo]["main"] and item.pinned
        assert json.loads((models / f"{item.name}.json").read_text())["hub"] == {"repo_id": repo,
                                                                                 "revision": item.commit_oid}
        files = fake_hub.files(repo)
        assert {"config.json", "model.weights.h5", "metadata.json", "README.md", "saliency.png"} <= set(files)
        card = files["README.md"].decode()
        assert "**Against the original library.** The libraries" in card and "not run for this build" not in card
    record = json.loads((work / RECORD_FILE).read_text())
    assert {name: record[name]["commit_oid"] for name in NAMES} == {r.name: r.commit_oid for r in released}
    assert any("using the preset built earlier" in line for line in lines)  # built once, not twice

    # The workflow's publish step, run as written from a fresh runner (nothing built yet): uploads nothing.
    pinned_text = {name: (models / f"{name}.json").read_text() for name in NAMES}
    before, commits = len(fake_hub.requests), len(fake_hub.commit_log)
    result = _run_workflow_step("Publish and pin", _workflow_env(fake_hub, tmp_path), checkout)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _writes(fake_hub, before) == [] and len(fake_hub.commit_log) == commits
    assert {name: (models / f"{name}.json").read_text() for name in NAMES} == pinned_text
    assert result.stdout.count("nothing (already there)") == 7
    for item in released:
        assert f"hf://{item.repo_id}" in result.stdout and item.commit_oid in result.stdout

    # The zoo, reading that models/ folder, loads every model from its pinned commit through the Hub path.
    _use_zoo(monkeypatch, models)
    for name in NAMES:
        repo = f"{ORG}/{name}"
        fake_hub.add_commit(repo, {**fake_hub.files(repo), "note.txt": b"a later commit on main"})  # not pinned
    before = len(fake_hub.requests)
    for item in released:
        images, logits = _fixture_logits(item.name)
        model = load_model(item.name)
        np.testing.assert_allclose(np.asarray(model(images)), logits, atol=1e-4)
    served = [p for _, p in fake_hub.requests[before:]]
    assert not any(p.startswith("/bucket/") for p in served)  # no original was downloaded: no conversion
    for item in released:
        assert any(f"/{item.repo_id}/resolve/{item.commit_oid}/" in p for p in served)
    assert not (tmp_path / "harmonization-cache" / "converted").exists()


def _fixture_logits(name: str):
    data = np.load(FIXTURES / f"{FIXTURE_OF[name]}.npz")
    logits = data["pre_softmax_logits"] if "pre_softmax_logits" in data else data["logits"]
    return data["images"].astype("float32"), logits


@pytest.mark.slow
def test_plain_keras_loads_every_published_model_from_the_hub(fake_hub, tmp_path):
    """`keras.saving.load_model("hf://ORG/NAME")`, Keras's own function with safe_mode on, in a fresh process."""
    models = _tiny_checkout(fake_hub, tmp_path / "checkout")
    release(namespace=ORG, work_dir=tmp_path / "work", models_dir=models, report=lambda line: None)
    script = "\n".join([
        "import json, sys", "import numpy as np", "import keras", "import harmonization",
        "out = {}",
        "for repo, fixture in json.loads(sys.argv[1]).items():",
        "    model = keras.saving.load_model('hf://' + repo)  # safe_mode=True is Keras's default",
        "    data = np.load(fixture)",
        "    expected = data['pre_softmax_logits'] if 'pre_softmax_logits' in data else data['logits']",
        "    got = np.asarray(model(data['images'].astype('float32')))",
        "    out[repo] = [type(model).__name__, float(np.max(np.abs(got - expected)))]",
        "print(json.dumps(out))",
    ])
    repos = {f"{ORG}/{name}": str(FIXTURES / f"{fixture}.npz") for name, fixture in FIXTURE_OF.items()}
    env = _workflow_env(fake_hub, tmp_path)
    result = subprocess.run([sys.executable, "-c", script, json.dumps(repos)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    classes = {"convnext": "ConvNeXt", "efficientnet": "EfficientNet", "levit": "LeViT", "maxvit": "MaxViT",
               "resnet50v2": "ResNetV2", "vgg16": "VGG", "vit_b16": "ViT"}
    for repo, (class_name, diff) in answers.items():
        assert class_name == next(c for prefix, c in classes.items() if repo.split("/")[1].startswith(prefix))
        assert diff < 1e-4, (repo, diff)
    # The whole repo came down (README.md and the figure beside the three files Keras reads).
    assert any("/resolve/" in p and p.endswith("/README.md") for _, p in fake_hub.requests)


# --- bad input: one sentence, nothing half-done ------------------------------------------------------------------


@pytest.fixture
def one_model(fake_hub, tmp_path):
    return _tiny_checkout(fake_hub, tmp_path / "checkout", names=["levit128_harmonized"])


def _release_one(models, tmp_path, **options):
    return release(namespace=options.pop("namespace", ORG), work_dir=tmp_path / "work", models_dir=models,
                   report=lambda line: None, **options)


def test_no_token_is_one_sentence_before_any_work(fake_hub, one_model, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match=r"^No Hugging Face token: set HF_TOKEN") as error:
        _release_one(one_model, tmp_path, pin=True)
    assert "\n" not in str(error.value)
    assert fake_hub.requests == [] and not (tmp_path / "work").exists()


@pytest.mark.parametrize("token, namespace, orgs, expected", [
    ("hf_wrong", ORG, {ORG: "write"}, r"refused the token .* invalid or expired"),
    (TOKEN, "serre-lab", {ORG: "write"}, r"cannot write to 'serre-lab'.*organisations: test-org"),
    (TOKEN, ORG, {ORG: "read"}, r"read-only member of 'test-org'"),
])
def test_a_namespace_the_token_cannot_write_to_is_refused_first(fake_hub, one_model, tmp_path, monkeypatch,
                                                                 token, namespace, orgs, expected):
    monkeypatch.setenv("HF_TOKEN", token)
    fake_hub.orgs = orgs
    with pytest.raises(PublishError, match=expected):
        _release_one(one_model, tmp_path, namespace=namespace, pin=True)
    assert _writes(fake_hub) == [] and not (tmp_path / "work").exists()


def test_the_token_may_write_to_its_user_and_its_organisations(fake_hub):
    assert check_write_access("test-user") == check_write_access(ORG) == "test-user"
    with pytest.raises(ValueError, match="`namespace` must be a Hub user or organisation name"):
        check_write_access("org/name")


def test_a_stalled_upload_ends_and_is_not_pinned(fake_hub, one_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HARMONIZATION_NETWORK_TIMEOUT", "2")
    fake_hub.stall.add(f"/api/models/{ORG}/levit128_harmonized/commit/")
    start = time.monotonic()
    with pytest.raises(PublishError, match=r"failed: .*Timeout.*run the same command again"):
        _release_one(one_model, tmp_path, pin=True)
    assert time.monotonic() - start < 120
    assert "revision" not in json.loads((one_model / "levit128_harmonized.json").read_text()).get("hub", {})
    fake_hub.stall.clear()
    (item,) = _release_one(one_model, tmp_path, pin=True)  # the next run finishes it
    assert item.pinned and item.commit_oid == fake_hub.refs[f"{ORG}/levit128_harmonized"]["main"]


def test_a_repo_holding_another_model_is_refused_unless_forced(fake_hub, one_model, tmp_path):
    repo = f"{ORG}/levit128_harmonized"
    fake_hub.add_commit(repo, {".gitattributes": b"", "metadata.json": json.dumps({"name": "vgg16_harmonized"}).encode(),
                               "model.weights.h5": b"other weights"})
    with pytest.raises(PublishError, match=r"already holds another model, 'vgg16_harmonized'.*--force"):
        _release_one(one_model, tmp_path, pin=True)
    assert fake_hub.commit_log == []
    (item,) = _release_one(one_model, tmp_path, pin=True, force=True)
    assert json.loads(fake_hub.files(repo)["metadata.json"])["name"] == "levit128_harmonized" and item.pinned


def test_a_damaged_build_is_rebuilt_not_uploaded(fake_hub, one_model, tmp_path):
    (first,) = _release_one(one_model, tmp_path)
    folder = tmp_path / "work" / "levit128_harmonized"
    (folder / "config.json").write_text("{}")  # damaged after it was built
    (tmp_path / "work" / "levit128_harmonized.partial").mkdir()  # a build that was killed
    before = len(fake_hub.requests)
    (second,) = _release_one(one_model, tmp_path)
    assert second.uploaded == [] and second.commit_oid == first.commit_oid  # rebuilt, equal, nothing sent
    assert _writes(fake_hub, before) == []
    assert not (tmp_path / "work" / "levit128_harmonized.partial").exists()


def test_cli_errors_are_one_line(fake_hub, one_model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    assert cli.main(["publish", "--all", "--models-dir", str(one_model), "--work-dir", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("harmonization publish: error: No Hugging Face token") and "\n" not in err
    assert cli.main(["publish", "--all", "vgg16_harmonized"]) == 1
    assert "not both" in capsys.readouterr().err
    assert cli.main(["publish", "vgg16_harmonized", "levit128_harmonized", "--repo-id", "a/b"]) == 1
    assert "publish one model" in capsys.readouterr().err


# --- the workflow ------------------------------------------------------------------------------------------------


class _PullRequests(BaseHTTPRequestHandler):
    """GitHub's REST endpoint `POST /repos/{owner}/{repo}/pulls`, as the workflow calls it."""

    received: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        answer = json.dumps({"number": 1, "html_url": "http://127.0.0.1/pull/1"}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def test_the_workflow_is_dispatched_by_hand_with_the_token_as_a_secret():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert set(workflow[True]) == {"workflow_dispatch"}  # YAML reads the key `on` as True
    steps = {step.get("name"): step for step in workflow["jobs"]["release"]["steps"]}
    assert steps["Publish and pin"]["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    assert "--pin" in steps["Publish and pin"]["run"] and "--all" in steps["Publish and pin"]["run"]
    assert steps["Open a pull request with the pinned revisions"]["env"]["GH_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
    assert workflow["permissions"] == {"contents": "write", "pull-requests": "write"}


def test_the_workflow_opens_a_pull_request_with_the_pinned_revisions(tmp_path):
    remote = tmp_path / "remote.git"
    work = tmp_path / "clone"
    git = ["git", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "--bare", str(remote)], check=True, capture_output=True)
    subprocess.run([*git, "init", str(work)], check=True, capture_output=True)
    shutil.copytree(ROOT / "models", work / "models")
    for command in (["add", "models"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-m", "zoo"],
                    ["remote", "add", "origin", str(remote)], ["push", "origin", "main"]):
        subprocess.run(["git", *command], cwd=work, check=True, capture_output=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1", "GITHUB_RUN_ID": "42",
           "GITHUB_REF_NAME": "main", "GITHUB_REPOSITORY": "owner/harmonization-hub", "GH_TOKEN": "gh_test"}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PullRequests)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env["GITHUB_API_URL"] = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        unchanged = _run_workflow_step("Open a pull request with the pinned revisions", env, work)
        assert unchanged.returncode == 0 and "nothing to propose" in unchanged.stdout
        assert _PullRequests.received == []
        zoo.pin_hub_revision(work / "models", "vgg16_harmonized", "test-org/vgg16_harmonized", "a" * 40)
        opened = _run_workflow_step("Open a pull request with the pinned revisions", env, work)
    finally:
        server.shutdown()
        server.server_close()
    assert opened.returncode == 0, opened.stderr
    (request,) = _PullRequests.received
    assert request["path"] == "/repos/owner/harmonization-hub/pulls" and request["auth"] == "Bearer gh_test"
    assert request["body"]["head"] == "release/hub-42" and request["body"]["base"] == "main"
    pushed = subprocess.run(["git", "show", "release/hub-42:models/vgg16_harmonized.json"], cwd=remote,
                            capture_output=True, text=True, check=True).stdout
    assert json.loads(pushed)["hub"] == {"repo_id": "test-org/vgg16_harmonized", "revision": "a" * 40}


def test_pinning_changes_only_the_hub_object(tmp_path):
    shutil.copytree(ROOT / "models", tmp_path / "models")
    before = json.loads((tmp_path / "models" / "vit_b16_harmonized.json").read_text())
    zoo.pin_hub_revision(tmp_path / "models", "vit_b16_harmonized", "org/vit_b16_harmonized", "b" * 40)
    after = json.loads((tmp_path / "models" / "vit_b16_harmonized.json").read_text())
    assert after.pop("hub") == {"repo_id": "org/vit_b16_harmonized", "revision": "b" * 40}
    assert after == {k: v for k, v in before.items() if k != "hub"}
    assert list(json.loads((tmp_path / "models" / "vit_b16_harmonized.json").read_text())) == list(
        {**before, "hub": None})
    entries = zoo.read_entries(tmp_path / "models")
    assert entries["vit_b16_harmonized"]["hub"]["revision"] == "b" * 40


def test_the_default_namespace_is_ours_and_set_in_one_place():
    defaults = json.loads((ROOT / "models" / zoo.FAMILY_DEFAULTS_FILE).read_text())
    assert zoo.default_namespace() == defaults["hub"]["repo_id"].split("/")[0] == "harmonization-hub"
    assert all(zoo.model_info(n)["hub"]["repo_id"] == f"harmonization-hub/{n}" for n in zoo.list_models())
