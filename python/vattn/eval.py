"""vattn eval: what each attention method does to a model's answers on long-context tasks.

    python3 -m vattn eval --model models/kjv-ruler-18m --lengths 1024,2048 --samples 5 \\
        --json eval.json --plot eval.png

For every task of the RULER family (vattn.tasks) and context length, samples are generated with
fixed seeds; the prompt is prefilled densely once, then each method decodes the answer from a
copy of that cache (the last prompt token is the first decode step). Methods: dense, sink+local,
oracle top-k, oracle top-p, random sampling, top-k by each predictor, and vAttention over oracle
top-k and over each predictor at each (eps = delta). Reported per method: accuracy per task and
length (share of expected items in the answer), the measured density, and the relative error of
each layer's attention output against exact attention at every decode step.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from . import hf, tasks
from .config import Config

CORE = 0.01  # sink and local window, each as a fraction of n, for the sparse methods


def _predictor(name: str) -> dict:
    """Config keys of a --predictors entry: oracle, pages or signs, optionally re-ranked by exact
    logits over a shortlist of r * k tokens, written name+rR (e.g. signs+r4)."""
    pred, sep, r = name.partition("+r")
    if not sep:
        return {"predictor": name}
    try:
        refine = float(r)
    except ValueError:
        raise ValueError(f"--predictors: {name!r}: expected NAME or NAME+rR with R a number "
                         f"(e.g. signs+r4)") from None
    return {"predictor": pred, "refine": refine}


def methods(densities: List[float], eps_list: List[float], top_p: List[float],
            predictors: List[str], mode: str, vtopk: float = 0.025,
            vbase: float = 0.025) -> List[dict]:
    """The methods to run: name, family, nominal density, config (None for dense). vAttention
    uses top-k vtopk and base sample vbase (fractions of n); names carry them when they are not
    the paper's 2.5% each."""
    out = [{"name": "dense", "family": "dense", "nominal": 1.0, "config": None}]
    for rho in densities:
        rest = max(rho - 2 * CORE, 0.001)
        out.append({"name": f"sink_local@{rho:g}", "family": "sink_local", "nominal": rho,
                    "config": Config("sink_local", sink=rho / 2, local=rho / 2)})
        for pred in ["oracle"] + predictors:
            out.append({"name": f"topk_{pred}@{rho:g}", "family": f"topk_{pred}", "nominal": rho,
                        "config": Config("topk", sink=CORE, local=CORE, topk=rest,
                                         **_predictor(pred))})
        out.append({"name": f"random@{rho:g}", "family": "random", "nominal": rho,
                    "config": Config("random", sink=CORE, local=CORE,
                                     sample_rate=rest / (1 - 2 * CORE))})
    for p in top_p:
        out.append({"name": f"topp@{p:g}", "family": "topp", "nominal": None,
                    "config": Config("topp", sink=CORE, local=CORE, top_p=p)})
    sizes = "" if (vtopk, vbase) == (0.025, 0.025) else f"/k{vtopk:g}b{vbase:g}"
    for eps in eps_list:
        for pred in ["oracle"] + predictors:
            out.append({"name": f"vattention_{pred}{sizes}@eps{eps:g}",
                        "family": f"vattention_{pred}{sizes}", "nominal": None, "eps": eps,
                        "config": Config("vattention", sink=CORE, local=CORE, topk=vtopk,
                                         base=vbase, eps=eps, delta=eps, mode=mode,
                                         **_predictor(pred))})
    return out


