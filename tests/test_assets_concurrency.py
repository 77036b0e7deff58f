"""Several processes using the default model for the first time on a fresh ``SAFEFLOW_HOME``: one
converts it (under a file lock, into a temporary folder published by one rename), all succeed, no
reader ever sees a half-built model folder, and the folder is readable by others."""

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safeflow.assets import cache_root, is_fetched, manifest, package_dir

ROOT = Path(__file__).resolve().parents[1]
NAME = "smollm2-135m-instruct"
PACKAGE = manifest()["models"][NAME]["package"]

pytestmark = pytest.mark.skipif(not is_fetched(PACKAGE), reason=f"{PACKAGE} not fetched (run `safeflow assets fetch`)")

LOAD = ("import safeflow as sf; m, t = sf.load_model(progress=False); "
        "print(m.config.hidden_size, len(t('hello')['input_ids']))")


def test_three_first_users_all_succeed_and_never_see_a_half_built_folder(tmp_path):
    home = tmp_path / "home"
    fetched = package_dir(PACKAGE)  # the already fetched wheel contents, shared read-only (no download)
    (home / "packages").mkdir(parents=True)
    (home / "packages" / fetched.name).symlink_to(fetched)
    env = {**os.environ, "SAFEFLOW_HOME": str(home), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    target = home / "models" / NAME
    seen_complete = False
    while any(p.poll() is None for p in procs):  # a reader looking at the folder all along
        if target.exists():
            names = set(os.listdir(target))
            assert {"model.safetensors", "config.json", "tokenizer.json"} <= names, names
            seen_complete = True
        time.sleep(0.05)
    results = [(p.returncode, *p.communicate()) for p in procs]
    for code, out, err in results:
        assert code == 0, err[-2000:]
        assert out.split()[0] == "576"
    assert seen_complete or target.is_dir()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0o700
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]  # no leftovers
    assert cache_root() != home  # the test never touched the user's cache
