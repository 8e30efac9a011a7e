"""What checkpoint checksums cost (largessl/checksums.py): hashing at save next to the write, verifying at resume
next to the load, on the real DeepSpeed engine of a real recipe, in one process.

    python benchmarks/checksum_cost.py [--recipes pretrain/mae_vitb16 pretrain/mae_vitl16] [--zero-stage 1]
        [--repeats 3] [--workdir DIR] [--json FILE]

First, how fast each candidate checksum (zlib's CRC-32 and hashlib's algorithms) hashes 256 MiB held in memory, on
one thread and on one thread per core (two buffers per thread): the choice of checksums.ALGORITHM. Then, for each
recipe, the trainer is built as `largessl bench` builds it (fp32, one process, micro-batch 1, the bundled images as
shards in --workdir) and takes one optimizer step, so the AdamW state exists and the checkpoint has its real size.
Then, --repeats times, two saves on new tags (new files, as in training; the previous round's tags are deleted
first, as pruning would; which save goes first alternates between rounds) and a resume, each step timed alone:

- write: `Engine.save` with checksums.FOLLOW_WRITES off (DeepSpeed's torch.save of every file; the page cache
  absorbs it, no fsync, as in training); then hashed after it: `checksums.digests` of the tag's files (warm page
  cache), CRC-32 and, for comparison, SHA-256 (what tags were written with before)
- write, hashed while writing: `Engine.save` as training makes it, each file hashed as it lands (its time includes
  what is left); left after it: what waits for the hashing once torch.save has returned, each file's
  `Follower.finish` (the segments not yet hashed) and `checksums.written_digests`. "left / write" is left after
  it over the write alone (medians); the two writes' difference is mostly the kernel's writeback
- verify, warm: `checkpointing.verify` (the files still cached) and load, warm: `checkpointing.load`
- verify, cold: the files flushed and dropped from the page cache (fsync + POSIX_FADV_DONTNEED), then verify, then
  the load that follows it on a resume; and load, cold: dropped again, load alone

Prints two tables (the checkpoint's: the best of the repeats, seconds: on a shared machine the least disturbed)
and one JSON line with every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from largessl import checkpoint, checkpointing, checksums  # noqa: E402

ALGORITHMS = ("crc32", "sha256", "sha1", "blake2b", "sha512", "md5", "blake2s", "sha3_256")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["pretrain/mae_vitb16", "pretrain/mae_vitl16"])
    parser.add_argument("--zero-stage", type=int, choices=(0, 1), default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the scratch directory goes (created; default: the system's temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON line here")
    return parser.parse_args(argv)


def hash_speeds(size: int = 256 << 20) -> dict[str, dict[int, float]]:
    """GB/s of each checksum over `size` random bytes in memory, in 8 MiB updates, on 1 thread and on as many
    threads as checksums.threads allows (each thread hashes the buffer twice)."""
    data = memoryview(os.urandom(size))

    def one(name: str) -> None:
        digest = checksums.new(name)
        for start in range(0, size, checksums.CHUNK):
            digest.update(data[start:start + checksums.CHUNK])

    speeds = {}
    for name in ALGORITHMS:
        speeds[name] = {}
        for threads in sorted({1, checksums.threads(64)}):
            with ThreadPoolExecutor(threads) as pool:
                took = timed(lambda: list(pool.map(one, [name] * 2 * threads)))  # noqa: B023 (called at once)
            speeds[name][threads] = 2 * threads * size / took / 1e9
    return speeds


def make_shards(workdir: Path) -> Path:
    """The bundled 500 training images as a shard dataset (data_tools imagefolder), once per workdir."""
    out = workdir / "shards"
    if not (out / "dataset.json").is_file():
        subprocess.run([sys.executable, "-m", "data_tools", "imagefolder", str(REPO / "demo/imagenette-mini/train"),
                        str(out), "--split", "train", "--samples-per-shard", "128"], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def build(recipe: str, shards: Path, workdir: Path, stage: int) -> Any:
    """The recipe's trainer (fp32, one process, micro-batch 1) after one optimizer step."""
    from largessl.bench import TimedFeed
    from largessl.config.load import load_config
    from largessl.trainer import Trainer

    cfg = load_config(recipe, [
        f"data.train={shards}", "data.micro_batch_size=1", "optim.global_batch_size=1", "data.num_workers=0",
        "distributed.precision=fp32", f"distributed.zero_stage={stage}", "trainer.max_steps=1",
        "trainer.epochs=null", "optim.warmup_steps=0", "optim.warmup_epochs=null", "tracking.enabled=false",
        "eval.knn_every=0", "trainer.ckpt_every=1000", "run.name=" + recipe.replace("/", "_")])
    trainer = Trainer(replace(cfg, run=replace(cfg.run, output_dir=str(workdir / "runs"))))
    trainer.train_step(TimedFeed(trainer.batches, trainer.env.device, synthetic=False), want_norm=False)
    trainer.step = 1
    return trainer


def timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def drop_cache(tag_dir: Path) -> None:
    """Flush the tag's files to disk and drop them from the page cache, so the next read comes from the disk."""
    for path in tag_dir.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def new_tag(trainer: Any, tag: str) -> Path:
    """An empty `tag`, marked incomplete."""
    tag_dir = trainer.ckpt_dir / tag
    tag_dir.mkdir(parents=True)
    checkpoint.begin_save(tag_dir)
    return tag_dir


def save_hashed_after(trainer: Any, tag: str) -> dict[str, float]:
    """The write alone, then the tag's files hashed from disk (warm page cache): CRC-32, then SHA-256 as before."""
    tag_dir = new_tag(trainer, tag)
    checksums.FOLLOW_WRITES = False
    try:
        times = {"write": timed(lambda: trainer.engine.save(trainer.ckpt_dir, tag, trainer.client_state()))}
    finally:
        checksums.FOLLOW_WRITES = True
    names = checkpoint.tag_files(tag_dir)
    times["hash_after_write"] = timed(lambda: checksums.digests(tag_dir, names))
    times["sha256_after_write"] = timed(lambda: checksums.digests(tag_dir, names, "sha256"))
    return times


def save_hashed_while_writing(trainer: Any, tag: str) -> dict[str, float]:
    """The write as training makes it (hashed while written), and what is left once torch.save returns: each
    file's `Follower.finish` (the rest of the file hashed), then checksums.written_digests. The tag is marked
    complete, for the verify and load that follow."""
    tag_dir = new_tag(trainer, tag)
    finishing: list[float] = []
    finish = checksums.Follower.finish

    def timed_finish(follower: checksums.Follower) -> None:
        finishing.append(timed(lambda: finish(follower)))

    checksums.Follower.finish = timed_finish  # type: ignore[method-assign]
    try:
        times = {"write_following": timed(lambda: trainer.engine.save(trainer.ckpt_dir, tag,
                                                                      trainer.client_state()))}
    finally:
        checksums.Follower.finish = finish  # type: ignore[method-assign]
    names = checkpoint.tag_files(tag_dir)
    digests: list[dict[str, str]] = []
    times["left_after_write"] = sum(finishing) + timed(lambda: digests.append(checksums.written_digests(tag_dir,
                                                                                                        names)))
    checkpoint.mark_complete(trainer.ckpt_dir, tag, {"zero_stage": trainer.zero_stage, "world_size": 1}, digests)
    return times


