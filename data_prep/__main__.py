"""python -m data_prep [local_dir=DIR] [sizes=[10k,30k]] [training=[..]] [benchmarks=[..]]

Writes data/<dataset>/<size>/train.jsonl and data/benchmarks/<name>/test.jsonl, each with a
manifest.json. See conf/prep.yaml and conf/prep/sources.yaml. A bad request or a broken source
fails with one line ``data_prep: ...; fix`` and leaves nothing behind: the names are checked
first, and the folders appear only once every source has been read and formatted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from asft_repro.hydra_cli import hydra_task, run_cli
from asft_repro.paths import BENCHMARK_FILE, CONF_DIR, TRAIN_FILE, benchmark_file, subset_dir
from data_prep.formatting import FORMATTER_FIELDS, FORMATTERS, benchmark_fields, benchmark_item
from data_prep.sources import PrepError, check_local_dir, describe, load_rows
from data_prep.subsets import FORMAT_VERSION, Staging, format_all, nested_order, parse_size, publish, staged

log = logging.getLogger(__name__)


def _say(line: str, staging: Staging | None) -> None:
    """Log a report line now, or keep it until the staged folders are in place."""
    if staging is None:
        log.info(line)
    else:
        staging.notes.append(line)


def as_list(value: Any) -> list:
    """A list from a list override, or a one-item list from a scalar (sizes=64)."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]


def expand_benchmarks(names: list[str], cfg: DictConfig) -> list[str]:
    """Benchmark names with groups (mmlu_medical) expanded to their members."""
    out = []
    for name in names:
        if name in cfg.sources.benchmark_groups:
            out += list(cfg.sources.benchmark_groups[name])
        elif name in cfg.sources.benchmarks:
            out.append(name)
        else:
            known = sorted(set(cfg.sources.benchmarks) | set(cfg.sources.benchmark_groups))
            raise PrepError(f"unknown benchmark '{name}'; choose from {', '.join(known)}")
    return list(dict.fromkeys(out))


