"""Docker tier: the image runs under an arbitrary non-root UID in group 0 (issue 14, finding 10).

OpenShift, and Kubernetes with runAsNonRoot, start containers as a random UID that has
no passwd entry and belongs to group 0. Every cache, HOME and /workspace must then be
writable, and a training run must write its outputs where the user points.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from docker_support import Built, docker

pytestmark = pytest.mark.docker

CACHES = (
    "HOME",
    "XDG_CACHE_HOME",
    "HF_HOME",
    "TRITON_CACHE_DIR",
    "TORCH_HOME",
    "TORCHINDUCTOR_CACHE_DIR",
    "PIP_CACHE_DIR",
    "MPLCONFIGDIR",
)

CHECK = f"""
import json, os, pathlib
out = {{"uid": os.getuid(), "gid": os.getgid(), "writable": {{}}}}
for name in {CACHES!r} + ("/workspace",):
    folder = pathlib.Path(os.environ.get(name, "") if not name.startswith("/") else name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"probe-{{os.getuid()}}").write_text("x")
        (folder / "sub").mkdir(exist_ok=True)
        out["writable"][name] = str(folder)
    except OSError as exc:
        out["writable"][name] = f"NO ({{os.environ.get(name)!r}}: {{exc.strerror}})"
print(json.dumps(out))
"""

MAKE_MODEL = (
    "from qwen_ft_runtime.model import build_tiny; from qwen_ft_runtime.data import build_tokenizer; "
    "build_tiny('qwen2-tiny', 'sdpa', 'fp32', seed=0).save_pretrained('/workspace/ckpt'); "
    "build_tokenizer().save_pretrained('/workspace/ckpt')"
)

DATA = "\n".join(
    json.dumps(
        {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
    )
    for i in range(8)
)


def test_a_random_uid_in_group_0_can_cache_work_and_train(tmp_path: Path, built_cpu: Built) -> None:
    image_id = built_cpu.result("cpu-fp32")["image_id"]
    assert isinstance(image_id, str)  # by id: other runs on this daemon may move the tag
    uid = random.randint(10_000, 2_000_000_000)  # no passwd entry, like OpenShift's
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o770)  # the user's output folder: writable by group 0, as a cluster volume would be
    script = (
        f"python -c {_sh(CHECK)} && python -c {_sh(MAKE_MODEL)} && printf '%s\\n' {_sh(DATA)} > /workspace/d.jsonl"
        " && qwen-ft-runtime train --model /workspace/ckpt --data /workspace/d.jsonl"
        " --output /out/adapter --steps 2 --batch-size 2"
    )
    proc = docker(
        "run", "--rm", "--user", f"{uid}:0", "-v", f"{out}:/out", image_id, "sh", "-c", script,
        check=False, timeout=600,
    )  # fmt: skip
    first = proc.stdout.splitlines()[0] if proc.stdout else "{}"
    report = json.loads(first)
    assert report.get("uid") == uid and report.get("gid") == 0, proc.stdout + proc.stderr
    not_writable = {k: v for k, v in report["writable"].items() if str(v).startswith("NO")}
    assert not not_writable, not_writable
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file(), sorted(p.name for p in out.rglob("*"))
    assert adapter.stat().st_uid == uid, "outputs are written by the running user, where they pointed"


def _sh(text: str) -> str:
    import shlex

    return shlex.quote(text)