def _progress(total: int, quiet: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=quiet, unit="run", dynamic_ncols=True)
    except ImportError:  # a plain counter on stderr
        class _Bar:
            n = 0

            def update(self, k=1):
                self.n += k
                if not quiet:
                    print(f"\r{self.n}/{total}", end="", file=sys.stderr, flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                if not quiet:
                    print(file=sys.stderr)

        return _Bar()


def _encode(tok, text: bytes) -> List[int]:
    ids = tok(text.decode("utf-8"), add_special_tokens=False).input_ids
    return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + list(ids)


def _save_dump(path: str, q, k, v, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({"q": q.float().contiguous(), "k": k.half().contiguous(),
               "v": v.half().contiguous()}, path, metadata={k_: str(v_) for k_, v_ in meta.items()})


def _sample(task: str, length: int, i: int, seed: int, hay) -> "tasks.Sample":
    """Sample i of (task, length): the same whichever tasks, lengths or jobs a run has."""
    rng = np.random.default_rng([seed, list(tasks.TASKS).index(task), length])
    for _ in range(i):
        tasks.make(task, rng, hay, length)
    return tasks.make(task, rng, hay, length)


def _run_unit(model, tok, hay, task: str, length: int, i: int, *, seed: int,
              method_list: List[dict], errors: bool, dump: Optional[str],
              dump_layers: List[int], step=None) -> Dict[str, dict]:
    """Prefill sample i of (task, length) once, then decode its answer with every method.
    Returns per method: the score and the per-layer records of every decode step."""
    # transformers renamed generate's past_key_values to cache (5.2x); take whichever it has
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"
    sample = _sample(task, length, i, seed, hay)
    ids = torch.tensor([_encode(tok, sample.prompt)])
    new = len(sample.target) + 4
    hf.disable(model)
    with torch.no_grad():
        cache = model(ids[:, :-1], use_cache=True).past_key_values
    want_dump = bool(dump) and i == 0
    out_ = {}
    for m in method_list:
        c = copy.deepcopy(cache)
        run_ = None
        if m["config"] is None:
            hf.disable(model)
        else:
            run_ = hf.enable(model, m["config"], collect=True, errors=errors,
                             capture=set(dump_layers) if want_dump else None)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 do_sample=False, pad_token_id=tok.pad_token_id, **{cache_kw: c})
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        records = []
        if run_ is not None:
            for rec in run_.records:
                records.append({"layer": rec["layer"], "density": rec["density"].mean().item(),
                                "error": rec["error"].mean().item() if errors else None,
                                "error_max": rec["error"].max().item() if errors else None})
            # the first decode step's q, K, V are the same for every method
            for layer, (q, k, v) in run_.collector.captured.items():
                _save_dump(os.path.join(dump, f"{task}_{length}_layer{layer}.safetensors"), q, k, v,
                           {"task": task, "length": length, "layer": layer, "seed": seed})
            want_dump = want_dump and not run_.collector.captured
        out_[m["name"]] = {"score": tasks.score(sample, text), "records": records}
        if step:
            step()
    hf.disable(model)
    return out_


_job = {}


def _job_init(model_dir: str, threads: int) -> None:
    import transformers

    torch.set_num_threads(threads)
    _job["tok"] = transformers.AutoTokenizer.from_pretrained(model_dir)
    _job["model"] = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32).eval()
    _job["hay"] = tasks.Haystack(tasks.load_corpus())


def _job_unit(unit: tuple, kw: dict):
    task, length, i = unit
    return unit, _run_unit(_job["model"], _job["tok"], _job["hay"], task, length, i, **kw)


def run(model, tok, *, task_names: List[str], lengths: List[int], samples: int, seed: int,
        method_list: List[dict], errors: bool = True, dump: Optional[str] = None,
        dump_layers: List[int] = (), quiet: bool = False, jobs: int = 1,
        model_dir: Optional[str] = None, threads: int = 1) -> dict:
    """Every method on `samples` prompts per task and length. With jobs > 1 the prompts are
    shared among that many processes (each loads the model from model_dir and uses `threads`
    threads); the results do not depend on the number of jobs."""
    results = {m["name"]: {"family": m["family"], "nominal_density": m["nominal"],
                           "eps": m.get("eps"), "config": str(m["config"] or "method=dense"),
                           "scores": {}, "records": []} for m in method_list}
    units = [(t, L, i) for t in task_names for L in lengths for i in range(samples)]
    bar = _progress(len(units) * len(method_list), quiet)
    if dump:
        os.makedirs(dump, exist_ok=True)
    kw = dict(seed=seed, method_list=method_list, errors=errors, dump=dump,
              dump_layers=list(dump_layers))

    def take(unit, per_method):
        task, length, _ = unit
        for name, got in per_method.items():
            r = results[name]
            r["scores"].setdefault(task, {}).setdefault(str(length), []).append(got["score"])
            r["records"].extend(got["records"])

    if jobs > 1:
        import concurrent.futures as cf
        import multiprocessing

        if model_dir is None:
            raise ValueError("run: jobs > 1 needs model_dir (each job loads the model)")
        done = {}
        with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_job_init,
                                    initargs=(model_dir, threads)) as pool:
            futures = [pool.submit(_job_unit, u, kw) for u in units]
            for f in cf.as_completed(futures):
                unit, per_method = f.result()
                done[unit] = per_method
                bar.update(len(method_list))
        for u in units:  # in the order of a single job, so records line up the same way
            take(u, done[u])
    else:
        hay = tasks.Haystack(tasks.load_corpus())
        for u in units:
            take(u, _run_unit(model, tok, hay, *u, **kw, step=lambda: bar.update(1)))
    bar.close()
    return summarise(results, errors)