def check_request(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """Validate every name and option before anything is read or written; (training sets, benchmarks)."""
    check_local_dir(cfg.local_dir)
    if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        raise PrepError(f"out_dir={cfg.out_dir} is a file, not a folder; pass a folder (it is created if missing)")
    training = list(dict.fromkeys(str(name) for name in as_list(cfg.training)))
    for name in training:
        if name not in cfg.sources.training:
            raise PrepError(f"unknown training set '{name}'; choose from {', '.join(cfg.sources.training)}")
    if training and not as_list(cfg.sizes):
        raise PrepError("sizes is empty; pass sizes=[10k] (or training=[] to prepare only benchmarks)")
    for size in as_list(cfg.sizes):
        if parse_size(size) < 1:
            raise PrepError(f"bad size '{size}'; use a count of at least 1, like 256 or 10k")
    nested_order(0, cfg.seed, cfg.sampling)  # an unknown sampling fails here
    return training, expand_benchmarks([str(b) for b in as_list(cfg.benchmarks)], cfg)


def release_file(spec: Any, size: Any) -> str | None:
    """The released file a size of a ``size_files`` source (the paper's subsets) is read from: the size's own file,
    else the smallest file with at least that many rows (else the largest); None for other sources."""
    files = {str(key): str(file) for key, file in (spec.get("size_files") or {}).items()}
    if not files:
        return None
    if str(size) in files:
        return files[str(size)]
    by_size = sorted(files, key=parse_size)
    return files[next((key for key in by_size if parse_size(key) >= parse_size(size)), by_size[-1])]


def prepare_release(name: str, spec: Any, cfg: DictConfig, staging: Staging | None = None) -> None:
    """A source with ``size_files``: a released size is its file, formatted whole and in its order; another size
    is drawn (``sampling``) from the file ``release_file`` picks."""
    formatter = FORMATTERS[spec.formatter]
    formatted: dict[str, tuple[Any, list[dict], dict]] = {}
    for size in dict.fromkeys(str(s) for s in as_list(cfg.sizes)):
        file = release_file(spec, size)
        if file not in formatted:
            local_name = f"{spec.get('local_name') or name}/{Path(file).stem}"
            file_spec = OmegaConf.merge(OmegaConf.to_container(spec), {"data_files": file, "local_name": local_name})
            rows = load_rows(file_spec, cfg.local_dir, FORMATTER_FIELDS[spec.formatter])
            formatted[file] = (file_spec, *format_all(rows, lambda row, _i: formatter(row, spec)))
        file_spec, records, dropped = formatted[file]
        whole = str(size) in {str(k) for k in spec.size_files}
        count = len(records) if whole else parse_size(size)
        if count > len(records):
            raise PrepError(f"{name}: size {size} asks for {count} records but {file} has only {len(records)} valid "
                            f"({sum(dropped.values())} dropped); choose a smaller size or one of {', '.join(map(str, spec.size_files))}")
        order = range(count) if whole else nested_order(len(records), cfg.seed, cfg.sampling)[:count]
        subset = [{"id": f"{name}-{i}", **records[i]} for i in order]
        manifest = {"dataset": name, "source": describe(file_spec, cfg.local_dir), "revision": spec.get("revision"),
                    "data_files": file, "split": spec.split, "size": size, "count": count, "seed": cfg.seed,
                    "sampling": "file" if whole else cfg.sampling, "valid_records": len(records),
                    "dropped": sum(dropped.values()), "dropped_by_reason": dict(sorted(dropped.items())),
                    "format_version": FORMAT_VERSION}
        status = publish(subset_dir(cfg.out_dir, name, size), TRAIN_FILE, subset, manifest, staging)
        _say(f"[data_prep] {name}/{size}: {status} {count} records of {file} ({sum(dropped.values())} of it dropped)", staging)


def prepare_training(name: str, cfg: DictConfig, staging: Staging | None = None) -> None:
    """Format one training source and publish its nested subsets (one folder per size)."""
    if name not in cfg.sources.training:
        raise PrepError(f"unknown training set '{name}'; choose from {', '.join(cfg.sources.training)}")
    spec = cfg.sources.training[name]
    if spec.get("size_files"):
        return prepare_release(name, spec, cfg, staging)
    formatter = FORMATTERS[spec.formatter]
    rows = load_rows(spec, cfg.local_dir, FORMATTER_FIELDS[spec.formatter])
    records, dropped = format_all(rows, lambda row, _i: formatter(row, spec))
    order = nested_order(len(records), cfg.seed, cfg.sampling)
    for size in dict.fromkeys(as_list(cfg.sizes)):
        count = parse_size(size)
        if count > len(records):
            raise PrepError(f"{name}: size {size} asks for {count} records but only {len(records)} are valid "
                            f"({sum(dropped.values())} dropped); choose smaller sizes")
        subset = [{"id": f"{name}-{i}", **records[i]} for i in order[:count]]
        manifest = {"dataset": name, "source": describe(spec, cfg.local_dir), "revision": spec.get("revision"),
                    "split": spec.split, "size": str(size), "count": count, "seed": cfg.seed, "sampling": cfg.sampling,
                    "valid_records": len(records), "dropped": sum(dropped.values()), "dropped_by_reason": dict(sorted(dropped.items())),
                    "format_version": FORMAT_VERSION}
        status = publish(subset_dir(cfg.out_dir, name, size), TRAIN_FILE, subset, manifest, staging)
        _say(f"[data_prep] {name}/{size}: {status} {count} records ({sum(dropped.values())} of the source dropped)", staging)


def prepare_benchmark(name: str, cfg: DictConfig, staging: Staging | None = None) -> None:
    """Normalise one benchmark into benchmarks/<name>/test.jsonl; a source with no valid item is an error."""
    spec = OmegaConf.merge({"local_name": name}, cfg.sources.benchmarks[name])
    rows = load_rows(spec, cfg.local_dir, benchmark_fields(spec))
    items, dropped = format_all(rows, lambda row, i: benchmark_item(name, spec, row, i))
    if not items:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(dropped.items()))
        raise PrepError(f"benchmarks/{name}: no valid item in {describe(spec, cfg.local_dir)} ({reasons}); "
                        f"check that the file is {spec.hub_id} in its hub schema")
    manifest = {"benchmark": name, "source": describe(spec, cfg.local_dir), "revision": spec.get("revision"),
                "split": spec.split, "count": len(items), "dropped": sum(dropped.values()),
                "dropped_by_reason": dict(sorted(dropped.items())), "format_version": FORMAT_VERSION}
    status = publish(benchmark_file(Path(cfg.out_dir) / "benchmarks", name).parent, BENCHMARK_FILE, items, manifest, staging)
    _say(f"[data_prep] benchmarks/{name}: {status} {len(items)} items", staging)


def prepare_all(cfg: DictConfig) -> None:
    """Check the request, prepare everything into a staging folder, then move it into place."""
    training, benchmarks = check_request(cfg)
    with staged(Path(cfg.out_dir)) as staging:
        for name in training:
            prepare_training(name, cfg, staging)
        for name in benchmarks:
            prepare_benchmark(name, cfg, staging)
    for line in staging.notes:
        log.info(line)


@hydra.main(config_path=CONF_DIR, config_name="prep", version_base="1.3")
@hydra_task("data_prep")
def _main(cfg: DictConfig) -> None:
    prepare_all(cfg)


def main() -> None:
    """The CLI: overrides are checked first so a typo is one line, not Hydra's report."""
    run_cli("data_prep", "prep", _main)


if __name__ == "__main__":
    main()
