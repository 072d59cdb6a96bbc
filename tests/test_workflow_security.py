"""The shipped GitHub workflow publishes safely (issue 14, finding 2(d)).

- it publishes only through `qwen-ft-images build --push` (the project's immutable push);
- write permissions live only on the job that needs them, and that job never runs for
  pull requests; the workflow default is read-only;
- no checkout leaves the token in .git/config;
- every third-party action is pinned by a full commit SHA;
- what it publishes gets SBOM and provenance attestations.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

WORKFLOW = Path(__file__).resolve().parent.parent / ".github" / "workflows" / "images.yml"


def workflow() -> dict[str, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(data, dict)
    return data


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job.get("steps") or [])


def uses(job: dict[str, Any]) -> list[str]:
    return [str(s["uses"]) for s in steps(job) if "uses" in s]


def writes(job: dict[str, Any]) -> set[str]:
    perms = job.get("permissions") or {}
    if perms == "write-all":
        return {"*"}
    return {k for k, v in perms.items() if v == "write"}


def never_on_pull_requests(job: dict[str, Any]) -> bool:
    condition = str(job.get("if", "")).replace('"', "'")
    return condition.strip() in ("github.event_name != 'pull_request'", "github.event_name == 'push'")


def test_default_token_is_read_only() -> None:
    assert workflow()["permissions"] == {"contents": "read"}


def test_write_permissions_only_on_trusted_events() -> None:
    jobs = workflow()["jobs"]
    writers = {name for name, job in jobs.items() if writes(job)}
    # publish pushes each platform's content tag; manifests turns alias/pinned tags into lists
    assert writers == {"publish", "manifests"}, writers
    for name in writers:
        assert never_on_pull_requests(jobs[name]), f"{name} can run for a pull request with write rights"
    for name, job in jobs.items():
        needs_login = any("docker login" in str(s.get("run", "")) for s in steps(job))
        if needs_login or "secrets." in yaml.safe_dump(job):
            assert never_on_pull_requests(job), f"{name} uses a secret on pull requests"


WORKFLOWS = sorted(WORKFLOW.parent.glob("*.yml"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_checkouts_do_not_persist_credentials(path: Path) -> None:
    for name, job in yaml.safe_load(path.read_text())["jobs"].items():
        for step in steps(job):
            if str(step.get("uses", "")).startswith("actions/checkout@"):
                assert (step.get("with") or {}).get("persist-credentials") is False, name


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_third_party_actions_are_pinned_by_commit(path: Path) -> None:
    text = path.read_text()
    refs = re.findall(r"uses:\s*([^\s#]+)(\s*#\s*(\S+))?", text)
    assert refs
    for ref, _, tag in refs:
        if ref.startswith("./"):
            continue
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), f"{ref} is not pinned by commit SHA"
        assert re.fullmatch(r"v\d+(\.\d+)*", tag or ""), f"{ref}: say which release tag the SHA is"


def test_publishing_goes_through_the_immutable_push() -> None:
    jobs = workflow()["jobs"]
    for name, job in jobs.items():
        assert not any(u.startswith("docker/build-push-action") for u in uses(job)), name
    runs = " ".join(str(s.get("run", "")) for s in steps(jobs["publish"]))
    assert 'qwen-ft-images build --push --registry "$REGISTRY"' in runs
    pr_runs = " ".join(str(s.get("run", "")) for s in steps(jobs["build"]))
    assert "qwen-ft-images build" in pr_runs and "--push" not in pr_runs
    assert jobs["build"]["if"] == "github.event_name == 'pull_request'"
    assert "publish" in jobs["smoke"]["needs"] and never_on_pull_requests(jobs["smoke"])


def test_published_images_get_sbom_and_provenance_attestations() -> None:
    job = workflow()["jobs"]["publish"]
    attests = [s for s in steps(job) if str(s.get("uses", "")).startswith("actions/attest@")]
    kinds = {"sbom" if "sbom-path" in s["with"] else "provenance" for s in attests}
    assert kinds == {"sbom", "provenance"}
    for step in attests:
        assert step["with"]["subject-digest"] == "${{ steps.push.outputs.digest }}"
        assert step["with"]["push-to-registry"] is True
    assert any(u.startswith("anchore/sbom-action@") for u in uses(job))
    assert {"id-token", "attestations", "packages"} <= writes(job)