def summarise(results: dict, errors: bool) -> dict:
    out = {}
    for name, r in results.items():
        acc = {t: {L: float(np.mean(v)) for L, v in per.items()} for t, per in r["scores"].items()}
        all_scores = [s for per in r["scores"].values() for v in per.values() for s in v]
        row = {"family": r["family"], "config": r["config"], "eps": r["eps"],
               "nominal_density": r["nominal_density"], "accuracy": acc,
               "accuracy_mean": float(np.mean(all_scores)) if all_scores else None}
        recs = r["records"]
        if recs:
            row["density"] = float(np.mean([x["density"] for x in recs]))
            layers = sorted({x["layer"] for x in recs})
            row["per_layer"] = []
            for layer in layers:
                lr = [x for x in recs if x["layer"] == layer]
                entry = {"layer": layer, "density": float(np.mean([x["density"] for x in lr]))}
                if errors:
                    entry["error_mean"] = float(np.mean([x["error"] for x in lr]))
                    entry["error_max"] = float(np.max([x["error_max"] for x in lr]))
                row["per_layer"].append(entry)
            if errors:
                errs = [x["error"] for x in recs]
                row["error_mean"] = float(np.mean(errs))
                row["error_p95"] = float(np.percentile(errs, 95))
        else:
            row["density"] = 1.0
            row["error_mean"] = 0.0 if errors else None
        out[name] = row
    return out


def table(summary: dict, task_names: List[str]) -> str:
    head = f"{'method':28s} {'density':>8s} {'error':>8s} {'acc':>6s}  " + " ".join(
        f"{t[:12]:>12s}" for t in task_names)
    lines = [head]
    for name, row in summary.items():
        per = [np.mean(list(row["accuracy"].get(t, {}).values()) or [np.nan]) for t in task_names]
        err = row.get("error_mean")
        lines.append(f"{name:28s} {row['density']:8.3f} "
                     f"{(err if err is not None else float('nan')):8.4f} "
                     f"{row['accuracy_mean']:6.3f}  " + " ".join(f"{a:12.2f}" for a in per))
    return "\n".join(lines)