def one_round(trainer: Any, number: int) -> dict[str, float]:
    """Both saves, each on a new tag (the previous round's deleted first, as pruning would; the one hashed after its
    write goes first in even rounds and second in odd ones: how fast a write fills the page cache depends on what
    the kernel still has to write back), then verify and load the tag hashed while written, each step timed alone
    (seconds)."""
    ckpt_dir, engine = trainer.ckpt_dir, trainer.engine
    for old in checkpoint.step_tags(ckpt_dir):
        shutil.rmtree(ckpt_dir / old)
    tag = checkpoint.tag_for(2 * number + 2)
    saves = [lambda: save_hashed_after(trainer, checkpoint.tag_for(2 * number + 1)),
             lambda: save_hashed_while_writing(trainer, tag)]
    times = {}
    for save in saves if number % 2 == 0 else saves[::-1]:
        times.update(save())
    tag_dir = ckpt_dir / tag
    times["verify_warm"] = timed(lambda: checkpointing.verify(tag_dir))
    times["load_warm"] = timed(lambda: checkpointing.load(engine, None, ckpt_dir, tag))
    drop_cache(tag_dir)
    times["verify_cold"] = timed(lambda: checkpointing.verify(tag_dir))
    times["load_after_verify"] = timed(lambda: checkpointing.load(engine, None, ckpt_dir, tag))
    drop_cache(tag_dir)
    times["load_cold"] = timed(lambda: checkpointing.load(engine, None, ckpt_dir, tag))
    return times


def measure(recipe: str, shards: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    trainer = build(recipe, shards, workdir, args.zero_stage)
    try:
        rounds = [one_round(trainer, n) for n in range(args.repeats)]
        tag_dir = trainer.ckpt_dir / checkpoint.tag_for(2 * args.repeats)
        sizes = {name: (tag_dir / name).stat().st_size for name in checkpoint.tag_files(tag_dir)}
        return {"recipe": recipe, "model": trainer.cfg.model.name, "zero_stage": args.zero_stage,
                "parameters_m": trainer.engine.num_parameters() / 1e6, "files": sizes, "gb": sum(sizes.values()) / 1e9,
                "best_s": {key: min(r[key] for r in rounds) for key in rounds[0]},
                "median_s": {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}, "rounds": rounds}
    finally:
        trainer.close("FINISHED")


def print_speeds(speeds: dict[str, dict[int, float]]) -> None:
    counts = sorted(next(iter(speeds.values())))
    print("| algorithm | " + " | ".join(f"{n} thread(s): GB/s" for n in counts) + " |")
    print("| --- |" + " --- |" * len(counts))
    for name, by_threads in speeds.items():
        print(f"| {name} | " + " | ".join(f"{by_threads[n]:.2f}" for n in counts) + " |")


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\nchecksum cost, {checksums.ALGORITHM}, {checksums.threads(64)} hashing thread(s); best of the repeats, s "
          "(median in brackets)")
    print("| model | ZeRO | files | GB | write | hashed after it | sha256 after it | write, hashed while writing | "
          "left after it | left / write | verify (warm) | load (warm) | verify (cold) | load after it | "
          "load alone (cold) |")
    print("| --- |" + " --- |" * 14)
    for r in results:
        best, median = r["best_s"], r["median_s"]
        cells = [f"{best[key]:.2f} ({median[key]:.2f})" for key in ("write", "hash_after_write", "sha256_after_write",
                                                                      "write_following", "left_after_write")]
        cells.append(f"{added(median):.2f}")
        cells += [f"{best[key]:.2f}" for key in ("verify_warm", "load_warm", "verify_cold", "load_after_verify",
                                                 "load_cold")]
        print(f"| {r['model']} ({r['parameters_m']:.0f}M) | {r['zero_stage']} | {len(r['files'])} | {r['gb']:.2f} | "
              + " | ".join(cells) + " |")


def added(times: dict[str, float]) -> float:
    """What waits for hashing after the write, as a fraction of the write alone."""
    return times["left_after_write"] / times["write"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)  # the scratch directory goes inside it
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    speeds = hash_speeds()
    print_speeds(speeds)
    with tempfile.TemporaryDirectory(prefix="checksum-cost-", dir=args.workdir) as scratch:
        workdir = Path(scratch)
        shards = make_shards(workdir)
        results = [measure(recipe, shards, workdir, args) for recipe in args.recipes]
    print_speeds(speeds)
    print_table(results)
    line = json.dumps({"algorithm": checksums.ALGORITHM, "hash_gb_per_s": speeds, "results": results},
                      sort_keys=True)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
