"""Run-directory bookkeeping (rank 0 only): identity, lock, complete checkpoints, the final model.

A run directory never mixes two configs or two writers: ``run.json`` holds the training
identity and its hash, and resuming under another config is refused naming the keys; a
lock file (pid, host, heartbeat) keeps a second process out of a live run and is taken over
when its owner is dead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from asft_repro.errors import ProjectError
from asft_repro.files import write_json_atomic
from asft_repro.identity import identity_diff, peft_change
from asft_repro.jsonl import read_jsonl
from asft_repro.shards import dcp_problem
from asft_repro.weights import record_weights, recorded_problem

RUN_RECORD = "run.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
FINAL_DIR = "final"
LOCK_STALE_S = 600.0  # a lock not refreshed for this long (another host's) is stale
HEARTBEAT_S = 30.0
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # a peft=lora checkpoint holds the adapter alone
log = logging.getLogger(__name__)


class RunDirError(ProjectError, RuntimeError):
    """The run directory holds results this invocation must not overwrite."""


def read_record(out: Path) -> dict[str, Any]:
    path = out / RUN_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def write_record(out: Path, **fields: Any) -> None:
    """Merge ``fields`` into run.json atomically (a unique temp file, then rename)."""
    write_json_atomic(out / RUN_RECORD, {**read_record(out), **fields})


# ---- checkpoints ---------------------------------------------------------------------------------

def _has_any(folder: Path, names: tuple[str, ...], globs: tuple[str, ...] = ()) -> bool:
    if any((folder / n).is_file() and (folder / n).stat().st_size > 0 for n in names):
        return True
    return any(any(folder.glob(g)) for g in globs)


def has_weights(folder: Path) -> bool:
    """A saved model folder with its weights (single file, sharded index, or DCP shards)."""
    return folder.is_dir() and _has_any(folder, WEIGHT_FILES, ("pytorch_model_fsdp_*",))


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (None when it is complete)."""
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return "no readable trainer_state.json"
    sharded = dcp_problem(folder)  # fsdp2: every rank's shard of model and optimizer (asft_repro/shards.py)
    if sharded:
        return sharded
    deepspeed = any(folder.glob("global_step*"))
    if not (has_weights(folder) or deepspeed or _has_any(folder, ADAPTER_FILES)):
        return "no model weights"
    if not (deepspeed or _has_any(folder, ("optimizer.pt",), ("optimizer_*",))):
        return "no optimizer.pt"
    if not _has_any(folder, ("scheduler.pt",)):
        return "no scheduler.pt"
    return None


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders, newest first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def last_complete_checkpoint(out: Path, set_aside: bool = False) -> Path | None:
    """The newest complete checkpoint; incomplete newer ones are warned about (and renamed if ``set_aside``)."""
    for folder in checkpoints(out) if out.is_dir() else []:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log.warning("%s is incomplete (%s), probably killed while saving: skipped", folder, problem)
        if set_aside:
            folder.rename(folder.with_name(f"incomplete-{folder.name}-{int(time.time())}"))
    return None


def checkpoint_step(folder: Path) -> tuple[int, int]:
    """(global_step, max_steps) recorded in a checkpoint's trainer_state.json."""
    state = json.loads((folder / "trainer_state.json").read_text())
    return int(state.get("global_step", 0)), int(state.get("max_steps", 0))


def publish_final(out: Path, staging: Path) -> Path:
    """Move a fully written model folder into place as ``final/`` and record its weight files' sizes and sha256s
    in run.json (``final_files``, checked before any reuse); refuses one without weights."""
    if not has_weights(staging):
        raise RunDirError(f"{staging} has no model weights after saving (with strategy=zero3 the JSON needs "
                          f"stage3_gather_16bit_weights_on_model_save: true); the run is not marked complete")
    files = record_weights(staging)
    final = out / FINAL_DIR
    if final.exists():
        shutil.rmtree(final)
    staging.replace(final)
    write_record(out, final_files=files)
    return final


