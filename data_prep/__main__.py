"""python -m data_prep [local_dir=DIR] [sizes=[10k,30k]] [training=[..]] [benchmarks=[..]]

Writes data/<dataset>/<size>/train.jsonl and data/benchmarks/<name>/test.jsonl, each with a
manifest.json. See conf/prep.yaml and conf/prep/sources.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from data_prep.formatting import FORMATTERS, benchmark_item
from data_prep.sources import PrepError, describe, load_rows
from data_prep.subsets import FORMAT_VERSION, format_all, nested_order, parse_size, publish

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


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
            raise PrepError(f"unknown benchmark '{name}': choose from {', '.join(known)}")
    return out


def prepare_training(name: str, cfg: DictConfig) -> None:
    if name not in cfg.sources.training:
        raise PrepError(f"unknown training set '{name}': choose from {', '.join(cfg.sources.training)}")
    spec = cfg.sources.training[name]
    formatter = FORMATTERS[spec.formatter]
    records, dropped = format_all(load_rows(spec, cfg.local_dir), lambda row, _i: formatter(row))
    order = nested_order(len(records), cfg.seed, cfg.sampling)
    for size in cfg.sizes:
        count = parse_size(size)
        if count > len(records):
            raise PrepError(f"{name}: size {size} asks for {count} records but only {len(records)} are valid "
                            f"({sum(dropped.values())} dropped); choose smaller sizes")
        subset = [{"id": f"{name}-{i}", **records[i]} for i in order[:count]]
        manifest = {"dataset": name, "source": describe(spec, cfg.local_dir), "revision": spec.get("revision"),
                    "split": spec.split, "size": str(size), "count": count, "seed": cfg.seed, "sampling": cfg.sampling,
                    "valid_records": len(records), "dropped": sum(dropped.values()), "dropped_by_reason": dict(sorted(dropped.items())),
                    "format_version": FORMAT_VERSION}
        status = publish(Path(cfg.out_dir) / name / str(size), "train.jsonl", subset, manifest)
        print(f"[data_prep] {name}/{size}: {status} {count} records ({sum(dropped.values())} of the source dropped)")


def prepare_benchmark(name: str, cfg: DictConfig) -> None:
    spec = OmegaConf.merge({"local_name": name}, cfg.sources.benchmarks[name])
    items, dropped = format_all(load_rows(spec, cfg.local_dir), lambda row, i: benchmark_item(name, spec, row, i))
    manifest = {"benchmark": name, "source": describe(spec, cfg.local_dir), "revision": spec.get("revision"),
                "split": spec.split, "count": len(items), "dropped": sum(dropped.values()),
                "dropped_by_reason": dict(sorted(dropped.items())), "format_version": FORMAT_VERSION}
    status = publish(Path(cfg.out_dir) / "benchmarks" / name, "test.jsonl", items, manifest)
    print(f"[data_prep] benchmarks/{name}: {status} {len(items)} items")


@hydra.main(config_path=CONF_DIR, config_name="prep", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        for name in cfg.training:
            prepare_training(name, cfg)
        for name in expand_benchmarks(list(cfg.benchmarks), cfg):
            prepare_benchmark(name, cfg)
    except PrepError as err:
        sys.exit(f"data_prep: {err}")


if __name__ == "__main__":
    main()
