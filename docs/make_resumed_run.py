"""Regenerate ``docs/resumed_run.png``: a real run on the tiny demo bundle, stopped with SIGTERM part-way (as a
cluster does before preemption), resumed with the command it printed, and plotted: one curve for the whole run.

    python docs/make_resumed_run.py [WORK_DIR]
"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS, STOP_AFTER = 40, 15


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "continue_pt.cli", *args], cwd=ROOT, text=True, **kwargs)


def main(work: Path) -> None:
    from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER, write_demo_corpus
    from converters.convert import convert_checkpoint

    bundle = convert_checkpoint(CHECKPOINT, work / "bundle", kmeans=KMEANS, kmeans_layer=KMEANS_LAYER, overwrite=True)
    audio = write_demo_corpus(work / "audio", num_files=16, seconds=2.5)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    log = work / "first.log"
    with open(log, "w") as fh:
        first = _cli("pretrain", "--init-from", str(bundle), "--train-data", str(audio), "--output-dir", str(run),
                     "--max-steps", str(MAX_STEPS), "--warmup-steps", "5", "--lr", "2e-4", "--max-batch-seconds", "5",
                     stdout=fh, stderr=subprocess.STDOUT)
        while f"{STOP_AFTER}/{MAX_STEPS}" not in log.read_text(errors="replace"):
            if first.poll() is not None:
                raise SystemExit(f"the run ended early:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        first.wait()
    said = log.read_text(errors="replace")
    print(said[said.index("SIGTERM received: stopped"):].strip())
    command = shlex.split(said.split("resume with: ")[1].splitlines()[0])[1:]
    if _cli(*command).wait() != 0:
        raise SystemExit("the resumed run failed")
    from PIL import Image

    target = ROOT / "docs" / "resumed_run.png"
    with Image.open(run / "curves.png") as png:  # a 64-colour palette: the README's copy stays small
        png.convert("RGB").quantize(64).save(target, optimize=True)
    print(f"wrote {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="resumed_run_")))
