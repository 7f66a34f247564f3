"""A plan (:mod:`jaxllm.plan.planner`'s result) for a reader: the table of one plan, the ranked table of
a search with the winner's overrides ready to paste, and the JSON of ``--plan-out``."""

from __future__ import annotations

from pathlib import Path

from jaxllm.core.fileio import write_json
from jaxllm.plan.hardware import GiB


def overrides_line(result: dict) -> str:
    """The mesh and schedule as ``key=value`` overrides, ready to paste after the config."""
    parts = [f"mesh.{a}={s}" for a, s in result["mesh"].items()]
    parts.append(f"model.remat={result['remat']}")
    if result["microbatches"]:
        parts.append(f"pipeline.microbatches={result['microbatches']}")
    return " ".join(parts + result.get("changes", []))


def _gib(n: float | None, unit: float = GiB) -> str:
    return "-" if n is None else f"{n / unit:.2f}"


def table(result: dict) -> str:
    """One plan as text: memory parts (analytic beside compiled), verdict, roofline."""
    a, c = result["analytic_bytes"], result["compiled_bytes"] or {}
    mesh = " ".join(f"{k}={v}" for k, v in result["mesh"].items())
    unit, unit_name = (GiB, "GiB") if max(a["total"], c.get("total") or 0) >= GiB else (2**20, "MiB")
    title = (
        f"plan: {result['devices']} x {result['device_kind']} ({_gib(result['device_memory_bytes'])} GiB each), "
        f"mesh {mesh}, remat {result['remat']}"
    )
    lines = [title, f"{'per device, ' + unit_name:<18}{'analytic':>10}   {'compiled':<10}"]
    total_name = "peak" if c and c["total"] == c["peak"] else "total"  # a TPU's: see compiled_bytes
    for (name, value), (cname, cvalue) in zip(
        [(k, a[k]) for k in ("params", "grads", "optimizer", "activations", "total")],
        [(k, c.get(k)) for k in ("argument", "output", "alias", "temp")] + [(total_name, c.get("total"))],
    ):
        lines.append(f"  {name:<16}{_gib(value, unit):>10}   {cname:<9}{_gib(cvalue, unit):>7}")
    verdict = "fits" if result["fits"] else "DOES NOT FIT"
    lines.append(f"verdict: {verdict}, headroom {result['headroom']:.0%} of {_gib(result['device_memory_bytes'])} GiB")
    if "compile_wall_s" in result:
        lines.append(f"compiled in {result['compile_wall_s']:.1f} s ({result['compile_cpu_s']:.1f} s CPU)")
    if "note" in result:
        lines.append(result["note"])
    terms = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in result["roofline_s"].items())
    basis = f"at {result['efficiency']:.0%} of peak: {result['efficiency_source']}"
    basis = basis if result["efficiency"] < 1 else "at the spec peak: a lower bound on the step time"
    lines.append(
        f"roofline (ms per step): {terms}\npredicted: {result['step_time_s'] * 1e3:.1f} ms/step, "
        f"{result['tokens_per_sec']:,.0f} tokens/s, MFU {result['mfu']:.1%}, "
        f"bound by {result['bound']} (matmuls {basis})"
    )
    for fix in result.get("fixes", []):
        lines.append(
            f"fix: {' '.join(fix['changes'])} -> {'fits' if fix['fits'] else 'still too big'}, "
            f"headroom {fix['headroom']:.0%}"
        )
    return "\n".join(lines)


def search_table(result: dict, top: int = 12) -> str:
    """The ranked candidates, then the winner's overrides on one line."""
    header = (
        f"{'#':>3} {'data':>5}{'fsdp':>5}{'tens':>5}{'pipe':>5}{'M':>4}{'remat':>14}{'GiB':>8}{'compiled':>9}"
        f"{'fits':>6}{'ms/step':>9}{'tok/s':>11}{'MFU':>7}  bound"
    )
    rows = [header]
    for i, r in enumerate(result["candidates"][:top], 1):
        m = r["mesh"]
        compiled = _gib(r["compiled_bytes"]["total"]) if r["compiled_bytes"] else "-"
        rows.append(
            f"{i:>3} {m['data']:>5}{m['fsdp']:>5}{m['tensor']:>5}{m['pipe']:>5}{r['microbatches'] or '-':>4}"
            f"{r['remat']:>14}{_gib(r['analytic_bytes']['total']):>8}{compiled:>9}"
            f"{'yes' if r['fits'] else 'no':>6}{r['step_time_s'] * 1e3:>9.1f}{r['tokens_per_sec']:>11,.0f}"
            f"{r['mfu']:>7.1%}  {r['bound']}"
        )
    best = result["candidates"][0]
    if "note" in best:
        rows.append(best["note"])
    verdict = "best" if best["fits"] else "none fits; the closest"
    rows.append(f"{len(result['candidates'])} meshes tried; {verdict}: {overrides_line(best)}")
    return "\n".join(rows)


def write(result: dict, path: str) -> None:
    write_json(Path(path), result)