def markdown(summary: dict, task_names: List[str]) -> str:
    """The summary as a markdown table: one row per method."""
    short = {t: t.replace("niah_", "").replace("variable_tracking", "vt")
             .replace("common_words", "cwe").replace("frequent_words", "fwe") for t in task_names}
    lines = ["| method | density | err mean | err p95 | accuracy | " +
             " | ".join(short[t] for t in task_names) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(task_names)]
    for name, row in summary.items():
        per = [np.mean(list(row["accuracy"].get(t, {}).values()) or [np.nan]) for t in task_names]
        err, p95 = row.get("error_mean"), row.get("error_p95")
        lines.append(f"| {name} | {row['density']:.3f} | "
                     f"{'' if err is None else f'{err:.4f}'} | "
                     f"{'' if p95 is None else f'{p95:.4f}'} | {row['accuracy_mean']:.3f} | " +
                     " | ".join(f"{a:.2f}" for a in per) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    families = sorted({r["family"] for r in summary.values()})
    colours = plt.get_cmap("tab20").colors
    for i, fam in enumerate(families):  # one colour per family in both panels
        rows = sorted([r for r in summary.values() if r["family"] == fam],
                      key=lambda r: r["density"])
        d = [r["density"] for r in rows]
        style = "o-" if fam.startswith("vattention") else "s--"
        c = colours[(2 * i) % 20 + (2 * i) // 20 % 2]
        axes[0].plot(d, [r["accuracy_mean"] for r in rows], style, color=c, label=fam)
        if fam != "dense" and rows[0].get("error_mean") is not None:
            axes[1].plot(d, [r["error_mean"] for r in rows], style, color=c, label=fam)
    axes[0].set(xscale="log", xlabel="measured density", ylabel="accuracy (all tasks)",
                title="accuracy vs density")
    axes[1].set(xscale="log", yscale="log", xlabel="measured density",
                ylabel="mean relative output error", title="attention error vs density")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _write_outputs(args, summary: dict, names: List[str]) -> int:
    """--json, --plot and --markdown of a summary."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "methods": summary}, f, indent=1)
    if args.plot:
        plot(summary, args.plot)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(summary, names) + "\n")
    return 0


def _render_saved(ap, args) -> int:
    summary, names = {}, []
    for path in args.from_json.split(","):
        try:
            with open(path) as f:
                saved = json.load(f)
            got = saved["methods"]
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--from-json: {path}: expected a vattn eval --json file ({e})")
        for name, row in got.items():
            summary.setdefault(name, row)  # the first file's row of a method shown twice wins
            names += [t for t in row["accuracy"] if t not in names]
    if args.tasks != "all":
        names = [t for t in names if t in args.tasks.split(",")]
    print(table(summary, names))
    return _write_outputs(args, summary, names)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="vattn eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a local HF model directory")
    ap.add_argument("--from-json", help="comma list of --json files of earlier runs: merge their "
                                        "methods and write the table, --markdown and --plot "
                                        "without running anything")
    ap.add_argument("--tasks", default="all", help=f"comma list of {','.join(tasks.TASKS)}")
    ap.add_argument("--lengths", default="1024,2048,4096", help="prompt lengths in bytes")
    ap.add_argument("--samples", type=int, default=5, help="samples per task and length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--densities", default="0.05,0.1")
    ap.add_argument("--eps", default="0.05,0.1,0.2", help="vAttention eps = delta values")
    ap.add_argument("--top-p", default="0.9")
    ap.add_argument("--predictors", default="pages,signs",
                    help="approximate predictors besides oracle: pages, signs; NAME+rR re-ranks a "
                         "shortlist of R * k tokens by exact logits (e.g. signs+r4)")
    ap.add_argument("--mode", default="output", help="vAttention budget mode")
    ap.add_argument("--vattention-topk", type=float, default=0.025,
                    help="vAttention's top-k as a fraction of n")
    ap.add_argument("--vattention-base", type=float, default=0.025,
                    help="vAttention's base sample as a fraction of n")
    ap.add_argument("--methods", help="run only methods whose name starts with one of these")
    ap.add_argument("--no-errors", action="store_true", help="skip measuring attention errors")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--plot", help="write accuracy/error vs density plots here (matplotlib)")
    ap.add_argument("--markdown", help="write the table as markdown here")
    ap.add_argument("--dump", help="write q/K/V of the first decode step to this folder")
    ap.add_argument("--dump-layers", default="0", help="layers to dump")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per job (0: torch's default; 1 with --jobs)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes sharing the prompts (each loads the model; same results)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.from_json:
        return _render_saved(ap, args)
    if not args.model:
        ap.error("--model is required (or --from-json)")

    import transformers

    if args.jobs < 1:
        ap.error("--jobs: expected a count >= 1")
    for name in ("vattention_topk", "vattention_base"):
        if not 0 < getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected a fraction of n in (0, 1), "
                     f"got {getattr(args, name)}")
    threads = args.threads or (1 if args.jobs > 1 else 0)
    if threads:
        torch.set_num_threads(threads)
    names = list(tasks.TASKS) if args.tasks == "all" else args.tasks.split(",")
    for t in names:
        if t not in tasks.TASKS:
            ap.error(f"unknown task {t!r}; expected some of {','.join(tasks.TASKS)}")
    floats = lambda s: [float(x) for x in s.split(",") if x]
    method_list = methods(floats(args.densities), floats(args.eps), floats(args.top_p),
                          [p for p in args.predictors.split(",") if p], args.mode,
                          args.vattention_topk, args.vattention_base)
    if args.methods:
        keep = tuple(args.methods.split(","))
        method_list = [m for m in method_list if m["name"].startswith(keep)]
    tok = model = None  # with --jobs each job loads its own
    if args.jobs == 1:
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model.eval()
    t0 = time.time()
    summary = run(model, tok, task_names=names, lengths=[int(x) for x in args.lengths.split(",")],
                  samples=args.samples, seed=args.seed, method_list=method_list,
                  errors=not args.no_errors, dump=args.dump,
                  dump_layers=[int(x) for x in args.dump_layers.split(",") if x],
                  quiet=args.quiet, jobs=args.jobs, model_dir=args.model, threads=threads or 1)
    print(table(summary, names))
    print(f"({time.time() - t0:.0f} s)")
    return _write_outputs(args, summary, names)
