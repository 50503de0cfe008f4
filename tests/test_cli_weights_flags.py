"""`--use_ema`, `--variant`, `--revision` of `pbe_jax.sample` and `pbe_jax.evaluate` reach
`PaintByExample.from_pretrained` (whose handling of each is tested with the loaders). Each CLI
runs in its own process (their absl flags share names), with `from_pretrained` replaced by a
stand-in that prints what it was given and stops the run; one process parses several command
lines in turn (one start-up per CLI)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.train_utils import REPO, subprocess_env

# argv[1]: the command lines as JSON; each is parsed as `app.run` parses flags, then main runs
# until the stand-in stops it.
STUB = """
import json, sys
from absl import flags
from pbe_jax.pipeline import PaintByExample
from pbe_jax import {cli} as cli

def from_pretrained(cls, path, **kw):
    print("FROM_PRETRAINED " + json.dumps({{"path": path, **{{k: kw.get(k) for k in
          ("use_ema", "variant", "revision")}}}}), flush=True)
    sys.exit(7)

PaintByExample.from_pretrained = classmethod(from_pretrained)
cli.define_flags()
for args in json.loads(sys.argv[1]):
    flags.FLAGS.unparse_flags()
    try:
        cli.main(flags.FLAGS([sys.argv[0], *args]))
    except SystemExit as e:
        assert e.code == 7, e.code
    else:
        raise AssertionError("main returned without calling from_pretrained")
"""


def run_each(cli: str, argvs: list[list[str]]) -> list[dict]:
    """What `from_pretrained` received for each command line of `pbe_jax.<cli>` (one process)."""
    r = subprocess.run([sys.executable, "-c", STUB.format(cli=cli), json.dumps(argvs)], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = [json.loads(x[len("FROM_PRETRAINED "):]) for x in r.stdout.splitlines()
           if x.startswith("FROM_PRETRAINED ")]
    assert len(got) == len(argvs), r.stdout
    return got


def _run(cli: str, args: list[str]) -> dict:
    return run_each(cli, [args])[0]


@pytest.fixture
def manifest(tmp_path):
    img = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
    mask = Image.fromarray(np.full((16, 16), 255, np.uint8))
    for name, im in (("s.png", img), ("m.png", mask), ("r.png", img)):
        im.save(tmp_path / name)
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps({"id": "0", "source": "s.png", "mask": "m.png", "reference": "r.png"}) + "\n")
    return str(path)


def test_sample_flags(manifest, tmp_path):
    got = _run("sample", ["--model=runs/mine", f"--manifest={manifest}", f"--out={tmp_path / 'out'}",
                          "--use_ema", "--variant=fp16", "--revision=v2"])
    assert got == {"path": "runs/mine", "use_ema": True, "variant": "fp16", "revision": "v2"}
    got = _run("sample", ["--model=org/pbe", f"--manifest={manifest}", f"--out={tmp_path / 'out'}"])
    assert got == {"path": "org/pbe", "use_ema": None, "variant": None, "revision": None}  # None: EMA when the run has it


def test_evaluate_flags(manifest, tmp_path):
    got = _run("evaluate", [f"--bench={manifest}", "--model=runs/mine", f"--out={tmp_path / 'ev'}",
                            "--use_ema", "--revision=abc"])
    assert got == {"path": "runs/mine", "use_ema": True, "variant": None, "revision": "abc"}