def final_problem(folder: Path, record: dict[str, Any], hashes: bool = True) -> str | None:
    """How the model folder differs from run.json's ``final_files`` (sizes; sha256s too if ``hashes``); None when
    it matches or nothing was recorded (Base, runs from before the record)."""
    files = record.get("final_files")
    return recorded_problem(Path(folder), files, hashes) if files else None


def redo_final_command(record: dict[str, Any]) -> str:
    """The training command that re-saves a run's final/ from its last checkpoint."""
    kept = [o for o in record.get("overrides", []) if not o.startswith(("train.resume=", "train.redo_final="))]
    return " ".join(["python -m asft_repro.train", *kept, "train.resume=true", "train.redo_final=true"])


# ---- identity and state ---------------------------------------------------------------------------

def check_run_dir(out: Path, resume: bool, identity: dict[str, Any], data_sha256: str | None) -> None:
    """Raise unless ``out`` is new, or ``resume`` is set for a run of this very config and data."""
    record = read_record(out)
    if record.get("identity") is not None:
        peft = peft_change(record["identity"], identity)  # a LoRA checkpoint resumed without its peft settings
        if peft:
            raise RunDirError(f"{out} {peft}")
        diff = identity_diff(record["identity"], identity)
        if diff:
            raise RunDirError(f"{out} was trained under another config ({'; '.join(diff)}); "
                              f"use another output_dir/experiment_name, or restore those values")
    old_sha = record.get("data_manifest", {}).get("sha256")
    if old_sha and data_sha256 and old_sha != data_sha256:
        raise RunDirError(f"{out} was trained on other data (sha256 {old_sha[:12]} now {data_sha256[:12]}); "
                          f"re-prepare the same subset or use another experiment_name")
    if resume:
        return
    if record.get("train_status") == "complete":
        raise RunDirError(f"{out} already holds a finished run; pass train.resume=true to reuse it "
                          f"(evaluation still missing is then run), or choose another experiment_name")
    if checkpoints(out) or (out / METRICS_FILE).exists():
        raise RunDirError(f"{out} holds an unfinished run; pass train.resume=true to continue it from its last "
                          f"checkpoint, or delete the directory to start over")


def trim_metrics(out: Path, up_to_step: int) -> None:
    """Drop metrics.jsonl rows logged after the step a resumed run restarts from (a torn tail too)."""
    path = out / METRICS_FILE
    if not path.exists():
        return
    kept = [row for row in read_jsonl(path) if row.get("step", 0) <= up_to_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    tmp.replace(path)


# ---- lock -----------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``<run>/.lock`` held by one process while it writes; a heartbeat thread keeps it fresh."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _is_stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:
            return True  # unreadable: its writer died between create and write
        if holder.get("host") == socket.gethostname():
            return not _pid_alive(int(holder.get("pid", -1)))
        return time.time() - self.path.stat().st_mtime > LOCK_STALE_S

    def acquire(self) -> None:
        """Create the lock with its content in one step (link a written temp file); take over a stale one."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = self.path.with_name(f"{LOCK_FILE}.{socket.gethostname()}.{os.getpid()}")
        tmp.write_text(json.dumps(me))
        try:
            for _attempt in range(2):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    holder = self._holder()
                    if not self._is_stale(holder):
                        raise RunDirError(f"{self.path.parent} is being written by pid {holder['pid']} on "
                                          f"{holder['host']} (since {holder.get('since')}); wait for it, or delete "
                                          f"{self.path} if that process is gone") from None
                    log.warning("%s: taking over the stale lock of pid %s on %s", self.path.parent,
                                (holder or {}).get("pid"), (holder or {}).get("host"))
                    self.path.unlink(missing_ok=True)
                    continue
                self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lock-heartbeat")
                self._thread.start()
                return
        finally:
            tmp.unlink(missing_ok=True)
        raise RunDirError(f"could not take {self.path}: another process keeps creating it; retry")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
